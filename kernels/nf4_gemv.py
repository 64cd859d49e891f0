"""NF4 weight-only GEMV for decode: y = x W^T with W in QLoRA's NormalFloat4, read at 4 bits (chapter 7).

minillm.quant.nf4 stores W [N, K] as 4-bit level indices, two per byte (`qweight` uint8 [N, K/2], weight 2j in
the low nibble), and one absmax per block of 64 weights along a row, itself double-quantized (int8 codes in
rows of 256 with one fp32 scale each, plus one global offset). Its reference dequantizes the whole weight to
the activations' dtype on every call and then multiplies: at decode that writes and re-reads a 16-bit copy of
every weight, three times the bytes of bf16 itself. This kernel is bitsandbytes' idea for batch-1 NF4
inference, written from the idea: read the packed bytes once and decode them in registers.

* Program pid owns BLOCK_N output rows and walks K one 64-weight block at a time: the block's 32 bytes of each
  row, the rows' absmax (an int8 code times its row of 256's scale plus the offset: the double
  quantization undone in two loads and an FMA), and x's 64 values of the block, read as even and odd
  positions so that the low and high nibbles of a byte meet their own activations without any reshuffle.
* A nibble becomes its level by a gather from the 16-entry table (64 bytes, always in L1).
* Each block's partial sum is scaled by the row's absmax once (64 weights share it), not per weight.
* x has at most MAX_M rows (decode and speculative verify steps); rows past M are clamped onto row M - 1 and
  weight rows past N onto row N - 1, so no load is masked (K is a multiple of 64 by construction).

`nf4_gemv(x, qweight, absmax_q, absmax_scale, absmax_offset, levels, bias)` is the entry point;
minillm.quant.nf4.nf4_linear calls it on CUDA at decode and keeps its reference everywhere else.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["MAX_M", "nf4_gemv"]

MAX_M = 16
BLOCK = 64  # weights per absmax (minillm.quant.nf4.BLOCK_SIZE)
DOUBLE_QUANT_BLOCK = 256  # absmax values per double-quantization scale (minillm.quant.nf4.DOUBLE_QUANT_BLOCK)


@triton.jit
def _nf4_gemv_kernel(X, QW, AQ, AS, AO, LEVELS, BIAS, Y, M, N, K, stride_xm, stride_qn, stride_ym,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    rows_w = tl.minimum(offs_n, N - 1)  # clamped: unmasked loads; rows past N are never stored
    rows_x = tl.minimum(offs_m, M - 1)
    offs_b = tl.arange(0, 32)  # the 32 bytes (64 weights) of one block of a row
    q_ptrs = QW + rows_w[:, None].to(tl.int64) * stride_qn + offs_b[None, :]
    x_ptrs = X + rows_x[:, None].to(tl.int64) * stride_xm + 2 * offs_b[None, :]
    n_blocks = K // 64
    absmax_idx = rows_w.to(tl.int64) * n_blocks  # flat index of each row's first absmax
    offset = tl.load(AO).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(0, n_blocks):
        packed = tl.load(q_ptrs).to(tl.int32)  # [BLOCK_N, 32]
        w_even = tl.load(LEVELS + (packed & 0xF))  # weight 2j of the block: the low nibble
        w_odd = tl.load(LEVELS + (packed >> 4))  # weight 2j + 1: the high nibble
        x_even = tl.load(x_ptrs).to(tl.float32)  # [BLOCK_M, 32]
        x_odd = tl.load(x_ptrs + 1).to(tl.float32)
        part = tl.sum(x_even[:, None, :] * w_even[None, :, :] + x_odd[:, None, :] * w_odd[None, :, :], axis=2)
        flat = absmax_idx + b
        absmax = tl.load(AQ + flat).to(tl.float32) * tl.load(AS + flat // 256) + offset
        acc += part * absmax[None, :]
        q_ptrs += 32
        x_ptrs += 64
    if HAS_BIAS:
        acc += tl.load(BIAS + rows_w).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _block_n(m: int) -> int:
    """Rows of W per program: the [BLOCK_M, BLOCK_N, 32] products stay within ~64 fp32 registers a thread."""
    block_m = max(1, triton.next_power_of_2(m))
    return max(8, min(64, 1024 // block_m))


def nf4_gemv(x: torch.Tensor, qweight: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
             absmax_offset: torch.Tensor, levels: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias) in x's dtype, for at most MAX_M rows of x, with W the NF4 weight
    (qweight uint8 [N, K/2], absmax_q int8 [*, 256], absmax_scale [*], absmax_offset [1], levels [16])."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"nf4_gemv: x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.stride(-1) != 1:
        raise ValueError(f"nf4_gemv: qweight must be a row-major uint8 [N, K/2], got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    n, k = qweight.shape[0], qweight.shape[1] * 2
    if x.dim() < 1 or x.shape[-1] != k or k % BLOCK:
        raise ValueError(f"nf4_gemv: x must be [..., K] with K = {k} (2 x qweight's columns, a multiple of "
                         f"{BLOCK}), got {tuple(x.shape)}")
    if absmax_q.numel() < n * k // BLOCK or absmax_q.dtype != torch.int8 or levels.shape != (16,):
        raise ValueError(f"nf4_gemv: absmax_q must hold at least {n * k // BLOCK} int8 codes and levels 16 values, "
                         f"got {absmax_q.dtype} {tuple(absmax_q.shape)} and {tuple(levels.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"nf4_gemv: bias must be [N] = [{n}], got {tuple(bias.shape)}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"nf4_gemv serves 1..{MAX_M} rows of x, got {m}; dequantize and use a GEMM")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_n = _block_n(m)
    _nf4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, qweight, absmax_q, absmax_scale, absmax_offset, levels.float(), bias if bias is not None else y, y,
        m, n, k, x2.stride(0), qweight.stride(0), y.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=block_n, num_warps=4)
    return y.reshape(*x.shape[:-1], n)
