"""INT8 W8A8 linear layers (SmoothQuant-style): per-token int8 activations x per-channel int8 weights (chapters 7-8).

    x [M, K] --per_token_quant_int8--> x_q int8 [M, K], x_scale fp32 [M, 1]   (scale = max|x_row| / 127)
    y = scaled_mm(x_q, w_q int8 [N, K], x_scale, w_scale [N] or [1])  -> bf16 [M, N]   (kernels/scaled_mm.py)

The GEMM accumulates int8 x int8 products in int32 (tl.dot with out_dtype=int32), which is exact, and applies
both scales once per output in the epilogue. Codes are symmetric in [-127, 127] (never -128, so that
negating a row stays representable), rounded half to even as torch.round does. Hopper runs int8 at the fp8
rate; int8 suits activations whose outliers were smoothed into the weights first (SmoothQuant), fp8 those
that were not, its floating grid being kinder to outliers. Weights are quantized offline by the quantization
method (minillm.quant.int8_rtn / smoothquant), whose call site int8_linear runs these two kernels.
"""
from __future__ import annotations

import torch

from minillm.kernels.fp8_gemm import per_token_quant
from minillm.kernels.scaled_mm import scaled_mm

__all__ = ["INT8_MAX", "per_token_quant_int8", "int8_gemm"]

INT8_MAX = 127.0


def per_token_quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_q int8 [M, K], x_scale fp32 [M, 1]) with x ~= x_q * x_scale row by row."""
    return per_token_quant(x, torch.int8, INT8_MAX)


def int8_gemm(x_q: torch.Tensor, w_q: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y [M, N] = (x_q [M, K] @ w_q [N, K]^T as int32) * x_scale [M, 1] * w_scale [N] (or [1]) (+ bias)."""
    return scaled_mm(x_q, w_q, x_scale, w_scale, bias, out_dtype, operand_dtype=torch.int8)
