"""Calibrated FP8 W8A8: SmoothQuant migration searched per layer, GPTQ on the e4m3 grid, MSE weight scales (ch. 7-8).

Plain FP8 W8A8 (fp8.py) rounds each weight and each activation to e4m3 on its own. e4m3 keeps 3 mantissa bits,
so every value moves by up to 1/16 of itself (about 2.4% RMS): on SmolLM2-135M that costs +3.4% perplexity,
two thirds of it from the weights. Nothing here changes the number format or the GEMM (every linear is still
an e4m3 x e4m3 product with a per-channel weight scale and a per-token activation scale, the checkpoint is an
ordinary `"quant_method": "fp8"` one); calibration only chooses *which* e4m3 numbers to store:

1. SmoothQuant migration (Xiao et al. 2023; smoothquant.py): X W^T = (X / s)(W s)^T, s folded into the RMSNorm
   before q/k/v and gate/up and into up_proj's rows before down_proj. A float grid's error is relative, so
   moving range between X and W matters much less than for int8: rescaling a value by s leaves its relative
   rounding error alone, except that it moves the e4m3 points (the per-token scale always lands a token's
   largest value exactly on 448). Underflow is not what hurts: on SmolLM2 a 3-bit-mantissa rounding with no
   exponent limit at all did worse than per-token e4m3, because it no longer keeps each token's largest
   (most important) value exact. So smoothing is searched, not assumed: `alpha="search"` tries each alpha of
   `alphas` and no smoothing per linear on calibration tokens and keeps the least quantized output error.
2. MSE weight scales (the clip search of AWQ and of vLLM/llm-compressor's "mse" observer): a row's scale need
   not map its max to exactly 448. Candidates max|W_i| * c / 448, c in (0.5, 1], shift where the e4m3 points
   fall (and clip the largest values a little); each row keeps the c with the least error weighted by
   E[x_j^2], the diagonal of the layer's Hessian. c = 1 is a candidate, so the result is never worse than
   plain on that objective.
3. GPTQ on the e4m3 grid (Frantar et al. 2022; gptq.py): columns are rounded left to right, each rounding
   error pushed onto the columns not yet rounded through the inverse Hessian of the layer's real inputs, so
   ||X W^T - X Q^T|| stays small even where single weights move by 6%. Only the grid differs from gptq.py:
   q = scale * e4m3(w / scale) instead of integer codes.

`fp8_calibrated_layer` runs the three on one decoder layer inside quantize_model's layer walk (driver.py); the
walk then runs the layer with fp8 weights *and* fp8 per-token activations (forward pre-hooks), so later layers
calibrate on what the fp8 model will really feed them. The LM head (the tied token embedding) stays unquantized,
as in vLLM's FP8 checkpoints.

Measured (benchmarks/quant_quality.py, CPU, 16 x 256 held-out tokens, 16 x 256 calibration): fp32 18.999, plain
fp8 19.602 (+3.2%), this recipe with alpha="search", gptq and mse_scale 19.325 (+1.7%); gptq alone 19.256 (+1.35%),
gptq + mse_scale 19.279 (+1.5%). GPTQ carries the gain; the other two stay within run-to-run noise (~0.3%).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from minillm.hooks import dispatch
from minillm.quant.awq import fold_scales_into_linear, fold_scales_into_rmsnorm
from minillm.quant.fp8 import FP8_DTYPE, quantize_fp8_per_token
from minillm.quant.gptq import HessianAccumulator, _inverse_hessian_cholesky, gptq_column_update
from minillm.quant.rtn import QuantizedWeight
from minillm.quant.smoothquant import smoothing_factors

E4M3_MAX = 448.0
DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
_TINY = torch.finfo(torch.float32).tiny


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """x (already divided by its scale) saturated to +-448 and rounded to the nearest e4m3 value, back in fp32."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).float()


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """What fp8_linear does to its input: per-token e4m3 (scale max|x_t| / 448), dequantized, in x's dtype."""
    x8, scale = quantize_fp8_per_token(x)
    return (x8.float() * scale).to(x.dtype)


