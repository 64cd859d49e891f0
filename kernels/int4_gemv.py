"""INT4 weight-only GEMM for decode batches (M = 1..16) on CUDA cores: every weight unpacked once for all rows.

int4_gemm.py's CUDA-core path runs one activation row per program, so at M = 4 each weight tile is unpacked four
times (once per row's program) and its tensor-core path pads M up to 16 rows. Here one program takes BLOCK_M rows
(1..16) at once: a weight tile is loaded and unpacked once (one AND and one FMA per weight, the same bit trick as
int4_unpack) and then multiplied into BLOCK_M accumulators, so the cost per weight grows by one FMA per row, not by
a whole unpack per row. That is the GEMV idea of the decode kernels in llama.cpp and gpt-fast: at small M the weight
bytes and their unpacking are the work, the multiply-adds are cheap.

Layout, split-K protocol (fp32 workspace + per-tile arrival counter, cleaned by the last program) and the int4_unpack
helper are int4_gemm.py's; only the inner product differs:

    part[m, j, n] += x[m, 8j + i] * (code[8j + i, n] - zero[n])     i = 0..7, one nibble of each word at a time
    acc[m, j, n]  += part[m, j, n] * scale[n]                        once per K tile (a tile lies in one group)
    y[m, n]        = sum_j acc[m, j, n]                              once, at the end

The tile needs GROUP_SIZE % BLOCK_K == 0 (the launcher checks) so that one scale serves the whole tile.
"""
from __future__ import annotations

import triton
import triton.language as tl

from minillm.kernels.int4_gemm import _load_tile, int4_unpack

__all__ = ["int4_gemv_kernel"]


@triton.jit
def int4_gemv_kernel(X, QW, S, QZ, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_qk, stride_sg, stride_zg, stride_ym,
                     EXP23, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K):
    """y[M, N] = x[M, K] @ dequant(W)^T for BLOCK_M rows per program; grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),
    SPLIT_K). GROUP_SIZE % BLOCK_K == 0."""
    ROWS: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, ROWS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, k_tiles)
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]

    acc = tl.zeros([BLOCK_M, ROWS, BLOCK_N], dtype=tl.float32)
    # one tile of packed words in flight ahead of the math (registers, not shared memory)
    w, s, z = _load_tile(QW, S, QZ, t_begin, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg, stride_zg,
                         GROUP_SIZE, HAS_ZEROS, True, ROWS, BLOCK_K, BLOCK_N)
    for t in range(t_begin, t_end):
        w_next, s_next, z_next = _load_tile(QW, S, QZ, t + 1, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg,
                                            stride_zg, GROUP_SIZE, HAS_ZEROS, True, ROWS, BLOCK_K, BLOCK_N)
        k0 = t * BLOCK_K
        j_ok = (k0 // 8 + offs_j) < K // 8
        w_lo = w | EXP23
        w_hi = (w >> 16) | EXP23
        part = tl.zeros([BLOCK_M, ROWS, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(8):
            q = int4_unpack(w_lo, w_hi, z, i)  # [ROWS, BLOCK_N]: code - zero, exact, once for all BLOCK_M rows
            xi = tl.load(x_rows + (k0 + 8 * offs_j + i)[None, :], mask=m_ok[:, None] & j_ok[None, :],
                         other=0.0).to(tl.float32)  # [BLOCK_M, ROWS]
            part += xi[:, :, None] * q[None, :, :]
        acc += part * s[None, :, :]
        w, s, z = w_next, s_next, z_next
    out = tl.sum(acc, axis=1)  # [BLOCK_M, BLOCK_N]

    y_mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=y_mask)
    else:
        ws_ptrs = WS + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, out, mask=y_mask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(CNT + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.atomic_add(ws_ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=y_mask, sem="acquire")
            if HAS_BIAS:
                total += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=y_mask)
            tl.store(ws_ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=y_mask)
            tl.atomic_xchg(CNT + pid, 0)
