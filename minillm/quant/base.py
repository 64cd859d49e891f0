"""The quantized-linear seam: how a Linear stores its weights and does its matmul (chapter 7, as vLLM does it).

Every `Linear` delegates three things to a `LinearMethod` held in `layer.quant_method`:

    create_weights(layer, input_size, output_size, bias, dtype)   at construction: register the parameters,
                                                                   each with a `weight_loader` for the checkpoint
    process_weights_after_loading(layer)                          once, after every shard is loaded: repack,
                                                                   quantize, transpose for a kernel, free staging
    apply(layer, x, bias)                                         every forward: y = x W^T (+ b), however W is kept

The model code never changes when a technique does: `UnquantizedLinearMethod` keeps a dense weight and calls
`F.linear`; `minillm.quant.int8_rtn` keeps int8 weights and per-channel scales; a GPTQ or FP8 method would keep
packed int4 or fp8 tensors and call its own kernel. Which method a layer gets is decided by a
`QuantizationConfig` (one per model, built from `ModelConfig.quantization` and the checkpoint's
`quantization_config`) through `get_quant_method(layer, prefix)`: the prefix ("model.layers.3.mlp.down_proj")
lets a config leave some layers dense.

`QUANTIZATION_METHODS` maps the names a user passes as `LLM(..., quantization=NAME)` (vLLM's spelling) to the
config classes; they are imported lazily, so a method's dependencies load only when it is used.
"""
from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# name -> "module:ConfigClass". A new method adds one line here (and its module under minillm/quant/).
QUANTIZATION_METHODS = MappingProxyType({
    "int8_rtn": "minillm.quant.int8_rtn:Int8RTNConfig",
    "rtn": "minillm.quant.weight_only:RTNConfig",
    "gptq": "minillm.quant.weight_only:GPTQConfig",
    "awq": "minillm.quant.weight_only:AWQConfig",
    "fp8": "minillm.quant.fp8:Fp8Config",
    "fp8_block": "minillm.quant.fp8_block:Fp8BlockConfig",
    "smoothquant": "minillm.quant.smoothquant:SmoothQuantConfig",
    "nf4": "minillm.quant.nf4:NF4Config",
    "int8": "minillm.quant.llm_int8:LLMInt8Config",
})
# vLLM's names that minillm knows of but does not run yet: a checkpoint that asks for one fails with this
# sentence instead of a shape mismatch deep in the loader.
NOT_YET_SUPPORTED = ("awq_marlin", "gptq_marlin", "fbgemm_fp8", "bitsandbytes", "gguf",
                     "compressed-tensors", "marlin", "modelopt", "experts_int8")


def add_parameter(layer: nn.Module, name: str, tensor: torch.Tensor, output_dim: int | None = 0) -> nn.Parameter:
    """Register `tensor` on `layer` as a frozen parameter that the checkpoint loader can fill.

    `output_dim` says which dimension runs over the layer's output features: a packed layer (qkv_proj,
    gate_up_proj) writes each checkpoint shard into its slice along that dimension, whatever the method stores
    (a dense [out, in] weight, a per-channel scale [out], a transposed packed int4 tensor [in / 8, out]).
    """
    param = nn.Parameter(tensor, requires_grad=False)
    param.weight_loader = layer.weight_loader
    param.output_dim = output_dim
    layer.register_parameter(name, param)
    return param


def whole_weight_amax(layer: nn.Module, amax: torch.Tensor, per_row: bool) -> torch.Tensor:
    """`amax` (max |w| of this rank's piece of the layer's weight: [out] per output row, or a 0-d per-tensor
    value) made the unsharded weight's, so that quantizing while loading gives every tensor-parallel size the
    scales of one process. A row's inputs are split only in a row-parallel layer; a per-tensor range spans the
    pieces of any split layer. Ranks hold the same layers in the same order, so each all-reduce pairs up
    (minillm.parallel.state.tensor_parallel_max); one process returns `amax` as it is."""
    if getattr(layer, "tp_size", 1) > 1 and (not per_row or getattr(layer, "parallel_style", None) == "row"):
        from minillm.parallel.state import tensor_parallel_max
        amax = tensor_parallel_max(amax.float().contiguous())
    return amax


def add_bias(layer: nn.Module, output_size: int, bias: bool, dtype: torch.dtype | None) -> None:
    """The bias stays dense under every method here (it is tiny); `layer.bias` is None without one."""
    if bias:
        add_parameter(layer, "bias", torch.empty(output_size, dtype=dtype))
    else:
        layer.register_parameter("bias", None)


