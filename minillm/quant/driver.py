"""Quantizing a whole model, layer by layer, with calibration data: `quantize_model` (chapters 7-8).

    from minillm.quant.driver import quantize_model
    qm = quantize_model(model, "gptq", bits=4, group_size=64, calibration=ids)   # ids [n_samples, seq_len]
    quantized = qm.build()            # a LlamaForCausalLM with GPTQ layers, for the engine or for perplexity
    save_quantized(qm, "out/", tokenizer)   # minillm.quant.checkpoint: safetensors + config.json

Methods: "rtn", "fp8", "fp8_block", "nf4", "int8" need no data (each weight is quantized on its own); "gptq", "awq" and
"smoothquant" calibrate on real activations. Those walk the decoder layers in order, as GPTQ's reference does:
the calibration tokens go through the embedding once; each layer's inputs are the outputs of the layers
before it *already quantized*, so a layer's quantization corrects for the error that reaches it, not for a
model that no longer exists. Per layer:

    gptq         for qkv_proj, o_proj, gate_up_proj, down_proj in turn ("true sequential"): run the layer over the
                 calibration batches with a hook that accumulates H = 2 X^T X at that linear's input, quantize it
                 with gptq_quantize, write the dequantized weight back, so the next linear sees its effect; in a
                 mixture-of-experts layer every expert's w13, then every w2, each on the rows routed to it
    awq          one run captures each linear's input X; scales are searched and folded: down_proj's into
                 up_proj's rows, gate/up's into post_attention_layernorm, o_proj's into v_proj (only without
                 grouped KV heads; else o_proj gets the clip search alone), q/k/v's into input_layernorm
    smoothquant  one run records max|X_j| at q/k/v, gate/up and down; s_j = max|X_j|^a / max|W_j|^(1-a) folded
                 the same way; then int8 per-channel weights (activations are quantized per token at run time)
    fp8          calibrated only with fp8_smooth_alpha / fp8_gptq / fp8_mse_scale (fp8_calibrated.py): one run
                 records H, max|X_j| and a token sample per linear; smoothing (an alpha, or searched per linear),
                 MSE-chosen row scales, GPTQ on the e4m3 grid; the walk then runs fp8 activations too
    fp8_block    calibrated only with fp8_gptq (fp8_block.gptq_layer): GPTQ onto the e4m3 tile grid per linear, as
                 gptq, optionally act-order; the walk then quantizes activations per token group

Then the layer runs once more, quantized, to produce the next layer's inputs. The result is a checkpoint in
memory (`QuantizedModel.state`: Hugging Face names, quantized tensors, folded norms) and the config
that reads it; `build()` loads it through the same path as a file, so what is measured is what is saved.

Group size on SmolLM2: hidden 576 = 9 x 64 is not a multiple of 128 (the usual GPTQ/AWQ group), so q/k/v,
gate/up (in = 576) cannot use 128: the default here is 64, which divides 576 and 1536. Per channel
(group_size=-1) and 3 bits work too (3-bit codes are packed as a bit stream: int4.py).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.quant import fp8_block
from minillm.quant.calibrated_layers import _LAYER_ALGORITHMS, LayerRunner, _gptq_layer
from minillm.quant.checkpoint import LOAD_TIME_METHODS
from minillm.quant.fp8 import quantize_fp8
from minillm.quant.fp8_calibrated import DEFAULT_ALPHAS, FP8_RECIPE, check_fp8_recipe
from minillm.quant.int4 import awq_tensors, gptq_tensors
from minillm.quant.nf4 import quantize_nf4
from minillm.quant.rtn import QuantizedWeight, pack_int4, quantize

METHODS = ("rtn", "gptq", "awq", "fp8", "fp8_block", "smoothquant", "nf4", "int8")
CALIBRATED = ("gptq", "awq", "smoothquant")
_FIXED_BITS = {"fp8": 8, "fp8_block": 8, "smoothquant": 8, "int8": 8, "nf4": 4}


@dataclasses.dataclass
class QuantizedModel:
    """A quantized checkpoint in memory: HF-named tensors and the ModelConfig (with quantization_config) to read it."""

    config: Any
    state: dict[str, torch.Tensor]

    @property
    def quantization_config(self) -> dict[str, Any]:
        return dict(self.config.quantization_config)

    def build(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
        from minillm.engine.worker import build_model  # the model loader sits above quant: import when used
        return build_model(self.config, self.state.items(), torch.device(device), dtype)


def _split_rows(qw: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """The row blocks of a packed layer's QuantizedWeight (q/k/v or gate/up), each a checkpoint tensor's."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append(dataclasses.replace(qw, codes=qw.codes[rows], scales=qw.scales[rows],
                                       zeros=None if qw.zeros is None else qw.zeros[rows]))
        start += n
    return out


