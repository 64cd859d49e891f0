"""One decoder layer of quantize_model's calibrated walk: LayerRunner and the per-layer algorithms (chapters 7-8).

quantize_model (driver.py) walks the decoder layers in order; for a calibrated method each layer is handed, with a
LayerRunner, to the method's function in `_LAYER_ALGORITHMS`. This module holds the runner and the three
integer-grid algorithms; the fp8 ones live with their formats (fp8_calibrated.py, fp8_block.py).

LayerRunner keeps the calibration set as the *inputs of the current layer*: the token ids go through the
embedding once, as cache-less prefill batches (positions, attention metadata, hidden, residual). `run(layer, hooks)`
runs one layer over every batch with forward hooks that see each chosen linear's input X (the hooks return None, so
they only observe); `run(layer, advance=True)`, once the layer is quantized, replaces each batch by the layer's
outputs, which become the next layer's inputs. That is why a layer is calibrated on the activations of the
model *as quantized so far*.

Every algorithm takes (layer, runner, opts), writes the dequantized weights (and any folded scales) back into the
layer, so the advance and the later linears see their effect, and returns {linear: QuantizedWeight} for the
checkpoint export:

    _gptq_layer          (chapter 8) the four linears in order, each with its own Hessian H = 2 X^T X collected
                         after the previous one was quantized; with a reference twin, GPTQ aimed at the unquantized
                         model's outputs (gptq_asym.py)
    _awq_layer           (chapter 8) one capture of every linear's input (at most max_tokens rows), then per-channel
                         scales searched and folded into the norm or linear that feeds it (o_proj's only without
                         grouped KV heads; else a clip search alone) (awq.py)
    _smoothquant_layer   (chapter 7) max|X_j| per input channel at q/k/v, gate/up and down, smoothing factors
                         folded the same way, then int8 per-channel weights for all four (smoothquant.py)
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from minillm.forward_context import forward_context, prefill_metadata
from minillm.quant import fp8_block
from minillm.quant.awq import _clip, awq_quantize, fold_scales_into_linear, fold_scales_into_rmsnorm, search_clip
from minillm.quant.fp8_calibrated import fp8_calibrated_layer
from minillm.quant.gptq import HessianAccumulator, gptq_quantize
from minillm.quant.gptq_asym import PairedInputAccumulator, accumulate_paired_inputs, asymmetric_target
from minillm.quant.rtn import QuantizedWeight, quantize
from minillm.quant.smoothquant import smoothing_factors


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


def _linear_groups(layer: nn.Module) -> list[tuple[nn.Module, ...]]:
    """The layer's linears in the order GPTQ quantizes them, grouped where one calibration run can capture the
    inputs of all: q/k/v, o, then a dense MLP's gate/up and down, or a mixture-of-experts block's w13 of every
    local expert, then every w2 (each expert's inputs are the rows routed to it; experts do not feed each other,
    so they share a run, as GPTQModel does; the router stays dense)."""
    attn, mlp = layer.self_attn, layer.mlp
    if not hasattr(mlp, "experts"):
        return [(lin,) for lin in _linears_in_order(layer)]
    local = [e for e in mlp.experts if hasattr(e, "w13")]  # (ExpertOnAnotherRank holds nothing)
    return [(attn.qkv_proj,), (attn.o_proj,), tuple(e.w13 for e in local), tuple(e.w2 for e in local)]


def _gptq_one(lin: nn.Module, weight: torch.Tensor, H: torch.Tensor, opts: dict[str, Any]) -> QuantizedWeight:
    """GPTQ of one linear's weight on its Hessian H; the dequantized result is written back into the layer."""
    g = opts["group_size"]
    block = 128 if g == -1 or 128 % g == 0 else g
    res = gptq_quantize(weight, H, opts["bits"], g, opts["sym"], opts["percdamp"], block,
                        act_order=opts["act_order"], static_groups=opts["static_groups"],
                        clip_search=opts["grid_search"])
    lin.weight.data.copy_(res.weight_dq.to(lin.weight.dtype))
    return res.qweight


def _gptq_layer(layer: nn.Module, runner: LayerRunner, opts: dict[str, Any],
                reference: tuple[nn.Module, LayerRunner] | None = None) -> dict[nn.Module, QuantizedWeight]:
    """True-sequential GPTQ of one layer, a group of linears at a time (_linear_groups). reference: (the layer's
    unquantized twin, the unquantized walk) for asymmetric calibration (gptq_asym.py; dense MLPs only): each
    linear aims at the unquantized model's outputs. An expert that no calibration token reached has no Hessian:
    it is rounded to nearest on the same grid (GPTQ's objective is flat there)."""
    result = {}
    if reference is not None:
        for lin, twin in zip(_linears_in_order(layer), _linears_in_order(reference[0])):
            acc = PairedInputAccumulator(lin.input_size, device=lin.weight.device)
            accumulate_paired_inputs(layer, reference[0], lin, twin, runner.batches, reference[1].batches, acc)
            weight = asymmetric_target(lin.weight.data, acc.H, acc.D, opts["percdamp"])
            result[lin] = _gptq_one(lin, weight, acc.H, opts)
        return result
    for group in _linear_groups(layer):
        accs = {lin: HessianAccumulator(lin.input_size, device=lin.weight.device) for lin in group}
        runner.run(layer, {lin: acc.add for lin, acc in accs.items()})
        for lin, acc in accs.items():
            if acc.n_samples:
                result[lin] = _gptq_one(lin, lin.weight.data, acc.H, opts)
            else:
                qw = quantize(lin.weight.data, opts["bits"], opts["group_size"], opts["sym"])
                lin.weight.data.copy_(qw.dequantize(lin.weight.dtype))
                result[lin] = qw
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
