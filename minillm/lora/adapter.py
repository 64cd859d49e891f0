"""LoRA adapters on disk and in host memory: PEFT's format read, checked against the model, and written (chapter 10,
section 7 makes two and serves them).

PEFT (Hugging Face's library, and what most LoRA fine-tunes ship as) saves an adapter as a directory:

    adapter_config.json         {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  [r, in]
                                base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  [out, r]

and the adapted layer computes y = x W^T + scaling * (x A^T) B^T, scaling = lora_alpha / r (lora_alpha / sqrt(r)
with `use_rslora`; `alpha_pattern` gives some modules their own alpha, and a module's r is its tensors' shape,
which is how `rank_pattern` shows up on disk). B starts at zero in training, so a fresh adapter changes nothing.

The engine packs q/k/v into one qkv_proj and gate/up into one gate_up_proj (minillm.layers.linear), so an adapter's
seven per-projection modules land in four packed layers: `TARGETS` says where. What this engine cannot add is refused
with the key or option named: DoRA, trained biases, `modules_to_save` (whole layers saved beside the adapter),
adapters on the embedding or the LM head, Conv1D-style transposed weights (`fan_in_fan_out`).

Adapters are read once and kept by `AdapterCache` (the engine checks a request's adapter when it arrives; the worker
copies the same host tensors into a device slot when the adapter is first scheduled).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from minillm.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Hugging Face's projection name -> (the engine's packed layer under the decoder layer, the shard in it; None:
# the layer is not packed)
TARGETS: dict[str, tuple[str, object]] = {
    "q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", None),
    "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1), "down_proj": ("mlp.down_proj", None),
}
_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
MAX_LORA_RANK = 512  # the largest rank an engine slot may be sized for


def projection_shape(config: ModelConfig, name: str) -> tuple[int, int]:
    """(out, in) of Hugging Face projection `name` in a model of this shape."""
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    q, kv, h, f = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, \
        config.hidden_size, config.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (f, h), "up_proj": (f, h), "down_proj": (h, f)}[name]


@dataclass
class LoRAModule:
    """One adapted projection: A [r, in], B [out, r] (fp32, host) and its scaling."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, [out, in]: what merging the adapter into the base weight adds."""
        return self.scaling * (self.b @ self.a)


@dataclass
class LoRAAdapter:
    """An adapter in host memory: its modules by (decoder layer index, Hugging Face projection name)."""

    modules: dict[tuple[int, str], LoRAModule] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank among the modules (what a slot must hold)."""
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def num_bytes(self) -> int:
        return sum(m.a.numel() + m.b.numel() for m in self.modules.values()) * 4

    def check_model(self, config: ModelConfig, max_lora_rank: int, where: str = "adapter") -> None:
        """Raise ValueError unless every module fits a model of this shape and the rank fits the engine's slots."""
        if not self.modules:
            raise ValueError(f"{where}: no LoRA weights in it")
        if config.num_local_experts:
            mlp = sorted({name for _, name in self.modules if _BLOCK[name] == "mlp"})
            if mlp:
                raise ValueError(f"{where}: adapts {mlp}, but this model's MLPs are mixtures of experts; LoRA "
                                 f"is supported on the attention projections of an MoE model")
        for (layer, name), module in sorted(self.modules.items()):
            if layer >= config.num_hidden_layers:
                raise ValueError(f"{where}: layer {layer} adapted, the model has layers 0.."
                                 f"{config.num_hidden_layers - 1}")
            out_f, in_f = projection_shape(config, name)
            if module.a.shape[1] != in_f or module.b.shape[0] != out_f:
                raise ValueError(f"{where}: layers.{layer}.{name} has A {tuple(module.a.shape)} and B "
                                 f"{tuple(module.b.shape)}; this model's {name} is [{out_f}, {in_f}] (out, in): "
                                 f"the adapter was trained for another model")
        if self.rank > max_lora_rank:
            raise ValueError(f"{where}: rank {self.rank} is above max_lora_rank={max_lora_rank}; start the "
                             f"engine with max_lora_rank >= {self.rank} (at most {MAX_LORA_RANK})")


def _matches(pattern: str, name: str) -> bool:
    """PEFT's rank/alpha pattern rule: the key names the module or a dotted suffix of its name."""
    return name == pattern or re.fullmatch(rf"(?:.*\.)?{pattern}", name) is not None


def _module_scaling(cfg: dict, full_name: str, rank: int) -> float:
    alpha = cfg.get("lora_alpha", 8)
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if _matches(pattern, full_name):
            alpha = value
            break
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {alpha!r} for {full_name}")
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _read_config(path: str) -> dict:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter directory {path!r} does not exist")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is not a PEFT adapter: {CONFIG_FILE} is missing")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: cannot read it as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path}: expected a JSON object, got {type(cfg).__name__}")
    refused = {"peft_type": cfg.get("peft_type", "LORA") != "LORA", "use_dora": bool(cfg.get("use_dora")),
               "bias": cfg.get("bias", "none") != "none", "modules_to_save": bool(cfg.get("modules_to_save")),
               "fan_in_fan_out": bool(cfg.get("fan_in_fan_out"))}
    for option, bad in refused.items():
        if bad:
            raise ValueError(f"{config_path}: {option}={cfg.get(option)!r} is not supported (LoRA adapters with "
                             f"peft_type 'LORA', bias 'none', no DoRA, no modules_to_save, no fan_in_fan_out)")
    return cfg


