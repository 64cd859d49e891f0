"""AWQ: activation-aware weight quantization (Lin et al. 2023), chapters 7-8.

AWQ ("AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration") starts from an
observation: a small fraction (~1%) of a layer's input channels, the *salient* ones, matter far more than the
rest, and they are found by the size of the activations that flow through them, not of the weights. LLM
activations have a few outlier channels tens of times larger than the others; a rounding error on a weight in
such a column is multiplied by that large input. Keeping those columns in fp16 would help but breaks the
uniform kernel; AWQ instead *scales* them: for any s > 0, W x = (W diag(s)) (diag(s)^-1 x), and rounding W s
with s > 1 on a salient column shrinks that column's error relative to its weight (the group's scale is set
by other, larger weights, so the absolute error stays ~the same while the weight grew). No backpropagation,
no reconstruction: only a 1-D search.

The search (search_scales): s = s_x^alpha, s_x = mean |x| per input channel, for alpha on a grid in [0, 1),
normalised so that sqrt(max s * min s) = 1; keep the alpha whose quantized block reproduces the original block
output best, ||Q(W s)(x / s) - W x||. All linears reading the same input (q/k/v after input_layernorm,
gate/up after post_attention_layernorm, down after up) share one s, since 1/s must be folded into the one
op that produces that input: fold_scales_into_rmsnorm (the norm's weight) or fold_scales_into_linear (the
previous linear's output rows: up_proj for down_proj; v_proj for o_proj only without grouped KV heads).
The fold is exact in real arithmetic, so the model before quantization computes the same function.

Then a clipping search (search_clip): per output row and group, shrink the range to ratio * max|w| for
ratio in 1.0, 0.95, ..., 0.5 and keep the ratio with the smallest output error of that group; clipping a rare
large weight buys a finer grid for all the others. The reference skips it for q/k, whose output error does
not measure attention-score error well; callers pass clip=False there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.hooks import dispatch
from minillm.quant.rtn import QuantizedWeight, check_quant_args, fake_quantize, quantize

__all__ = ["AWQResult", "activation_scale", "awq_scale_step", "search_scales", "search_clip", "awq_quantize",
           "fold_scales_into_rmsnorm", "fold_scales_into_linear"]


@dataclass
class AWQResult:
    """Per-input-channel `scales` [in] (fold 1/scales into the previous op), the chosen `alpha`, each
    linear's quantized W * scales (clipped), the block output error of every alpha tried (`grid_errors`),
    and each linear's clip threshold [out, n_groups] (None where clipping was off)."""

    scales: torch.Tensor
    alpha: float
    qweights: list[QuantizedWeight]
    grid_errors: list[float]
    clip_max: list[torch.Tensor | None]


def _check(weights: list[torch.Tensor], x: torch.Tensor, bits: int, group_size: int) -> None:
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError("weights must be a non-empty list of [out, in] tensors sharing one input")
    for w in weights:
        check_quant_args(w, bits, group_size)
        if w.shape[1] != weights[0].shape[1]:
            raise ValueError(f"all weights must share in_features; got {[tuple(w.shape) for w in weights]}")
    if x.dim() != 2 or x.shape[1] != weights[0].shape[1] or x.shape[0] == 0:
        raise ValueError(f"x must be [n_tokens >= 1, {weights[0].shape[1]}], got {tuple(x.shape)}")


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """s_x [in] = mean over tokens of |x|: how much each input channel carries (the salience AWQ uses)."""
    return x.reshape(-1, x.shape[-1]).float().abs().mean(dim=0)


