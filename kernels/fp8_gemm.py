"""FP8 W8A8 linear layers: dynamic per-token FP8 quantization of activations and the scaled FP8 GEMM (chapters 7-8).

FP8 e4m3 (4 exponent bits, 3 mantissa bits, max 448) keeps a floating grid: relative error about 2^-4 at
every magnitude, so a single scale per token row (activations) and per output channel (weights) is enough,
with no zero point. Hopper's tensor cores multiply e4m3 x e4m3 at twice the bf16 rate, accumulating in fp32:

    x [M, K] bf16 --per_token_quant_fp8--> x_q e4m3 [M, K], x_scale fp32 [M, 1]      (x ~= x_q * x_scale)
    y = scaled_mm(x_q, w_q [N, K] e4m3, x_scale, w_scale [N] or [1])  -> bf16 [M, N]   (kernels/scaled_mm.py)

The activation quantizer is one Triton program per row: pass 1 finds max |x|, pass 2 divides by
scale = max / 448 (clamped away from 0), saturates to +-448 and rounds to e4m3 (round-to-nearest-even in
Triton's fp32 -> fp8e4nv cast on the GPU). Weights are quantized once, offline, by the quantization
method (minillm.quant.fp8.quantize_fp8), whose call site fp8_linear runs these two kernels. On CPU the
interpreter's fp32 -> fp8 cast fails to carry a round-up into the next power of two (it yields half the
value): the CPU test allows exactly those codes; the GEMM itself is exercised there on the same fp8 values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.scaled_mm import scaled_mm

__all__ = ["FP8_MAX", "per_token_quant", "per_token_quant_fp8", "fp8_gemm"]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_MIN_SCALE = 1e-12  # an all-zero row gets this scale and quantizes to exact zeros


@triton.jit
def _per_token_quant_kernel(X, Q, SCALE, K, stride_x, stride_q, QMAX: tl.constexpr, IS_INT: tl.constexpr,
                            MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Shared by the fp8 and int8 quantizers: one program per row, scale = max|x| / QMAX, q = x / scale."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / QMAX, MIN_SCALE)
    tl.store(SCALE + row, scale)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x * inv, -QMAX), QMAX)
        if IS_INT:
            # round half to even without libdevice: adding 1.5 * 2^23 pushes the fraction out of the mantissa
            q = (q + 12582912.0) - 12582912.0
        tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=cols < K)


def per_token_quant(x: torch.Tensor, dtype: torch.dtype, qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row quantization of x [..., K] (fp16/bf16/fp32) -> (q [M, K] dtype, scale fp32 [M, 1])."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K > 0, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty(m, k, dtype=dtype, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), 4096)
        _per_token_quant_kernel[(m,)](x2, q, scale, k, x2.stride(0), q.stride(0), QMAX=qmax,
                                      IS_INT=not dtype.is_floating_point, MIN_SCALE=_MIN_SCALE, BLOCK=block,
                                      num_warps=4 if block <= 2048 else 8)
    return q, scale


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_q float8_e4m3fn [M, K], x_scale fp32 [M, 1]) with x ~= x_q * x_scale row by row."""
    return per_token_quant(x, torch.float8_e4m3fn, FP8_MAX)


def fp8_gemm(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y [M, N] = (x_q [M, K] @ w_q [N, K]^T) * x_scale [M, 1] * w_scale [N] (or [1]) (+ bias), fp32 accumulate."""
    return scaled_mm(x_q, w_q, x_scale, w_scale, bias, out_dtype, operand_dtype=torch.float8_e4m3fn)