class LinearMethod(ABC):
    """How a Linear layer keeps its weights and computes y = x W^T (+ b): vLLM's LinearMethodBase."""

    @abstractmethod
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype | None) -> None:
        """Register the layer's parameters (with `add_parameter`, so each has a `weight_loader`)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once after the checkpoint is fully loaded (all shards of a packed layer are in place)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """y = x W^T (+ bias) for x [..., input_size] -> [..., output_size]."""

    def decode_codes(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(8-bit codes [out, in], per-row scales [out]) where apply(layer, x) is the decode GEMV on codes
        (minillm.kernels.gemv with weight_scale), so that Linear may fuse the RMSNorm before the layer, or SwiGLU,
        into that GEMV as it does for a dense weight; None (the default) where it is not."""
        return None

    # How this method's layers enter kernels/fused_moe.py as a mixture-of-experts block's experts: the names of the
    # parameters the grouped GEMM reads, stacked per layer once loaded: ("weight",) dense; (8-bit codes [out, in],
    # per-row scales [out]); or GPTQ's 4-bit layout (qweight [in / 8, out], scales and qzeros per group). None (the
    # default): such experts run the per-expert loop, each its own GEMMs, eagerly.
    expert_operands: tuple[str, ...] | None = None
    # with expert_operands: whether each activation row is rounded to e4m3 before the product (W8A8, as fp8's apply)
    expert_activations_fp8: bool = False


class UnquantizedLinearMethod(LinearMethod):
    """The default: a dense weight [output_size, input_size] in the model's dtype, and F.linear."""

    expert_operands = ("weight",)

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype | None) -> None:
        # Uninitialised on purpose (as vLLM): the loader overwrites every value and a missing tensor is an
        # error there, so no init cost is paid for an 8B-parameter model.
        add_parameter(layer, "weight", torch.empty(output_size, input_size, dtype=dtype))
        add_bias(layer, output_size, bias, dtype)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class QuantizationConfig(ABC):
    """One model's quantization scheme: parsed once from the checkpoint, asked once per Linear layer."""

    name: str = ""  # the key in QUANTIZATION_METHODS
    # whether a mixture-of-experts model under this method keeps the fused expert path (its methods give
    # LinearMethod.expert_operands), so that its decode steps may be CUDA graphs (engine/cache_config.py)
    fused_experts: bool = False

    def fuses_experts(self, tensor_parallel_size: int) -> bool:
        """fused_experts for a model split over `tensor_parallel_size` ranks (a method whose layers' operands
        depend on the split says so here)."""
        return self.fused_experts

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> "QuantizationConfig":
        """Build from a checkpoint's `quantization_config` (config.json) or `quantize_config.json` dict."""

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        """The method for the layer at `prefix` (e.g. "model.layers.0.self_attn.qkv_proj"); None = dense."""

    def get_lm_head_method(self) -> LinearMethod | None:
        """The method of the LM head (minillm.parallel.tensor.ParallelLMHead), or None to keep it dense: the default,
        as in AutoGPTQ and AutoAWQ, since the head's errors land straight on the logits (GPTQModel's `lm_head` key,
        vLLM's lm_head_quantized, turns it on). A method given here must quantize the head's dense `weight` in
        process_weights_after_loading: the head is loaded like the embedding it mirrors."""
        return None

    def checkpoint_shapes(self, prefix: str, output_size: int, input_size: int) -> dict[str, tuple[int, ...]] | None:
        """Tensors a *quantized* checkpoint stores for the linear `prefix` ("...q_proj"), suffix -> shape, e.g.
        {"qweight": ..., "scales": ...}; None (the default) means the dense `weight` [out, in], as for methods that
        quantize a dense checkpoint at load time. The loaders check a checkpoint's shapes against this."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class SkipListQuantizationConfig(QuantizationConfig):
    """A config that gives every Linear one method except those whose name contains a `modules_to_not_convert`
    fragment (kept dense). `serialized`: the checkpoint already holds the quantized tensors (`stored_shapes`);
    otherwise it is dense and each layer quantizes its staging weight at load time."""

    modules_to_not_convert: tuple[str, ...] = ()
    serialized: bool = False

    @abstractmethod
    def make_method(self) -> LinearMethod:
        """The LinearMethod of every converted layer."""

    def stored_shapes(self, output_size: int, input_size: int) -> dict[str, tuple[int, ...]] | None:
        """What a serialized checkpoint stores per linear (suffix -> shape); None: the dense weight."""
        return None

    def skips(self, prefix: str) -> bool:
        return any(fragment in prefix for fragment in self.modules_to_not_convert)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        return UnquantizedLinearMethod() if self.skips(prefix) else self.make_method()

    def checkpoint_shapes(self, prefix: str, output_size: int, input_size: int) -> dict[str, tuple[int, ...]] | None:
        if not self.serialized or self.skips(prefix):
            return None
        return self.stored_shapes(output_size, input_size)


def require_checkpoint(config: dict[str, Any], method: str, needs: str) -> None:
    """ValueError unless `config` is a `method` checkpoint's quantization_config: methods that need calibration
    (`needs`) cannot quantize a dense checkpoint at load time."""
    if config.get("quant_method") != method:
        raise ValueError(f"{method} needs {needs} and cannot quantize a dense checkpoint at load time: run "
                         f"`minillm quantize MODEL --method {method} --out DIR`, then LLM(model=DIR)")


def parse_modules_to_not_convert(config: dict[str, Any], method: str) -> tuple[str, ...]:
    """`modules_to_not_convert` of a quantization_config (name fragments, as Hugging Face writes them), checked."""
    skip = config.get("modules_to_not_convert") or []
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) and s for s in skip):
        raise ValueError(f"{method}: modules_to_not_convert must be a list of non-empty strings, got {skip!r}")
    return tuple(skip)


def quantized_weight_shapes(model_config: Any, dense_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The loaders' expected tensor shapes for a quantized checkpoint: each linear's dense `X.weight` [out, in]
    replaced by what the method stores (QuantizationConfig.checkpoint_shapes); dense shapes for other methods."""
    quant_config = make_quant_config(model_config)
    if quant_config is None:
        return dense_shapes
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in dense_shapes.items():
        stored = None
        # the decoder's linears, but not a mixture-of-experts router (`...gate.weight`), which stays dense
        if name.endswith(".weight") and len(shape) == 2 and ".layers." in name and not name.endswith(".gate.weight"):
            prefix = name[: -len(".weight")]
            stored = quant_config.checkpoint_shapes(prefix, shape[0], shape[1])
        if stored is None:
            shapes[name] = shape
        else:
            shapes.update({f"{prefix}.{suffix}": s for suffix, s in stored.items()})
    return shapes


