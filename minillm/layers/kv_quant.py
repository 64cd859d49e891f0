"""The FP8 KV cache's number format: quantise keys and values on the way into the cache, dequantise on the way
out (chapter 5's paged cache at half the bytes; vLLM's `kv_cache_dtype="fp8"`).

Decode is bound by reading the KV cache: every step reads every cached key and value of every sequence. Storing
them as float8_e4m3fn (1 byte) instead of bf16 (2 bytes) halves that traffic and doubles the tokens a pool of
the same memory holds, so twice the sequences can run at once. e4m3 keeps 3 mantissa bits and an exponent, so
its *relative* precision (about 6%, half a step of 2^-3) is the same everywhere in its normal range
[2^-6, 448]; only values above 448 (saturated) or far below 2^-6 (subnormal, then zero) lose more.

A scale maps the model's values into that range: the cache holds x_q = saturate(x / scale) and attention reads
x = x_q * scale. Here there is one k_scale and one v_scale per layer and kv head, fp32 tensors stored next to
the pool (minillm.engine.kv_cache), and the kernels apply them once per tile, not per element
(minillm.kernels.paged_attention: k_scale folds into the softmax scale, v_scale multiplies the output).
How the scales are chosen is minillm.engine.kv_scales' job (a calibration forward at start-up).

quantize_kv is the torch path's write side and the definition of the bytes. The Triton path quantises inside
its store kernel (minillm.kernels.fused.store_kvcache: one launch, no torch ops), which rounds to the e4m3
grid in fp32 arithmetic before its cast, so it writes these same bytes on a GPU and in Triton's CPU interpreter
(whose own fp8 down-cast rounds wrongly across powers of two). The read kernels only ever widen fp8 (exact).
"""
from __future__ import annotations

import torch

from minillm.config import KV_CACHE_DTYPES

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn (the "fn" variant has no infinities)


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type of the KV pool: the model's dtype for "auto", float8_e4m3fn for "fp8"/"fp8_e4m3"."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}; allowed: {', '.join(repr(d) for d in KV_CACHE_DTYPES)}")
    return model_dtype if kv_cache_dtype == "auto" else FP8_KV_DTYPE


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_KV_DTYPE


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [T, KVH, D] (any float dtype) -> float8_e4m3fn x / scale, saturated to +-448; scale fp32 [KVH].

    The clamp is not optional: torch's cast of an out-of-range value to e4m3fn is not guaranteed to saturate
    (the format has no infinity; on some devices it gives NaN), and one NaN key poisons its whole softmax row.
    """
    return (x.float() / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x_q [N, KVH, D] float8_e4m3fn -> x_q * scale in `dtype`; scale fp32 [KVH]. Widening fp8 is exact."""
    return (x_q.float() * scale[:, None]).to(dtype)


def scales_from_amax(amax: torch.Tensor, headroom: float) -> torch.Tensor:
    """Scales that map `amax` (fp32, any shape) to 448 / headroom; an all-zero head gets scale 1 (any works)."""
    if not headroom >= 1.0:
        raise ValueError(f"headroom must be >= 1 (values above amax / headroom would saturate), got {headroom}")
    amax = amax.float()
    return torch.where(amax > 0, amax * headroom / FP8_E4M3_MAX, torch.ones_like(amax))