def fp8_weight_scales(w: torch.Tensor, importance: torch.Tensor | None = None, grid: int = 16,
                      min_ratio: float = 0.5) -> torch.Tensor:
    """Per-row scales [out] minimising sum_j importance_j (w_ij - scale_i e4m3(w_ij / scale_i))^2.

    Candidates: scale = max|W_i| * c / 448 for `grid` values of c from `min_ratio` to 1 (c < 1 saturates the
    row's largest values at +-448 * scale). importance [in] (E[x_j^2]; None = all ones) weights the columns.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating [out, in] tensor, got {tuple(w.shape)} {w.dtype}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid (number of candidate scales) must be a positive int, got {grid!r}")
    if not 0 < min_ratio <= 1:
        raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio!r}")
    w = w.float()
    imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance.float().to(w.device)
    if imp.shape != (w.shape[1],):
        raise ValueError(f"importance must be [{w.shape[1]}] (one weight per input column), got {tuple(imp.shape)}")
    amax = w.abs().amax(dim=1).clamp(min=_TINY)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / E4M3_MAX
    for c in torch.linspace(1.0, min_ratio, grid).tolist():  # c = 1 first: ties keep the plain scale
        scale = (amax * c / E4M3_MAX).clamp(min=_TINY)
        err = ((w - e4m3_round(w / scale[:, None]) * scale[:, None]) ** 2 * imp).sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best


def gptq_fp8(w: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, percdamp: float = 0.01,
             block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop with q = scale * e4m3(w / scale): (W8 float8_e4m3fn [out, in], dequantized fp32 [out, in]).

    w [out, in], H [in, in] the layer's input Hessian (HessianAccumulator.H), scale [out] fixed before the loop
    (fp8_weight_scales), as gptq.py fixes a per-channel grid. Same dead-column rule and dampening as gptq.py.
    """
    out_f, in_f = w.shape
    if H.shape != (in_f, in_f) or scale.shape != (out_f,):
        raise ValueError(f"H must be [{in_f}, {in_f}] and scale [{out_f}] for w {tuple(w.shape)}; got "
                         f"{tuple(H.shape)} and {tuple(scale.shape)}")
    if not 0 <= percdamp < 1:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp}")
    W = w.detach().float().clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_hessian_cholesky(H, percdamp)
    s = scale.float().to(W.device)
    codes = torch.empty(out_f, in_f, dtype=FP8_DTYPE, device=W.device)
    column_update = dispatch("ch08.gptq_column_update", gptq_column_update)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            c = (W1[:, i] / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
            codes[:, i1 + i] = c
            Err1[:, i] = column_update(W1, U1, i, c.float() * s)
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes, codes.float() * s[:, None]


def quantized_output_error(x: torch.Tensor, weights: Sequence[torch.Tensor], s: torch.Tensor | None,
                           mse_scale: bool = False) -> float:
    """||X W^T - fp8(X / s) fp8(W s)^T||^2 / ||X W^T||^2 with round-to-nearest per-channel weights (scales from
    fp8_weight_scales when mse_scale) and per-token activations; s None: no smoothing. weights: the matrices
    that read X, concatenated by rows (q, k and v together)."""
    w = torch.cat([t.float() for t in weights])
    ws, xs = (w, x) if s is None else (w * s[None, :], x / s[None, :])
    if mse_scale:
        scale = fp8_weight_scales(ws, (xs ** 2).mean(dim=0))[:, None]
    else:
        scale = (ws.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=_TINY)
    wq = e4m3_round(ws / scale) * scale
    ref = x @ w.T
    return float(((fake_quant_per_token(xs) @ wq.T - ref) ** 2).sum() / (ref ** 2).sum().clamp(min=_TINY))


def search_smoothing(x: torch.Tensor, act_absmax: torch.Tensor, weights: Sequence[torch.Tensor],
                     alphas: Sequence[float] = DEFAULT_ALPHAS, mse_scale: bool = False
                     ) -> tuple[float | None, torch.Tensor | None]:
    """(alpha, s) with the least quantized_output_error on calibration tokens x [tokens, in]; (None, None) when
    no alpha beats leaving the layer unsmoothed. act_absmax [in]: max|X_j| over all calibration tokens."""
    best_alpha, best_s, best_err = None, None, quantized_output_error(x, weights, None, mse_scale)
    for alpha in alphas:
        s = smoothing_factors(act_absmax, list(weights), float(alpha))
        err = quantized_output_error(x, weights, s, mse_scale)
        if err < best_err:
            best_alpha, best_s, best_err = float(alpha), s, err
    return best_alpha, best_s


FP8_RECIPE = ("fp8_smooth_alpha", "fp8_gptq", "fp8_mse_scale")  # quantize_model's options that calibrate fp8


def check_fp8_recipe(alpha: Any, gptq: Any, mse_scale: Any, alphas: Any, search_tokens: Any,
                      per_channel: bool) -> bool:
    """ValueError naming a bad fp8 recipe option; True when the recipe needs calibration."""
    if alpha is not None and alpha != "search" and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                                    or not 0 <= alpha <= 1):
        raise ValueError(f"fp8_smooth_alpha must be None, a float in [0, 1] or 'search', got {alpha!r}")
    if not isinstance(gptq, bool) or not isinstance(mse_scale, bool):
        raise ValueError(f"fp8_gptq and fp8_mse_scale must be bools, got {gptq!r} and {mse_scale!r}")
    if not alphas or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in alphas):
        raise ValueError(f"fp8_alphas must be a non-empty sequence of floats in [0, 1], got {alphas!r}")
    if isinstance(search_tokens, bool) or not isinstance(search_tokens, int) or search_tokens < 1:
        raise ValueError(f"fp8_search_tokens must be a positive int, got {search_tokens!r}")
    calibrated = alpha is not None or gptq or mse_scale
    if calibrated and not per_channel:
        raise ValueError("the calibrated fp8 recipe quantizes weights per output channel; got fp8_per_channel=False")
    return calibrated


