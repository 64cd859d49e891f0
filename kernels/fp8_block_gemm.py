"""Block-wise scaled FP8 GEMM and the per-token-group activation quantizer (chapter 8; DeepSeek-V3's recipe).

    x  [M, K] --per_token_group_quant_fp8--> a8 e4m3 [M, K], a_scale fp32 [M, K / group_k]
    w8 [N, K] e4m3, w_scale fp32 [N / group_n, K / group_k]           (minillm.quant.fp8_block, offline)
    y[m, n] = sum_kb a_scale[m, kb] * w_scale[n // group_n, kb] * sum_{k in block kb} a8[m, k] * w8[n, k]

A per-channel W8A8 GEMM (scaled_mm.py) scales once in the epilogue because its scales do not depend on k.
Here they change every group_k columns, so the K loop scales each block's partial product before adding it
to the fp32 accumulator: acc += dot(a8_tile, w8_tile^T) * a_scale[:, kb, None] * w_scale[None, n // group_n, kb].
DeepSeek-V3 (2024, section 3.3.2) does this promotion to fp32 every 128 elements on purpose: Hopper's fp8
tensor-core accumulator keeps only about 14 bits, and scaling in CUDA-core fp32 registers between the
wgmma's is what makes fine-grained scales cheap. The tile loops K in steps of BLOCK_K (a power of two that
divides group_k), loads one activation scale per row and one weight scale per column (a column's block
row is n // group_n, so BLOCK_N may span several weight blocks) and multiplies.

The e4m3 operands go straight to tl.dot on the GPU (wgmma with fp8 inputs, whose K step is 32: a 16-wide K
tile is upcast and multiplied in tf32 instead, exact for e4m3's 4 significant bits). Under the interpreter (CPU) the
kernel upcasts the tiles to fp32 first (UPCAST) and dots with ieee precision: the products of e4m3 values
are exact in fp32, so it checks the indexing and the scaling against a torch emulation; the interpreter's
fp32 -> fp8 *down*-cast rounds wrongly, so CPU tests quantize with torch and pass the e4m3 tensors in.

The quantizer is one program per (token, group): max |x| over the group, scale = max / 448 (at least
1e-12: an all-zero group quantizes to zeros), x / scale saturated to +-448 and cast to e4m3.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.scaled_mm import _clamped_operand_ptrs, _tile_coords
from minillm.platform import triton_interpreted

__all__ = ["FP8_MAX", "per_token_group_quant_fp8", "fp8_block_gemm", "default_config"]

FP8_MAX = 448.0
_MIN_SCALE = 1e-12


@triton.jit
def _per_token_group_quant_kernel(X, Q, SCALE, K, stride_x, stride_q, GROUP: tl.constexpr, QMAX: tl.constexpr,
                                  MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, BLOCK)
    ok = tl.arange(0, BLOCK) < GROUP
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    # div_rn: IEEE round-to-nearest division, as torch divides. Triton's `/` on fp32 is the approximate
    # div.full.f32 (up to 2 ulp off), which moved scales and flipped e4m3 codes against the CPU emulation (the
    # H200 engine test's logits 3.6% apart in fp32, 2026-12-03)
    scale = tl.maximum(tl.div_rn(tl.max(tl.abs(x), axis=0), QMAX), MIN_SCALE)
    tl.store(SCALE + row * (K // GROUP) + g, scale)
    q = tl.minimum(tl.maximum(tl.div_rn(x, scale), -QMAX), QMAX)
    tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=ok)


def per_token_group_quant_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (fp16/bf16/fp32) -> (a8 float8_e4m3fn [M, K], a_scale fp32 [M, K / group]), x ~= a8 * scale
    group by group along each row."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K > 0, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or k % group:
        raise ValueError(f"group must be a positive int dividing K={k}, got {group!r}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, k // group, dtype=torch.float32, device=x.device)
    if m:
        _per_token_group_quant_kernel[(m, k // group)](x2, q, scale, k, x2.stride(0), q.stride(0), GROUP=group,
                                                       QMAX=FP8_MAX, MIN_SCALE=_MIN_SCALE,
                                                       BLOCK=triton.next_power_of_2(group), num_warps=1)
    return q, scale


@triton.jit
def _fp8_block_gemm_kernel(A, B, A_SCALE, B_SCALE, BIAS, C, M, N, K, stride_am, stride_bn, stride_cm,
                           stride_asm, stride_bsn, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                           HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # rows past M / N re-read a valid row (clamped) so the K loop's loads need no mask; K % BLOCK_K == 0
    offs_m, offs_n, a_rows, b_rows, a_ptrs, b_ptrs = _clamped_operand_ptrs(A, B, M, N, stride_am, stride_bn,
                                                                          pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K)
    a_scale_ptrs = A_SCALE + a_rows * stride_asm                # this tile's rows, K-block 0
    b_scale_ptrs = B_SCALE + (b_rows // GROUP_N) * stride_bsn   # each column's weight-block row, K-block 0
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
        if UPCAST:
            part = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PRECISION)
        else:
            part = tl.dot(a, b)
        kb = k0 // GROUP_K
        a_s = tl.load(a_scale_ptrs + kb)
        b_s = tl.load(b_scale_ptrs + kb)
        acc += part * a_s[:, None] * b_s[None, :]  # promote this K-block's product with its own scales
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


def default_config(m: int, n: int, k: int, group_k: int) -> dict:
    """Tile sizes by M: 64 x 64 tiles up to M = 64 (decode: many programs along N to stream the weights),
    128 x 128 beyond, where reusing each loaded tile matters more. BLOCK_K: the largest power of two dividing
    group_k, at most 128."""
    block_k = min(group_k & -group_k, 128)
    if triton_interpreted():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=min(block_k, 32), GROUP_M=2, num_warps=4, num_stages=1)
    if m <= 64:  # 64 rows: one warpgroup's wgmma, whatever the batch (decode reads the weights once anyway)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


def fp8_block_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   block_size: tuple[int, int], bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:
    """C [M, N] = block-scaled a [M, K] @ b [N, K]^T (+ bias).

    a, b: float8_e4m3fn (or, under the interpreter, fp32 tensors holding e4m3 values); a_scale fp32
    [M, K / group_k]; b_scale fp32 [N / group_n, K / group_k] (N / group_n rounded up); block_size =
    (group_n, group_k), each a multiple of 16 with group_k dividing K. config: tiles (default_config's keys).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"need a [M, K] and b [N, K] with the same K > 0, got {tuple(a.shape)} and {tuple(b.shape)}")
    allowed = (torch.float8_e4m3fn,) + ((torch.float32,) if triton_interpreted() else ())
    if a.dtype != b.dtype or a.dtype not in allowed:
        raise TypeError(f"a and b must both be one of {allowed}, got {a.dtype} and {b.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 16 or g % 16 for g in block_size)):
        raise ValueError(f"block_size must be (group_n, group_k), positive multiples of 16, got {block_size!r}")
    (m, k), n = a.shape, b.shape[0]
    group_n, group_k = block_size
    if k % group_k:
        raise ValueError(f"group_k={group_k} must divide K={k}")
    if tuple(a_scale.shape) != (m, k // group_k) or tuple(b_scale.shape) != (triton.cdiv(n, group_n), k // group_k):
        raise ValueError(f"a_scale must be [{m}, {k // group_k}] and b_scale [{triton.cdiv(n, group_n)}, "
                         f"{k // group_k}], got {tuple(a_scale.shape)} and {tuple(b_scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [N] = [{n}], got {tuple(bias.shape)}")
    if len({t.device for t in (a, b, a_scale, b_scale)}) != 1:
        raise ValueError("a, b, a_scale and b_scale must be on one device")
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    a_scale, b_scale = a_scale.float().contiguous(), b_scale.float().contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    cfg = dict(config or default_config(m, n, k, group_k))
    if group_k % cfg["BLOCK_K"]:
        raise ValueError(f"config BLOCK_K={cfg['BLOCK_K']} must divide group_k={group_k}")
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _fp8_block_gemm_kernel[grid](a, b, a_scale, b_scale, bias if bias is not None else a_scale, c, m, n, k,
                                 a.stride(0), b.stride(0), c.stride(0), a_scale.stride(0), b_scale.stride(0),
                                 GROUP_N=group_n, GROUP_K=group_k, HAS_BIAS=bias is not None,
                                 UPCAST=triton_interpreted() or cfg["BLOCK_K"] < 32,
                                 DOT_PRECISION="ieee" if triton_interpreted() else "tf32", **cfg)
    return c