def load_adapter(path: str | os.PathLike) -> LoRAAdapter:
    """Read a PEFT LoRA adapter directory into host memory (fp32), scaling kept per module."""
    from safetensors import safe_open
    path = os.fspath(path)
    cfg = _read_config(path)
    weights_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        other = " (adapter_model.bin, a pickle, is not read: convert it to safetensors)" \
            if os.path.isfile(os.path.join(path, "adapter_model.bin")) else ""
        raise ValueError(f"{path!r}: {WEIGHTS_FILE} is missing{other}")
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in f.keys():
                m = _KEY.match(key)
                if m is None or m.group(3) not in TARGETS or _BLOCK[m.group(3)] != m.group(2):
                    raise ValueError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight of a projection this "
                                     f"engine adapts ({', '.join(TARGETS)})")
                halves.setdefault((int(m.group(1)), m.group(3)), {})[m.group(4)] = f.get_tensor(key).float()
    except ValueError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{weights_path}: cannot read it as safetensors ({type(e).__name__}: {e})") from None
    adapter = LoRAAdapter()
    for (layer, name), pair in sorted(halves.items()):
        where = f"{path}: layers.{layer}.{_BLOCK[name]}.{name}"
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{where} has lora_{''.join(pair)} without lora_{'B' if 'A' in pair else 'A'}")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise ValueError(f"{where}: A {tuple(a.shape)} and B {tuple(b.shape)} are not [r, in] and [out, r]")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{where}: the weights hold NaN or inf")
        scaling = _module_scaling(cfg, f"model.layers.{layer}.{_BLOCK[name]}.{name}", a.shape[0])
        adapter.modules[layer, name] = LoRAModule(a.contiguous(), b.contiguous(), scaling)
    if not adapter.modules:
        raise ValueError(f"{weights_path}: no LoRA weights in it")
    return adapter


def save_adapter(adapter: LoRAAdapter, path: str | os.PathLike, lora_alpha: float | None = None,
                 base_model_name_or_path: str | None = None) -> None:
    """Write `adapter` in PEFT's format. Every module must share one rank and one scaling unless `lora_alpha` is
    None, in which case each module's scaling goes into `alpha_pattern` (alpha = scaling * r)."""
    from safetensors.torch import save_file
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors, alpha_pattern, ranks = {}, {}, {m.rank for m in adapter.modules.values()}
    rank = max(ranks)
    for (layer, name), module in sorted(adapter.modules.items()):
        prefix = f"base_model.model.model.layers.{layer}.{_BLOCK[name]}.{name}"
        tensors[f"{prefix}.lora_A.weight"] = module.a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = module.b.contiguous()
        if lora_alpha is None:
            alpha_pattern[f"model.layers.{layer}.{_BLOCK[name]}.{name}"] = module.scaling * module.rank
    save_file(tensors, os.path.join(path, WEIGHTS_FILE))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": lora_alpha if lora_alpha is not None else rank,
              "target_modules": sorted({name for _, name in adapter.modules}), "lora_dropout": 0.0, "bias": "none",
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
              "alpha_pattern": alpha_pattern, "rank_pattern": {}, "task_type": "CAUSAL_LM",
              "base_model_name_or_path": base_model_name_or_path}
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)


def random_adapter(config: ModelConfig, rank: int, targets: tuple[str, ...] = tuple(TARGETS), seed: int = 0,
                   std: float = 0.02, layers: range | None = None) -> LoRAAdapter:
    """An adapter of random A and B (B not zero, so it changes the output), for tests and benchmarks."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"targets {unknown} unknown; allowed: {', '.join(TARGETS)}")
    if not 1 <= rank <= MAX_LORA_RANK:
        raise ValueError(f"rank must be in 1..{MAX_LORA_RANK}, got {rank}")
    g = torch.Generator().manual_seed(seed)
    adapter = LoRAAdapter()
    for layer in layers if layers is not None else range(config.num_hidden_layers):
        for name in targets:
            out_f, in_f = projection_shape(config, name)
            a = torch.randn(rank, in_f, generator=g) * std
            b = torch.randn(out_f, rank, generator=g) * std
            adapter.modules[layer, name] = LoRAModule(a, b, scaling=2.0)
    return adapter


class AdapterCache:
    """Adapters read from disk, the `capacity` most recently used kept in host memory (vLLM's max_cpu_loras),
    keyed by directory and the weights file's modification time (a rewritten adapter is read again). One cache
    serves a whole process (`process_adapter_cache`): the engine reads an adapter to check a request, and the
    in-process worker copies the same host tensors into a device slot without reading the file twice."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the adapter cache needs capacity >= 1, got {capacity}")
        self.capacity = capacity
        self._adapters: OrderedDict[tuple[str, int], LoRAAdapter] = OrderedDict()
        self._lock = threading.Lock()  # the server checks requests off its event loop

    def get(self, path: str | os.PathLike) -> LoRAAdapter:
        """The adapter in directory `path`, read from disk unless it is cached."""
        path = os.path.abspath(os.fspath(path))
        try:
            key = (path, os.stat(os.path.join(path, WEIGHTS_FILE)).st_mtime_ns)
        except OSError:
            key = (path, -1)  # load_adapter names what is missing
        with self._lock:
            adapter = self._adapters.get(key)
            if adapter is not None:
                self._adapters.move_to_end(key)
                return adapter
        adapter = load_adapter(path)
        with self._lock:
            self._adapters[key] = adapter
            while len(self._adapters) > self.capacity:
                self._adapters.popitem(last=False)
        return adapter


_PROCESS_CACHE: AdapterCache | None = None


def process_adapter_cache(capacity: int) -> AdapterCache:
    """This process's adapter cache, holding at least `capacity` adapters."""
    global _PROCESS_CACHE
    if _PROCESS_CACHE is None:
        _PROCESS_CACHE = AdapterCache(capacity)
    _PROCESS_CACHE.capacity = max(_PROCESS_CACHE.capacity, capacity)
    return _PROCESS_CACHE
