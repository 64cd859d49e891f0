"""SmoothQuant W8A8 int8 ("smoothquant"): move the activations' outliers into the weights (Xiao et al. 2023), chapter 7.

An int8 GEMM needs both operands in int8. Weights quantize well (per output channel, 8 bits: ~0.5% error);
activations do not: a few input channels of X carry values 10-100x larger than the rest, in every token,
so a per-token scale set by them leaves the other channels only a handful of the 255 levels. SmoothQuant
notices that these outliers sit in *fixed channels*, and that a per-channel factor can be moved from X to W
for free: X W^T = (X diag(s)^-1) (W diag(s))^T. It picks, per input channel j,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (max over calibration tokens / over output rows)

so that both X/s and W*s have channel ranges ~ max|X_j|^(1-alpha) max|W_j|^alpha: alpha (the migration strength,
0.5 by default, 0.75-0.85 for models with large outliers) sets how much of the difficulty moves to the weights.
diag(s)^-1 is folded into the op that produces X: the RMSNorm weight before q/k/v and gate/up, up_proj's rows
before down_proj (fold_scales_into_rmsnorm / fold_scales_into_linear in awq.py: the same algebra as AWQ, with a
different s). o_proj is left unsmoothed: with grouped KV heads its input cannot be rescaled through v_proj.

Then: int8 weights per output channel (rtn.quantize, symmetric, group -1), int8 activations per token, chosen at
run time (dynamic), the GEMM in int8 with exact int32 accumulation, and y = acc * s_x * s_w in float.
`int8_linear` is that single call site (on CUDA: minillm.kernels.int8_gemm's Triton kernels).

Checkpoints: `weight` int8 [out, in] and `weight_scale` fp32 [out], with the smoothing already folded into the
norms and up_proj of the checkpoint (`"quant_method": "smoothquant"`, `"alpha"`). SmoothQuant needs calibration
data for max|X_j|, so it has no load-time mode: `minillm quantize --method smoothquant`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.hooks import dispatch
from minillm.layers.gemv_dispatch import quantized_gemv_applies, w8a8_gemv_max_m
from minillm.quant.base import (LinearMethod, SkipListQuantizationConfig, add_bias, add_parameter,
                                parse_modules_to_not_convert, require_checkpoint)

INT8_MAX = 127
_TINY = torch.finfo(torch.float32).tiny


def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """s [in] = max|X_j|^alpha / max|W_j|^(1-alpha), W_j over every weight that reads X (q, k and v together)."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha (migration strength) must be in [0, 1], got {alpha!r}")
    if act_absmax.dim() != 1 or any(w.dim() != 2 or w.shape[1] != act_absmax.shape[0] for w in weights) or not weights:
        raise ValueError(f"act_absmax must be [in] and every weight [out, in]; got {tuple(act_absmax.shape)} and "
                         f"{[tuple(w.shape) for w in weights]}")
    return dispatch("ch07.smoothquant_scale", smoothquant_scale)(act_absmax, list(weights), float(alpha))


# >>> exercise ch07.smoothquant_scale
def smoothquant_scale(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factor s [in] = max|X_j|^alpha / max|W_j|^(1 - alpha), in fp32.

    act_absmax [in]: max |X_j| over the calibration tokens. max|W_j| is over the output rows of EVERY weight
    [out_i, in] in `weights` (q, k and v read the same X, so they share one s). Clamp both maxima and the
    result to at least 1e-5: a channel that is never active (or all-zero weights) must not give s = 0 or inf,
    since X / s and W * s are folded into the model. alpha is in [0, 1] (checked by the caller).
    """
    # >>> solution
    w_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp(min=1e-5)
    x_max = act_absmax.float().clamp(min=1e-5)  # a channel never active gets s ~ small, not 0
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
    # <<< solution
# <<< exercise


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: (int8 [..., k], scale fp32 [..., 1]), one scale per token."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=_TINY)
    return torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] int8 @ b [n, k]^T int8 -> int32 [m, n], exact (|sum| <= 127^2 k fits int32 for k < 133,000): the
    reference's integer matmul, in int32 on the CPU (on CUDA int8_linear runs the Triton kernel instead)."""
    return a.to(torch.int32) @ b.to(torch.int32).T


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias), W8A8 int8: THE call site of the int8 GEMM (per-token x scales, per-channel W scales).
    On CUDA, minillm.kernels.int8_gemm's two Triton kernels (int32 accumulation, scales in the epilogue); elsewhere
    the exact reference below (the same integer sums, so the two agree up to the final float rounding). A decode
    step on CUDA of few rows (gemv_dispatch.w8a8_gemv_max_m, bf16/fp16) leaves x unquantized (W8A16):
    the product is bound by reading the int8 weight, so quantizing x would only add a launch and an error, and
    minillm.kernels.gemv converts the codes in registers (as fp8_linear does)."""
    shape = x.shape
    if quantized_gemv_applies(x, w8a8_gemv_max_m(qweight)):
        from minillm.kernels.gemv import gemv
        return gemv(x, qweight, bias, weight_scale=weight_scale)
    if x.is_cuda:
        from minillm.kernels.int8_gemm import int8_gemm, per_token_quant_int8
        xq, x_scale = per_token_quant_int8(x)
        return int8_gemm(xq, qweight, x_scale, weight_scale, bias, out_dtype=x.dtype).reshape(
            *shape[:-1], qweight.shape[0])
    xq, x_scale = quantize_int8_per_token(x.reshape(-1, shape[-1]))
    y = int8_matmul(xq, qweight).float() * x_scale * weight_scale.float()
    y = y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])
    return y if bias is None else y + bias


class Int8W8A8LinearMethod(LinearMethod):
    """int8 `weight` [out, in] + fp32 `weight_scale` [out] from the checkpoint; int8_linear at run time."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype | None) -> None:
        add_parameter(layer, "weight", torch.zeros(output_size, input_size, dtype=torch.int8))
        add_parameter(layer, "weight_scale", torch.ones(output_size, dtype=torch.float32))
        add_bias(layer, output_size, bias, dtype)

    def decode_codes(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """int8_linear's decode GEMV (the same rule), for Linear's fused RMSNorm / SwiGLU."""
        return (layer.weight, layer.weight_scale) if quantized_gemv_applies(x, w8a8_gemv_max_m(layer.weight)) else None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_linear(x, layer.weight, layer.weight_scale, bias)


class SmoothQuantConfig(SkipListQuantizationConfig):
    name = "smoothquant"
    serialized = True  # no load-time mode: the checkpoint holds int8 weights

    def __init__(self, alpha: float, modules_to_not_convert: tuple[str, ...] = ()) -> None:
        self.alpha, self.modules_to_not_convert = alpha, modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SmoothQuantConfig":
        require_checkpoint(config, "smoothquant", "calibration data (max |X_j| per channel)")
        alpha = config.get("alpha", 0.5)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha!r}")
        return cls(float(alpha), parse_modules_to_not_convert(config, "smoothquant"))

    def make_method(self) -> LinearMethod:
        return Int8W8A8LinearMethod()

    def stored_shapes(self, output_size: int, input_size: int) -> dict[str, tuple[int, ...]] | None:
        return {"weight": (output_size, input_size), "weight_scale": (output_size,)}