def _shards(model: nn.Module, name: str, layer: nn.Module) -> list[tuple[str, slice]]:
    """(HF name prefix, row slice) of every checkpoint tensor packed into the Linear `name`."""
    ids = getattr(layer, "shard_ids", ())
    if not ids:
        return [(name, slice(0, layer.output_size))]
    unpacked = {v: k for k, v in model.packed_modules_mapping.items()}  # (packed, shard) -> hf module name
    parent, packed = name.rsplit(".", 1)
    result = []
    for sid in ids:
        offset, size = layer.shard_slice(sid)
        result.append((f"{parent}.{unpacked[(packed, sid)]}", slice(offset, offset + size)))
    return result


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A dense model's parameters as an HF checkpoint: packed q/k/v and gate/up (an expert's w1/w3) split back into
    their tensors, under the architecture's own names (checkpoint_name)."""
    state = {}
    for name, param in model.named_parameters():
        module_name, _, suffix = name.rpartition(".")
        layer = model.get_submodule(module_name)
        shards = _shards(model, module_name, layer) if getattr(layer, "shard_ids", ()) else [(module_name, slice(None))]
        state.update({checkpoint_name(model, f"{hf}.{suffix}"): param.detach()[rows].clone() for hf, rows in shards})
    return state


def checkpoint_name(model: nn.Module, name: str) -> str:
    """The Hugging Face name of a parameter `name` after unpacking (the model's checkpoint_name where its
    checkpoints rename blocks, e.g. Mixtral's block_sparse_moe; the name itself otherwise)."""
    rename = getattr(model, "checkpoint_name", None)
    return rename(name) if rename is not None else name