# >>> exercise ch08.awq_scale_step
def awq_scale_step(x: torch.Tensor, weights: list[torch.Tensor], s_x: torch.Tensor,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One point of AWQ's scale search: the per-channel scales for `alpha` and the problem they turn W x into.

    x [n_tokens, in] fp32, weights: fp32 [out_i, in] sharing that input, s_x [in] > 0: mean |x| per channel.
    s = s_x^alpha, then divided by sqrt(max(s) * min(s)) so the scales are centred on 1 (their largest and
    smallest are reciprocal). Return (s [in], x / s, [W * s for each W]): x / s times (W * s)^T is x W^T again,
    and the caller quantizes each W * s and measures how far the block output moves.
    """
    # >>> solution
    s = s_x.pow(alpha)
    s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 so neither grid end saturates
    return s, x / s, [w * s for w in weights]  # salient columns (s > 1) grow: their rounding error shrinks
    # <<< solution
# <<< exercise


def search_scales(weights: list[torch.Tensor], x: torch.Tensor, bits: int = 4, group_size: int = 128,
                  symmetric: bool = False, n_grid: int = 20) -> tuple[torch.Tensor, float, list[float]]:
    """Grid-search alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}: (best scales [in], best alpha, errors)."""
    _check(weights, x, bits, group_size)
    if not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    x = x.float()
    ws = [w.float() for w in weights]
    refs = [x @ w.T for w in ws]
    s_x = activation_scale(x).clamp(min=1e-4)  # a channel that is never active would give s = 0 and 1/s = inf
    best = (float("inf"), 0.0, torch.ones_like(s_x))
    errors = []
    scale_step = dispatch("ch08.awq_scale_step", awq_scale_step)
    for step in range(n_grid):
        alpha = step / n_grid
        s, xs, scaled = scale_step(x, ws, s_x, alpha)
        err = sum(float(((xs @ fake_quantize(w_s, bits, group_size, symmetric).T - ref) ** 2).sum())
                  for w_s, ref in zip(scaled, refs)) / (x.shape[0] * sum(w.shape[0] for w in ws))
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errors


def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int = 128,
                symmetric: bool = False, n_grid: int = 20, max_shrink: float = 0.5,
                max_tokens: int = 512, rows_per_batch: int = 256) -> torch.Tensor:
    """Best clip threshold max|w| * ratio per [out, n_groups], ratio = 1 - k/n_grid down to 1 - max_shrink.

    The error of a group is that of its own partial output, x_g w_g^T over the group's input columns;
    `max_tokens` evenly spaced tokens and `rows_per_batch` output rows at a time bound the memory.
    """
    _check([weight], x, bits, group_size)
    if not 0 <= max_shrink < 1:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink}")
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    idx = torch.linspace(0, x.shape[0] - 1, min(max_tokens, x.shape[0]), device=x.device).long()
    xg = x[idx].float().reshape(len(idx), in_f // g, g)  # [t, n_groups, g]
    best_max = torch.empty(out_f, in_f // g, dtype=torch.float32, device=weight.device)
    for r0 in range(0, out_f, rows_per_batch):
        w = weight[r0:r0 + rows_per_batch].float().reshape(-1, in_f // g, g)  # [o, n_groups, g]
        ref = torch.einsum("tng,ong->otn", xg, w)
        org_max = w.abs().amax(dim=-1)  # [o, n_groups]
        best_err = torch.full_like(org_max, float("inf"))
        best = org_max.clone()
        for k in range(int(max_shrink * n_grid) + 1):
            m = org_max * (1 - k / n_grid)
            wc = torch.maximum(torch.minimum(w, m[..., None]), -m[..., None])
            q = fake_quantize(wc.reshape(w.shape[0], in_f), bits, group_size, symmetric).reshape(w.shape)
            err = ((torch.einsum("tng,ong->otn", xg, q) - ref) ** 2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, m, best)
        best_max[r0:r0 + rows_per_batch] = best
    return best_max


def _clip(weight: torch.Tensor, clip_max: torch.Tensor) -> torch.Tensor:
    out_f, in_f = weight.shape
    w = weight.float().reshape(out_f, clip_max.shape[1], -1)
    m = clip_max[..., None]
    return torch.maximum(torch.minimum(w, m), -m).reshape(out_f, in_f)


def awq_quantize(weights: list[torch.Tensor], x: torch.Tensor, bits: int = 4, group_size: int = 128,
                 symmetric: bool = False, n_grid: int = 20, clip: bool | list[bool] = True) -> AWQResult:
    """AWQ for linears sharing input x [n_tokens, in]: scale search, per-linear clip search, RTN of W * s.

    The quantized weights expect the input x / scales: fold the scales into the previous op before use.
    `clip` is one flag or one per weight (False for q/k projections, as the reference does).
    """
    _check(weights, x, bits, group_size)
    clips = [clip] * len(weights) if isinstance(clip, bool) else list(clip)
    if len(clips) != len(weights):
        raise ValueError(f"clip must be a bool or one bool per weight ({len(weights)}), got {clip!r}")
    scales, alpha, errors = search_scales(weights, x, bits, group_size, symmetric, n_grid)
    xs = x.float() / scales
    qweights, clip_max = [], []
    for w, do_clip in zip(weights, clips):
        ws = w.float() * scales
        m = search_clip(ws, xs, bits, group_size, symmetric, n_grid) if do_clip else None
        qweights.append(quantize(ws if m is None else _clip(ws, m), bits, group_size, symmetric))
        clip_max.append(m)
    return AWQResult(scales=scales, alpha=alpha, qweights=qweights, grid_errors=errors, clip_max=clip_max)


def fold_scales_into_rmsnorm(norm_weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """RMSNorm weight [hidden] / scales: the norm now emits x / s, which the scaled weights W * s expect."""
    if norm_weight.dim() != 1 or scales.shape != norm_weight.shape:
        raise ValueError(f"norm_weight must be 1-D and scales the same shape, got {tuple(norm_weight.shape)} "
                         f"and {tuple(scales.shape)}")
    return (norm_weight.float() / scales.float()).to(norm_weight.dtype)


def fold_scales_into_linear(prev_weight: torch.Tensor, scales: torch.Tensor,
                            prev_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Previous linear's output rows / scales (and its bias), e.g. up_proj before down_proj.

    Exact only when nothing nonlinear sits in between on that path: up_proj's output is multiplied
    elementwise by silu(gate), which commutes with a per-channel scale; gate_proj itself must not be folded.
    """
    if prev_weight.dim() != 2 or scales.shape != (prev_weight.shape[0],):
        raise ValueError(f"scales must be [{prev_weight.shape[0] if prev_weight.dim() == 2 else '?'}] "
                         f"(the previous linear's out_features), got {tuple(scales.shape)} for weight "
                         f"{tuple(prev_weight.shape)}")
    w = (prev_weight.float() / scales.float()[:, None]).to(prev_weight.dtype)
    b = None if prev_bias is None else (prev_bias.float() / scales.float()).to(prev_bias.dtype)
    return w, b
