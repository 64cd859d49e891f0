"""AWQ scales searched on each block's real output and folded into a dense model (chapters 7-8).

awq.py searches one scale vector per group of linears sharing an input, scoring each alpha by those
linears' own outputs. The AWQ paper and its reference code (llm-awq, AutoAWQ) score a wider module: the
scales of q/k/v are judged by the *attention block's* output (after softmax, the heads and o_proj), the
scales of gate/up by the *MLP's* output (after SiLU-and-multiply and down_proj). That is what the model
feeds forward, and it weighs errors as the block does: a q/k error that barely moves the softmax costs
little, a gate error on a channel that SiLU zeroes costs nothing. Only down_proj is scored alone, since
nothing follows it inside the block. o_proj gets the clip search only: its scales could fold into v_proj's
rows only without grouped KV heads (SmolLM2, Llama 3 and Mistral all group them), and are not searched here.

Two more details of the reference, both here:
- "duo scaling" (AutoAWQ's default): s = mean|x|^alpha / mean|w_hat|^(1 - alpha), where w_hat is each
  weight divided by its group's max|w| (weight_salience). A column whose weights are already large in
  their groups needs less help than one whose weights are small; alpha = 0 still gives s = 1-ish scales.
- the scales of one layer are all searched on the layer as it came in, then folded together, then the clip
  search runs on the scaled weights with the scaled inputs (awq.search_clip) and clips them in place.

What comes out is still a dense model computing (up to the clipping) the same function, with
input_layernorm / post_attention_layernorm / up_proj divided by the scales and the linears multiplied by
them. Any weight-only quantizer can follow: RTN (that is AWQ) or GPTQ (the "AWQ + GPTQ" recipe:
minillm.quant.recipes), since rounding a scaled weight with error feedback only adds to what the scales did.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minillm.forward_context import forward_context
from minillm.quant.awq import _clip, fold_scales_into_linear, fold_scales_into_rmsnorm, search_clip
from minillm.quant.rtn import check_quant_args, fake_quantize

__all__ = ["weight_salience", "search_block_scales", "awq_scale_layer"]


def weight_salience(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """mean over output rows of |w| / max|w| of its group, per input column [in]: AutoAWQ's w_mean."""
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    w = weight.float().abs().reshape(out_f, in_f // g, g)
    return (w / (w.amax(dim=-1, keepdim=True) + 1e-6)).reshape(out_f, in_f).mean(dim=0)


def search_block_scales(weight: torch.Tensor, x_mean: torch.Tensor, block_error: Callable[[torch.Tensor], float],
                        bits: int, group_size: int, n_grid: int = 20, duo_scaling: bool = True
                        ) -> tuple[torch.Tensor, float, list[float]]:
    """Grid-search alpha in {0, 1/n_grid, ...}: (scales [in], alpha, errors), scored by `block_error`.

    weight [out, in]: every linear reading the input, stacked by rows (q/k/v, or gate/up); x_mean [in] =
    mean|x|. `block_error(W_candidate)` runs the block with W replaced by Q(W * s) / s (the quantized
    weight seen from the unscaled input) and returns how far its output moved.
    """
    check_quant_args(weight, bits, group_size)
    if x_mean.shape != (weight.shape[1],):
        raise ValueError(f"x_mean must be [{weight.shape[1]}], got {tuple(x_mean.shape)}")
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    w = weight.float()
    x_mean = x_mean.float().clamp(min=1e-4)  # a channel never active would give s = 0 and 1/s = inf
    w_mean = weight_salience(w, group_size)
    best, errors = (float("inf"), 0.0, torch.ones_like(x_mean)), []
    for step in range(n_grid):
        alpha = step / n_grid
        s = x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if duo_scaling else x_mean.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centred on 1, as awq.awq_scale_step
        err = block_error(fake_quantize(w * s, bits, group_size, False) / s)
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errors


def _replaced_output(linear: nn.Module, weight: torch.Tensor) -> Callable[[], None]:
    """Make `linear` return x W^T with this weight (a forward hook's return value replaces the output), so
    candidates are tried without writing the layer's weight; call the result to undo."""
    bias = getattr(linear, "bias", None)
    handle = linear.register_forward_hook(lambda m, inputs, out: F.linear(inputs[0], weight.to(out.dtype), bias))
    return handle.remove


def _squared_error(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    return sum(float(((o.float() - r.float()) ** 2).sum()) for o, r in zip(outs, refs))


@torch.no_grad()
def awq_scale_layer(layer: nn.Module, batches: list[tuple], bits: int, group_size: int, n_grid: int = 20,
                    duo_scaling: bool = True, clip: bool = True, clip_tokens: int = 512,
                    max_tokens: int | None = None) -> dict[str, float]:
    """AWQ on one decoder layer, in place: search scales on block outputs, fold them, clip the weights.

    `batches`: LayerRunner.batches, (positions, attention metadata, hidden, residual) per calibration batch,
    the layer's inputs; the search runs n_grid block forwards per group of linears, so `max_tokens` keeps
    only the first batches holding that many tokens (whole sequences: attention needs them). Returns the
    chosen alpha per group of linears. The layer stays dense.
    """
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
        sizes = torch.tensor([b[2].shape[0] for b in batches]).cumsum(0)
        batches = batches[:int((sizes < max_tokens).sum()) + 1]
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    seen: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in (qkv, o, gate_up, down)}
    handles = [m.register_forward_hook(lambda mod, inp, out: seen[mod].append(inp[0].detach()))
               for m in seen]
    try:
        for positions, meta, hidden, residual in batches:
            with forward_context(meta):
                layer(positions, hidden, residual)
    finally:
        for h in handles:
            h.remove()
    x_attn, x_mlp, x_down = seen[qkv], seen[gate_up], seen[down]

    def run_attn() -> list[torch.Tensor]:
        outs = []
        for (positions, meta, *_), x in zip(batches, x_attn):
            with forward_context(meta):
                outs.append(attn(positions, x))
        return outs

    def scored(linear: nn.Module, run: Callable[[], list[torch.Tensor]]) -> Callable[[torch.Tensor], float]:
        refs = run()

        def block_error(candidate: torch.Tensor) -> float:
            undo = _replaced_output(linear, candidate)
            try:
                return _squared_error(run(), refs)
            finally:
                undo()
        return block_error

    mean_abs = lambda xs: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).float().abs().mean(dim=0)
    plan = [(qkv, x_attn, scored(qkv, run_attn)),
            (gate_up, x_mlp, scored(gate_up, lambda: [mlp(x) for x in x_mlp])),
            (down, x_down, scored(down, lambda: [down(x) for x in x_down]))]
    scales, alphas = {}, {}
    for linear, xs, block_error in plan:  # every search sees the layer as it came in
        scales[linear], alphas[linear], _ = search_block_scales(linear.weight.data, mean_abs(xs), block_error,
                                                                bits, group_size, n_grid, duo_scaling)
    # fold: 1/s into the op that produces each input, s into the linears that read it (exact in real arithmetic)
    inter = gate_up.output_sizes[0]
    for norm, linear in ((layer.input_layernorm, qkv), (layer.post_attention_layernorm, gate_up)):
        norm.weight.data.copy_(fold_scales_into_rmsnorm(norm.weight.data, scales[linear]))
    up = gate_up.weight.data[inter:]
    up.copy_(fold_scales_into_linear(up, scales[down])[0])  # silu(gate) * up commutes with a channel scale
    for linear in (qkv, gate_up, down):
        linear.weight.data.mul_(scales[linear].to(linear.weight.dtype))
    if clip:  # on the scaled weights and inputs; q and k rows keep their range (their error is the softmax's)
        inputs = {qkv: x_attn, o: seen[o], gate_up: x_mlp, down: x_down}
        for linear, xs in inputs.items():
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).float()
            x = x / scales[linear] if linear in scales else x
            rows = slice(qkv.q_size + qkv.kv_size, None) if linear is qkv else slice(None)
            w = linear.weight.data[rows]
            w.copy_(_clip(w, search_clip(w, x, bits, group_size, max_tokens=clip_tokens)).to(w.dtype))
    names = {qkv: "qkv_proj", gate_up: "gate_up_proj", down: "down_proj"}
    return {names[m]: a for m, a in alphas.items()}