def _decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder's linears that a method quantizes: every attention, MLP and expert linear, not a
    mixture-of-experts router (`mlp.gate`), which stays dense (as in vLLM and the load-time methods)."""
    from minillm.layers.linear import Linear
    routers = {id(m.gate) for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate")}
    return {n: m for n, m in model.named_modules()
            if isinstance(m, Linear) and ".layers." in n and id(m) not in routers}


# What quantize_model can do for a mixture-of-experts model: every method that rounds each weight on its own, and
# GPTQ with per-expert Hessians; the methods that fold scales into the norm before the MLP (AWQ, SmoothQuant, fp8's
# smoothing) would need one scale shared by the router and every expert, and asymmetric calibration pairs the
# unquantized walk's inputs with a walk whose routing differs.
MOE_METHODS = ("rtn", "gptq", "fp8", "fp8_block", "nf4", "int8")


def check_experts(model: nn.Module, method: str, calibrated: bool, asym_calib: bool) -> None:
    """A mixture-of-experts model takes MOE_METHODS (uncalibrated, or GPTQ without asym_calib); others by name."""
    experts = getattr(model.config, "num_local_experts", 0)
    if not experts:
        return
    if method not in MOE_METHODS or (calibrated and method != "gptq") or asym_calib:
        what = "asym_calib" if asym_calib else (f"{method} with calibration" if method in MOE_METHODS else method)
        raise ValueError(f"quantize_model: {what} is not available for mixture-of-experts models "
                         f"({model.config.architecture!r}, {experts} experts a layer); use one of "
                         f"{', '.join(MOE_METHODS)} (GPTQ calibrates each expert on the tokens routed to it), or "
                         f"quantize while loading: LLM(model, quantization=...) with one of "
                         f"{', '.join(LOAD_TIME_METHODS)}")


def check_no_experts(model: nn.Module, tool: str) -> None:
    """The layer-wise walks (quantize_model, prune_model) know a dense MLP's gate/up and down linears only: a
    mixture-of-experts model is refused by name, pointing at load-time quantization, which does take experts."""
    if getattr(model.config, "num_local_experts", 0):
        raise ValueError(f"{tool} takes models with dense MLPs only; {model.config.architecture!r} has "
                         f"{model.config.num_local_experts} experts a layer. Quantize it while loading instead: "
                         f"LLM(model, quantization=...) with one of {', '.join(LOAD_TIME_METHODS)} (every expert "
                         f"quantized, the router kept dense)")


def _check(model: nn.Module, method: str, bits: int | None, group_size: int, calibration: Any,
           calibrated: bool) -> int:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; quantize_model knows {', '.join(METHODS)}")
    if method in _FIXED_BITS:
        if bits not in (None, _FIXED_BITS[method]):
            raise ValueError(f"{method} stores {_FIXED_BITS[method]}-bit weights; got bits={bits!r}")
        bits = _FIXED_BITS[method]
    elif bits is None:
        bits = 4
    elif isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8 for {method}, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ValueError(f"group_size must be -1 (per channel) or a positive int, got {group_size!r}")
    for name, layer in _decoder_linears(model).items():
        if type(layer.quant_method).__name__ != "UnquantizedLinearMethod":
            raise TypeError(f"quantize_model needs a dense model; {name} uses {type(layer.quant_method).__name__}")
        if method in ("rtn", "gptq", "awq") and group_size != -1 and layer.input_size % group_size:
            raise ValueError(f"group_size={group_size} does not divide {name}'s in_features={layer.input_size}; "
                             f"use a divisor (64 for SmolLM2's 576) or -1 for per-channel scales")
    if calibrated:
        if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0 \
                or calibration.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{method} needs calibration token ids [n_samples, seq_len] (int64: "
                             f"calibration.tokenize_to_sequences), got {getattr(calibration, 'shape', calibration)!r}")
        vocab = model.config.vocab_size
        if int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
            raise ValueError(f"calibration ids must lie in [0, {vocab}), got [{int(calibration.min())}, "
                             f"{int(calibration.max())}]")
    return bits




def _export(method: str, w: torch.Tensor, qw: QuantizedWeight | None, opts: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One checkpoint tensor's quantized form (suffix -> tensor)."""
    if method in ("rtn", "gptq", "awq"):
        if qw is None:
            qw = quantize(w, opts["bits"], opts["group_size"], opts["sym"])
        tensors = awq_tensors(qw) if opts["format"] == "awq" else gptq_tensors(qw, zero_offset=1)
        tensors["scales"] = tensors["scales"].half()  # what GPTQ/AWQ files hold (and the kernels read)
        return tensors
    if method == "smoothquant":
        return {"weight": qw.codes, "weight_scale": qw.scales[:, 0].contiguous()}
    if method == "fp8":
        if qw is not None:  # calibrated: the e4m3 codes and row scales fp8_calibrated_layer chose
            return {"weight": qw.codes, "weight_scale": qw.scales[:, 0].contiguous()}
        w8, scale = quantize_fp8(w, opts["fp8_per_channel"])
        return {"weight": w8, "weight_scale": scale}
    if method == "fp8_block":
        return fp8_block.checkpoint_tensors(w, opts["weight_block_size"], qw)
    if method == "nf4":
        codes, absmax = quantize_nf4(w)
        return {"qweight": pack_int4(codes), "absmax": absmax}
    qw = quantize(w, bits=8, group_size=-1, symmetric=True)  # int8 (LLM.int8)
    return {"weight": qw.codes, "weight_scale": qw.scales[:, 0].contiguous()}


