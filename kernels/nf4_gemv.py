"""NF4 weight-only GEMV for decode: y = x W^T with W in QLoRA's NormalFloat4, read at 4 bits (chapter 7).

minillm.quant.nf4 stores W [N, K] as 4-bit level indices, two per byte (`qweight` uint8 [N, K/2], weight 2j in
the low nibble), and one absmax per block of 64 weights along a row, itself double-quantized (int8 codes in
rows of 256 with one fp32 scale each, plus one global offset). Its reference dequantizes the whole weight to
the activations' dtype on every call and then multiplies: at decode that writes and re-reads a 16-bit copy of
every weight, three times the bytes of bf16 itself. This kernel is bitsandbytes' idea for batch-1 NF4
inference, written from the idea: read the packed bytes once and decode them in registers.

* Program pid owns BLOCK_N output rows and walks K a chunk of 256 weights at a time: the chunk's 128 bytes of
  each row, the rows' 4 absmax values of the chunk (an int8 code times its row of 256's scale plus the offset:
  the double quantization undone in two loads and an FMA, then spread over the 32 bytes of each block), and x's
  256 values, read as even and odd positions so that the low and high nibbles of a byte meet their own
  activations without any reshuffle.
* A nibble becomes its level by a gather from the 16-entry table (64 bytes, always in L1), times its absmax.
* One row of x: the products and sums on the CUDA cores. Several rows: the tensor cores, with x padded to 16
  rows (the decoded tile is converted to x's dtype once and multiplied for every row).
* x has at most MAX_M rows (decode and speculative verify steps); rows past M are clamped onto row M - 1 and
  weight rows past N onto row N - 1; only a row's last, partial chunk is masked (K is a multiple of 64).

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
# absmax values per double-quantization scale: minillm.quant.nf4.DOUBLE_QUANT_BLOCK, the kernel's `flat // 256`


@triton.jit
def _nf4_gemv_kernel(X, QW, AQ, AS, AO, LEVELS, BIAS, Y, M, N, K, stride_xm, stride_qn, stride_ym,
                     HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    rows_w = tl.minimum(offs_n, N - 1)  # clamped: unmasked loads; rows past N are never stored
    rows_x = tl.minimum(offs_m, M - 1)
    offs_c = tl.arange(0, 128)  # the 128 bytes (256 weights, 4 absmax blocks) of a row's chunk
    offs_a = tl.arange(0, 4)
    n_blocks = K // 64
    q_rows = QW + rows_w[:, None].to(tl.int64) * stride_qn
    x_rows = X + rows_x[:, None].to(tl.int64) * stride_xm
    absmax_rows = rows_w[:, None].to(tl.int64) * n_blocks  # flat index of each row's first absmax
    offset = tl.load(AO).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in range(0, tl.cdiv(K, 256)):
        byte_ok = (c * 128 + offs_c) < K // 2  # the last chunk of a row of 64 * (4j + r) weights is partial
        packed = tl.load(q_rows + c * 128 + offs_c[None, :], mask=byte_ok[None, :], other=0).to(tl.int32)
        x_even = tl.load(x_rows + c * 256 + 2 * offs_c[None, :], mask=byte_ok[None, :], other=0.0)
        x_odd = tl.load(x_rows + c * 256 + 2 * offs_c[None, :] + 1, mask=byte_ok[None, :], other=0.0)
        # the chunk's 4 absmax per row (double quantization undone), spread over the 32 bytes of each block
        flat = absmax_rows + c * 4 + offs_a[None, :]
        block_ok = (c * 4 + offs_a < n_blocks)[None, :]
        absmax4 = tl.load(AQ + flat, mask=block_ok, other=0).to(tl.float32) * tl.load(AS + flat // 256, mask=block_ok,
                                                                                      other=0.0) + offset
        absmax = tl.reshape(tl.broadcast_to(absmax4[:, :, None], (BLOCK_N, 4, 32)), (BLOCK_N, 128))
        w_even = tl.load(LEVELS + (packed & 0xF)) * absmax  # weight 2j of the chunk: the low nibble
        w_odd = tl.load(LEVELS + (packed >> 4)) * absmax  # weight 2j + 1: the high nibble
        if USE_DOT:  # several rows of x: the tensor cores (rows padded to 16)
            acc = tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)), acc, input_precision="ieee")
            acc = tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)), acc, input_precision="ieee")
        else:
            acc += tl.sum(x_even.to(tl.float32)[:, None, :] * w_even[None, :, :]
                          + x_odd.to(tl.float32)[:, None, :] * w_odd[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(BIAS + rows_w).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


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
    use_dot = m > 1
    block_n = 64 if use_dot else 32
    _nf4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x2, qweight, absmax_q, absmax_scale, absmax_offset, levels.float(), bias if bias is not None else y, y,
        m, n, k, x2.stride(0), qweight.stride(0), y.stride(0), HAS_BIAS=bias is not None, USE_DOT=use_dot,
        BLOCK_M=16 if use_dot else 1, BLOCK_N=block_n, num_warps=4)
    return y.reshape(*x.shape[:-1], n)
