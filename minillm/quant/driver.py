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
                 with gptq_quantize, write the dequantized weight back, so the next linear sees its effect
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
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.forward_context import forward_context, prefill_metadata
from minillm.quant import fp8_block
from minillm.quant.awq import _clip, awq_quantize, fold_scales_into_linear, fold_scales_into_rmsnorm, search_clip
from minillm.quant.fp8 import quantize_fp8
from minillm.quant.fp8_calibrated import DEFAULT_ALPHAS, FP8_RECIPE, check_fp8_recipe, fp8_calibrated_layer
from minillm.quant.gptq import HessianAccumulator, gptq_quantize
from minillm.quant.gptq_asym import PairedInputAccumulator, accumulate_paired_inputs, asymmetric_target
from minillm.quant.int4 import awq_tensors, gptq_tensors
from minillm.quant.nf4 import quantize_nf4
from minillm.quant.rtn import QuantizedWeight, pack_int4, quantize
from minillm.quant.smoothquant import smoothing_factors

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
    """A dense model's parameters as an HF checkpoint: packed q/k/v and gate/up split back into their tensors."""
    state = {}
    for name, param in model.named_parameters():
        module_name, _, suffix = name.rpartition(".")
        layer = model.get_submodule(module_name)
        shards = _shards(model, module_name, layer) if getattr(layer, "shard_ids", ()) else [(module_name, slice(None))]
        state.update({f"{hf}.{suffix}": param.detach()[rows].clone() for hf, rows in shards})
    return state


def _decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    from minillm.layers.linear import Linear
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and ".layers." in n}


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


class LayerRunner:
    """Runs one decoder layer over every calibration batch (cache-less prefill) with optional input hooks."""

    def __init__(self, model: nn.Module, calibration: torch.Tensor, batch_size: int) -> None:
        device = next(model.parameters()).device
        self.batches = []
        for start in range(0, calibration.shape[0], batch_size):
            ids = calibration[start:start + batch_size].to(device)
            n, seq_len = ids.shape
            positions = torch.arange(seq_len, device=device).repeat(n)
            self.batches.append((positions, prefill_metadata([seq_len] * n, device=device),
                                 model.model.embed_tokens(ids.flatten()), None))

    def run(self, layer: nn.Module, hooks: dict[nn.Module, Callable[[torch.Tensor], None]] | None = None,
            advance: bool = False) -> None:
        def hook(fn: Callable[[torch.Tensor], None]) -> Callable[..., None]:
            def observe(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                fn(inputs[0].detach())  # returns None: a forward hook that returns a value replaces the output
            return observe

        handles = [m.register_forward_hook(hook(fn)) for m, fn in (hooks or {}).items()]
        try:
            for i, (positions, meta, hidden, residual) in enumerate(self.batches):
                with forward_context(meta):
                    out = layer(positions, hidden, residual)
                if advance:  # this layer is final: its outputs are the next layer's inputs
                    self.batches[i] = (positions, meta, *out)
        finally:
            for h in handles:
                h.remove()


def _linears_in_order(layer: nn.Module) -> tuple[nn.Module, ...]:
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


def _gptq_layer(layer: nn.Module, runner: LayerRunner, opts: dict[str, Any],
                reference: tuple[nn.Module, LayerRunner] | None = None) -> dict[nn.Module, QuantizedWeight]:
    """True-sequential GPTQ of one layer. reference: (the layer's unquantized twin, the unquantized walk) for
    asymmetric calibration (gptq_asym.py): each linear aims at the unquantized model's outputs."""
    result = {}
    twins = _linears_in_order(reference[0]) if reference is not None else (None,) * 4
    for lin, twin in zip(_linears_in_order(layer), twins):
        weight = lin.weight.data
        if reference is None:
            acc = HessianAccumulator(lin.input_size, device=lin.weight.device)
            runner.run(layer, {lin: acc.add})
        else:
            acc = PairedInputAccumulator(lin.input_size, device=lin.weight.device)
            accumulate_paired_inputs(layer, reference[0], lin, twin, runner.batches, reference[1].batches, acc)
            weight = asymmetric_target(weight, acc.H, acc.D, opts["percdamp"])
        g = opts["group_size"]
        block = 128 if g == -1 or 128 % g == 0 else g
        res = gptq_quantize(weight, acc.H, opts["bits"], g, opts["sym"], opts["percdamp"], block,
                            act_order=opts["act_order"], static_groups=opts["static_groups"],
                            clip_search=opts["grid_search"])
        lin.weight.data.copy_(res.weight_dq.to(lin.weight.dtype))
        result[lin] = res.qweight
    return result


def _capture_inputs(layer: nn.Module, runner: LayerRunner, linears: list[nn.Module], max_tokens: int
                    ) -> dict[nn.Module, torch.Tensor]:
    xs: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in linears}
    runner.run(layer, {m: xs[m].append for m in linears})
    out = {}
    for m, chunks in xs.items():
        x = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).float()
        if x.shape[0] > max_tokens:  # evenly spaced tokens bound the search's cost
            x = x[torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).long()]
        out[m] = x
    return out