def check_quantization_name(name: Any) -> str:
    """`name` if it is a registered method; else ValueError (TypeError for a non-string) naming the known ones."""
    known = ", ".join(sorted(QUANTIZATION_METHODS))
    if not isinstance(name, str):
        raise TypeError(f"quantization must be a string (one of: {known}) or None, got {type(name).__name__}: "
                        f"{name!r}")
    if name in QUANTIZATION_METHODS:
        return name
    if name.lower() in NOT_YET_SUPPORTED:
        raise ValueError(f"quantization {name!r} is a vLLM method that minillm does not implement yet; "
                         f"known quantization methods: {known}")
    raise ValueError(f"unknown quantization {name!r}; known quantization methods: {known}")


def get_quantization_config_class(name: str) -> type[QuantizationConfig]:
    module, _, cls = QUANTIZATION_METHODS[check_quantization_name(name)].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_quant_config(model_config: Any) -> QuantizationConfig | None:
    """The QuantizationConfig for a ModelConfig (None for a dense model): one per model, shared by its layers."""
    name = getattr(model_config, "quantization", None)
    if name is None:
        return None
    return get_quantization_config_class(name).from_config(dict(model_config.quantization_config or {}))


def apply_quantization_override(model_config: Any, name: str | None) -> Any:
    """`LLM(model, quantization=name)`: a copy of `model_config` that asks for `name` (None: unchanged).

    A checkpoint that is already quantized with another method cannot be re-read as `name` (its tensors are
    in that method's layout), so that is an error, as in vLLM.
    """
    if name is None:
        return model_config
    check_quantization_name(name)
    current = model_config.quantization
    if current is not None and current != name:
        raise ValueError(f"the checkpoint is quantized with {current!r} (its quantization_config); it cannot be "
                         f"loaded with quantization={name!r}; pass quantization={current!r} or None")
    return dataclasses.replace(model_config, quantization=name)