class _Calibration:
    """One pass over a layer's calibration batches: the Hessian, max|X_j| and every `stride`-th token per linear."""

    def __init__(self, linears: Sequence[nn.Module], stride: int) -> None:
        self.stride = stride
        self.hessian = {m: HessianAccumulator(m.input_size, dtype=torch.float32, device=m.weight.device)
                        for m in linears}
        self.absmax = {m: torch.zeros(m.input_size, device=m.weight.device) for m in linears}
        self.samples: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in linears}

    def observer(self, m: nn.Module) -> Callable[[torch.Tensor], None]:
        def observe(x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float()
            self.hessian[m].add(x)
            torch.maximum(self.absmax[m], x.abs().amax(dim=0), out=self.absmax[m])
            self.samples[m].append(x[::self.stride].clone())
        return observe

    def tokens(self, m: nn.Module) -> torch.Tensor:
        return torch.cat(self.samples[m])


def _fp8_activation_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (fake_quant_per_token(args[0]),) + tuple(args[1:])


@dataclass
class Fp8Linear:
    """One linear's calibrated fp8 form: W s ~= codes * scale[:, None]; `smooth` s [in] (None: unsmoothed) must be
    divided out of the linear's input by whatever produces it (an RMSNorm's weight, up_proj's rows)."""

    codes: torch.Tensor
    scale: torch.Tensor
    smooth: torch.Tensor | None
    alpha: float | None


def quantize_linear_fp8(w: torch.Tensor, H: torch.Tensor, act_absmax: torch.Tensor | None = None,
                        tokens: torch.Tensor | None = None, *, alpha: float | str | None = None, gptq: bool = True,
                        mse_scale: bool = True, alphas: Sequence[float] = DEFAULT_ALPHAS,
                        percdamp: float = 0.01) -> Fp8Linear:
    """The recipe on one weight w [out, in] whose inputs X have Hessian H [in, in] (HessianAccumulator.H),
    per-channel max act_absmax [in] and a sample `tokens` [n, in] (both needed only when smoothing).

    alpha: None (no smoothing), a float in [0, 1] (SmoothQuant's s at that alpha) or "search" (search_smoothing
    over `alphas`); mse_scale: fp8_weight_scales weighted by diag(H), else max|W_i| / 448; gptq: gptq_fp8, else
    round to nearest. With alpha=None, gptq=False, mse_scale=False this is plain quantize_fp8.
    """
    check_fp8_recipe(alpha, gptq, mse_scale, alphas, 1, True)
    w = w.detach().float()
    if H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"H must be [{w.shape[1]}, {w.shape[1]}] for w {tuple(w.shape)}, got {tuple(H.shape)}")
    if alpha is not None and (act_absmax is None or (alpha == "search" and tokens is None)):
        raise ValueError(f"smoothing (alpha={alpha!r}) needs act_absmax, and the search needs calibration tokens")
    s, chosen = None, None
    if alpha == "search":
        chosen, s = search_smoothing(tokens.float(), act_absmax, [w], alphas, mse_scale)
    elif alpha is not None:
        chosen, s = float(alpha), smoothing_factors(act_absmax, [w], float(alpha))
    if s is not None:
        w = w * s[None, :]
        H = H / s[:, None] / s[None, :]  # the Hessian of the new input X / s
    if mse_scale:
        scale = fp8_weight_scales(w, torch.diag(H))
    else:
        scale = (w.abs().amax(dim=1) / E4M3_MAX).clamp(min=_TINY)
    if gptq:
        codes, _ = gptq_fp8(w, H, scale, percdamp)
    else:
        codes = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return Fp8Linear(codes, scale, s, chosen)