def _awq_layer(layer: nn.Module, runner: LayerRunner, opts: dict[str, Any]) -> dict[nn.Module, QuantizedWeight]:
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    x = _capture_inputs(layer, runner, [qkv, o, gate_up, down], opts["max_tokens"])
    bits, g, sym = opts["bits"], opts["group_size"], opts["sym"]
    inter = mlp.gate_up_proj.output_sizes[0]

    def set_weight(lin: nn.Module, qws: list[QuantizedWeight]) -> QuantizedWeight:
        merged = QuantizedWeight(torch.cat([q.codes for q in qws]), torch.cat([q.scales for q in qws]),
                                 None if qws[0].zeros is None else torch.cat([q.zeros for q in qws]), bits, g, sym)
        lin.weight.data.copy_(merged.dequantize(lin.weight.dtype))
        return merged

    result = {}
    # down_proj: 1/s into up_proj's rows (silu(gate) * up commutes with a per-channel scale)
    r = awq_quantize([down.weight.data], x[down], bits, g, sym)
    up = gate_up.weight.data[inter:]
    up.copy_(fold_scales_into_linear(up, r.scales)[0])
    result[down] = set_weight(down, r.qweights)
    # gate/up: 1/s into post_attention_layernorm
    w = gate_up.weight.data
    r = awq_quantize([w[:inter], w[inter:]], x[gate_up], bits, g, sym)
    norm = layer.post_attention_layernorm.weight
    norm.data.copy_(fold_scales_into_rmsnorm(norm.data, r.scales))
    result[gate_up] = set_weight(gate_up, r.qweights)
    # o_proj: its input is attention's output, which v_proj's rows scale only when every head has its own v
    w_qkv = qkv.weight.data
    q_end, k_end = qkv.q_size, qkv.q_size + qkv.kv_size
    if attn.num_heads == attn.num_kv_heads:
        r = awq_quantize([o.weight.data], x[o], bits, g, sym)
        w_qkv[k_end:].copy_(fold_scales_into_linear(w_qkv[k_end:], r.scales)[0])
        result[o] = set_weight(o, r.qweights)
    else:
        clip_max = search_clip(o.weight.data, x[o], bits, g, sym)
        result[o] = set_weight(o, [quantize(_clip(o.weight.data, clip_max), bits, g, sym)])
    # q/k/v: 1/s into input_layernorm; no clip search for q and k (their output error is not attention's)
    r = awq_quantize([w_qkv[:q_end], w_qkv[q_end:k_end], w_qkv[k_end:]], x[qkv], bits, g, sym,
                     clip=[False, False, True])
    norm = layer.input_layernorm.weight
    norm.data.copy_(fold_scales_into_rmsnorm(norm.data, r.scales))
    result[qkv] = set_weight(qkv, r.qweights)
    return result


def _smoothquant_layer(layer: nn.Module, runner: LayerRunner, opts: dict[str, Any]
                       ) -> dict[nn.Module, QuantizedWeight]:
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    amax = {m: torch.zeros(m.input_size, device=m.weight.device) for m in (qkv, gate_up, down)}

    def track(m: nn.Module) -> Callable[[torch.Tensor], None]:
        return lambda x: amax[m].copy_(torch.maximum(amax[m], x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()))

    runner.run(layer, {m: track(m) for m in amax})
    inter = gate_up.output_sizes[0]
    for lin, norm in ((qkv, layer.input_layernorm), (gate_up, layer.post_attention_layernorm), (down, None)):
        s = smoothing_factors(amax[lin], [lin.weight.data], opts["alpha"])
        if norm is not None:
            norm.weight.data.copy_(fold_scales_into_rmsnorm(norm.weight.data, s))
        else:
            up = gate_up.weight.data[inter:]
            up.copy_(fold_scales_into_linear(up, s)[0])
        lin.weight.data.mul_(s.to(lin.weight.dtype))
    result = {}
    for lin in (qkv, o, gate_up, down):
        qw = quantize(lin.weight.data, bits=8, group_size=-1, symmetric=True)
        lin.weight.data.copy_(qw.dequantize(lin.weight.dtype))
        result[lin] = qw
    return result


_LAYER_ALGORITHMS = {"gptq": _gptq_layer, "awq": _awq_layer, "smoothquant": _smoothquant_layer,
                     "fp8": fp8_calibrated_layer, "fp8_block": fp8_block.gptq_layer}


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
    """Quantize a dense LlamaForCausalLM with `method` (METHODS); the model itself is left unchanged.

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
            state[name] = param.detach().clone()
            continue
        shards = _shards(model, module_name, layer)
        if suffix == "bias":
            state.update({f"{hf}.bias": param.detach()[rows].clone() for hf, rows in shards})
            continue
        sizes = [rows.stop - rows.start for _, rows in shards]
        split = _split_rows(qweights[layer], sizes) if layer in qweights else [None] * len(shards)
        for (hf, rows), qw in zip(shards, split):
            for key, tensor in _export(method, param.detach()[rows], qw, opts).items():
                state[f"{hf}.{key}"] = tensor.contiguous()
    quant_config = _quantization_config(method, opts)
    config = dataclasses.replace(model.config, quantization=quant_config["quant_method"],
                                 quantization_config=quant_config)
    return QuantizedModel(config=config, state=state)