def _quantization_config(method: str, opts: dict[str, Any]) -> dict[str, Any]:
    if opts["format"] == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": opts["group_size"], "zero_point": True,
                "version": "gemm"}
    if opts["format"] == "gptq":  # rtn and non-4-bit awq are stored as GPTQ checkpoints too
        config = {"quant_method": "gptq", "bits": opts["bits"], "group_size": opts["group_size"],
                  # static groups keep the column order of the groups: no g_idx, so not desc_act on disk
                  "desc_act": opts["act_order"] and not opts["static_groups"] if method == "gptq" else False,
                  "sym": opts["sym"],
                  "checkpoint_format": "gptq", "minillm_method": method}
        if method == "gptq":
            config.update(damp_percent=opts["percdamp"], true_sequential=True)
        return config
    return {"fp8": {"quant_method": "fp8", "activation_scheme": "dynamic",
                    "weight_granularity": "channel" if opts["fp8_per_channel"] else "tensor",
                    **({"minillm_recipe": {k.removeprefix("fp8_"): opts[k] for k in FP8_RECIPE}}
                       if opts["fp8_calibrated"] else {})},
            "fp8_block": fp8_block.quantization_config(opts["weight_block_size"], opts["fp8_gptq"],
                                                       opts["act_order"]),
            "smoothquant": {"quant_method": "smoothquant", "bits": 8, "alpha": opts["alpha"]},
            "nf4": {"quant_method": "nf4", "blocksize": 64, "double_quant_blocksize": 256},
            "int8": {"quant_method": "int8", "llm_int8_threshold": opts["llm_int8_threshold"]}}[method]


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, bits: int | None = None, group_size: int = 64,
                   calibration: torch.Tensor | None = None, progress: bool = True, *, sym: bool = False,
                   act_order: bool = False, static_groups: bool = False, grid_search: bool = False,
                   percdamp: float = 0.01, asym_calib: bool = False, alpha: float = 0.5, batch_size: int = 4,
                   max_tokens: int = 4096, fp8_per_channel: bool = True,
                   llm_int8_threshold: float = 6.0, fp8_smooth_alpha: float | str | None = None,
                   fp8_gptq: bool = False, fp8_mse_scale: bool = False,
                   fp8_alphas: tuple[float, ...] = DEFAULT_ALPHAS, fp8_search_tokens: int = 1024,
                   weight_block_size: int | tuple[int, int] = fp8_block.DEFAULT_BLOCK) -> QuantizedModel:
    """Quantize a dense LlamaForCausalLM (or a Mixtral / Qwen3-MoE: MOE_METHODS, the routers kept dense) with
    `method` (METHODS); the model itself is left unchanged.

    bits/group_size/sym: the integer grid of rtn, gptq and awq (bits 2..8, default 4; group_size -1 = per channel;
    AWQ is asymmetric); calibration: token ids [n_samples, seq_len] for gptq, awq, smoothquant (batch_size
    sequences per forward); act_order/percdamp: GPTQ's; static_groups (group grids fixed from the original
    columns before act-order reorders them: no g_idx) and grid_search (each group's range searched, weighted by
    the Hessian's diagonal): GPTQ's too, all three together the options of the "gptq+" recipe (quant/recipes.py;
    SmolLM2 4-bit g64 in benchmarks/RESULTS.md: +7.6% perplexity on the H200 against +21.0% plain GPTQ);
    asym_calib: GPTQ aimed at the unquantized model's outputs rather than at the quantized walk's own
    (gptq_asym.py: a second, unquantized walk alongside); alpha:
    SmoothQuant's migration strength; max_tokens:
    the calibration tokens AWQ's searches use per linear. fp8_smooth_alpha (a float in [0, 1] or "search" over
    fp8_alphas on fp8_search_tokens tokens), fp8_gptq, fp8_mse_scale: the calibrated fp8 recipe (fp8_calibrated.py;
    any of them makes fp8 need calibration); without them fp8 rounds each weight on its own.
    weight_block_size: fp8_block's (block_n, block_k) tile, or one int for square tiles (fp8_block.py); with
    fp8_gptq (and act_order), fp8_block rounds onto its tile grid by GPTQ (fp8_block.gptq_layer).
    """
    fp8_calibrated = method == "fp8" and check_fp8_recipe(fp8_smooth_alpha, fp8_gptq, fp8_mse_scale, fp8_alphas,
                                                          fp8_search_tokens, fp8_per_channel)
    calibrated = method in CALIBRATED or fp8_calibrated or (
        method == "fp8_block" and fp8_block.check_recipe(fp8_smooth_alpha, fp8_gptq, fp8_mse_scale, act_order))
    bits = _check(model, method, bits, group_size, calibration, calibrated)
    check_experts(model, method, calibrated, asym_calib)
    if method == "awq" and sym:
        raise ValueError("awq quantizes on an asymmetric grid (zero points); got sym=True")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    fmt = "awq" if method == "awq" and bits == 4 else ("gptq" if method in ("rtn", "gptq", "awq") else method)
    for name, flag in (("static_groups", static_groups), ("grid_search", grid_search), ("asym_calib", asym_calib)):
        if flag and method != "gptq":
            raise ValueError(f"{name} is a GPTQ option; got it with method {method!r}")
    opts = dict(bits=bits, group_size=group_size, sym=sym, act_order=act_order, static_groups=static_groups,
                grid_search=grid_search, percdamp=percdamp, alpha=alpha,
                max_tokens=max_tokens, fp8_per_channel=fp8_per_channel, llm_int8_threshold=llm_int8_threshold,
                format=fmt, fp8_calibrated=fp8_calibrated, fp8_smooth_alpha=fp8_smooth_alpha, fp8_gptq=fp8_gptq,
                fp8_mse_scale=fp8_mse_scale, fp8_alphas=tuple(fp8_alphas), fp8_search_tokens=fp8_search_tokens,
                weight_block_size=fp8_block.check_block_size(weight_block_size))
    if method == "fp8_block":  # refuse a tile that does not divide a linear before any work
        fp8_block.check_linears(_decoder_linears(model), opts["weight_block_size"])
    qweights: dict[nn.Module, QuantizedWeight] = {}
    if calibrated:
        model = copy.deepcopy(model)  # weights are rewritten (quantized, scales folded) as the walk goes
        if getattr(model.config, "num_local_experts", 0):
            model.attention_backend = "torch"  # the per-expert loop, whose expert linears the hooks observe
        runner = LayerRunner(model, calibration, batch_size)
        fp_runner = LayerRunner(model, calibration, batch_size) if asym_calib else None  # the unquantized walk
        for layer in tqdm(model.model.layers, desc=method, unit="layer", disable=not progress):
            if fp_runner is None:
                qweights.update(_LAYER_ALGORITHMS[method](layer, runner, opts))
            else:
                fp_layer = copy.deepcopy(layer)  # before quantization: the walk the targets come from
                qweights.update(_gptq_layer(layer, runner, opts, reference=(fp_layer, fp_runner)))
                fp_runner.run(fp_layer, advance=True)
            runner.run(layer, advance=True)
    linears = {m: n for n, m in _decoder_linears(model).items()}
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        module_name, _, suffix = name.rpartition(".")
        layer = model.get_submodule(module_name)
        if layer not in linears:
            state[checkpoint_name(model, name)] = param.detach().clone()
            continue
        shards = _shards(model, module_name, layer)
        if suffix == "bias":
            state.update({checkpoint_name(model, f"{hf}.bias"): param.detach()[rows].clone() for hf, rows in shards})
            continue
        sizes = [rows.stop - rows.start for _, rows in shards]
        split = _split_rows(qweights[layer], sizes) if layer in qweights else [None] * len(shards)
        for (hf, rows), qw in zip(shards, split):
            for key, tensor in _export(method, param.detach()[rows], qw, opts).items():
                state[checkpoint_name(model, f"{hf}.{key}")] = tensor.contiguous()
    quant_config = _quantization_config(method, opts)
    config = dataclasses.replace(model.config, quantization=quant_config["quant_method"],
                                 quantization_config=quant_config)
    return QuantizedModel(config=config, state=state)