def fp8_calibrated_layer(layer: nn.Module, runner: Any, opts: dict[str, Any]) -> dict[nn.Module, QuantizedWeight]:
    """Quantize one decoder layer's four linears to fp8 in place (smoothing folded, weights dequantized back).

    opts: fp8_smooth_alpha (None, a float in [0, 1], or "search"), fp8_gptq (bool), fp8_mse_scale (bool),
    percdamp, fp8_alphas and fp8_search_tokens (the alpha search). Returns each linear's e4m3 codes as a
    QuantizedWeight (codes float8_e4m3fn, scales [out, 1]) for the driver's export.
    """
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    n_tokens = sum(batch[2].shape[0] for batch in runner.batches)  # (positions, metadata, hidden, residual)
    calib = _Calibration((qkv, o, gate_up, down), max(1, -(-n_tokens // opts["fp8_search_tokens"])))
    runner.run(layer, {m: calib.observer(m) for m in (qkv, o, gate_up, down)})
    inter = gate_up.output_sizes[0]
    result = {}
    # o_proj stays unsmoothed: with grouped KV heads v_proj cannot absorb its factor
    for lin, producer in ((down, "up"), (gate_up, layer.post_attention_layernorm), (qkv, layer.input_layernorm),
                          (o, None)):
        r = quantize_linear_fp8(lin.weight.data, calib.hessian[lin].H, calib.absmax[lin], calib.tokens(lin),
                                alpha=opts["fp8_smooth_alpha"] if producer is not None else None,
                                gptq=opts["fp8_gptq"], mse_scale=opts["fp8_mse_scale"], alphas=opts["fp8_alphas"],
                                percdamp=opts["percdamp"])
        if r.smooth is not None and producer == "up":  # silu(gate) * up commutes with a per-channel factor
            up = gate_up.weight.data[inter:]
            up.copy_(fold_scales_into_linear(up, r.smooth)[0])
        elif r.smooth is not None:
            producer.weight.data.copy_(fold_scales_into_rmsnorm(producer.weight.data, r.smooth))
        lin.weight.data.copy_((r.codes.float() * r.scale[:, None]).to(lin.weight.dtype))
        lin.register_forward_pre_hook(_fp8_activation_hook)  # the walk's private copy: later layers see fp8 inputs
        result[lin] = QuantizedWeight(r.codes, r.scale[:, None], None, 8, -1, True)
    return result
