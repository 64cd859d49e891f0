"""W8A8 scaled matmul: C = (A_q @ B_q^T) * a_scale[:, None] * b_scale[None, :] (+ bias), the one GEMM behind
FP8 and INT8 "W8A8" layers (chapter 10). fp8_gemm.py and int8_gemm.py quantize the activations and call it.

    A_q      [M, K]  float8_e4m3fn or int8     activations, quantized per token (row) on the fly
    B_q      [N, K]  same dtype                weights as nn.Linear stores them (out, in): K contiguous
    a_scale  fp32 [M] or [1]                   per-token (or per-tensor) scale of A
    b_scale  fp32 [N] or [1]                   per-channel (or per-tensor) scale of B
    C        [M, N]  bf16 (or fp16 / fp32)

Both operands are K-major, the only layout Hopper's 8-bit tensor-core instructions (wgmma) accept. The K loop
is a plain tiled matmul (Triton pipelines the loads num_stages deep and issues wgmma); all scaling happens
once in the epilogue, because the scales are constant along K: sum_k (a s_m)(b s_n) = s_m s_n sum_k a b.
fp8 accumulates in fp32, int8 in int32 (exact: |sum| <= K 127^2 < 2^31 for K < 133,000), then converted.
Programs walk the output tiles in GROUP_M-row bands so that neighbouring programs share A and B tiles in L2.

Under the interpreter (CPU) the same kernel runs on fp16 or fp32 operands holding the 8-bit values: the
indexing and scaling logic is the same; fp8 itself is a GPU-only dtype here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.platform import triton_interpreted

__all__ = ["scaled_mm"]


@triton.jit
def _scaled_mm_kernel(A, B, A_SCALE, B_SCALE, BIAS, C, M, N, K, stride_am, stride_bn, stride_cm, M_BUCKET,
                      PER_TOKEN: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      INT_ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-tiles advance together along N, so their A tiles stay in L2
    band = pid // (GROUP_M * num_n)
    first_m = band * GROUP_M
    band_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % band_rows
    pid_n = (pid % (GROUP_M * num_n)) // band_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows past M / N are clamped (re-read a valid row) instead of masked: the loads stay unpredicated
    a_rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    b_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + b_rows[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] tile of B^T, K-major
    if INT_ACC:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if INT_ACC:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    m_ok = offs_m < M
    n_ok = offs_n < N
    if PER_TOKEN:
        a_s = tl.load(A_SCALE + offs_m, mask=m_ok, other=0.0)[:, None]
    else:
        a_s = tl.load(A_SCALE)
    if PER_CHANNEL:
        b_s = tl.load(B_SCALE + offs_n, mask=n_ok, other=0.0)[None, :]
    else:
        b_s = tl.load(B_SCALE)
    out = acc.to(tl.float32) * a_s * b_s
    if HAS_BIAS:
        out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): Hopper candidates. Large tiles (128 x 256) keep
# two warpgroups of wgmma busy at 8192^3; 64-row tiles with more columns serve the small-M (decode) shapes.
_LARGE = [(128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4), (128, 256, 64, 8, 8, 4)]
_SMALL = [(64, 64, 256, 8, 4, 4), (64, 128, 128, 8, 4, 4), (64, 128, 256, 8, 4, 3), (64, 256, 128, 8, 8, 3)]
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    m_bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 256))
    small = m_bucket <= 64
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 64) == small]
    return kept or configs


_autotuned = None


def _autotuned_kernel():
    global _autotuned
    if _autotuned is None:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g}, num_warps=w, num_stages=s)
                   for m, n, k, g, w, s in _LARGE + _SMALL]
        _autotuned = triton.autotune(configs, key=["M_BUCKET", "N", "K", "INT_ACC"],
                                     prune_configs_by={"early_config_prune": _prune})(_scaled_mm_kernel)
    return _autotuned


def _scale_vector(scale: torch.Tensor, n: int, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(scale, 'dtype', type(scale))}")
    if scale.numel() not in (1, n):
        raise ValueError(f"{name} must hold 1 (per-tensor) or {n} values, got shape {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device}, the operands on {device}")
    return scale.reshape(-1).to(torch.float32).contiguous()


def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
              config: dict | None = None) -> torch.Tensor:
    """C [M, N] = (a [M, K] @ b [N, K]^T) * a_scale * b_scale (+ bias), accumulated in int32 for int8
    operands and fp32 otherwise. `config` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) pins
    the tiles instead of autotuning."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"need a [M, K] and b [N, K] with the same K > 0, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    allowed = (torch.int8, torch.float8_e4m3fn, torch.float16, torch.float32)
    if a.dtype not in allowed:
        raise TypeError(f"operands must be one of {allowed}, got {a.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device}, b on {b.device}")
    (m, k), n = a.shape, b.shape[0]
    a_scale = _scale_vector(a_scale, m, "a_scale", a.device)
    b_scale = _scale_vector(b_scale, n, "b_scale", a.device)
    if bias is not None and (bias.shape != (n,) or bias.device != a.device):
        raise ValueError(f"bias must be [N] = [{n}] on {a.device}, got {tuple(bias.shape)} on {bias.device}")
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    args = (a, b, a_scale, b_scale, bias if bias is not None else a_scale, c, m, n, k, a.stride(0), b.stride(0),
            c.stride(0), min(triton.next_power_of_2(m), 256))
    consts = dict(PER_TOKEN=a_scale.numel() == m and m > 1, PER_CHANNEL=b_scale.numel() == n and n > 1,
                  HAS_BIAS=bias is not None, INT_ACC=a.dtype == torch.int8,
                  DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32")
    if config is None and not triton_interpreted():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _autotuned_kernel()[grid](*args, **consts)
        return c
    cfg = dict(config) if config is not None else dict(INTERPRETER_CONFIG)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _scaled_mm_kernel[grid](*args, **consts, **cfg)
    return c
