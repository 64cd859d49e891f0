"""INT4 weight-only GEMV for decode (M = 1..4) on CUDA cores: wide tiles, K rows reduced inside each thread.

int4_gemm.py's CUDA-core path keeps a [BLOCK_K / 8, BLOCK_N] fp32 accumulator beside the weight tile, so a tile of
more than four columns per thread runs out of registers; with four columns per thread, every activation value
(loaded and converted from bf16 once per packed row and nibble) serves only four weights, and that overhead is
about a quarter of the instructions (read off ptxas's sm_90 output). Here the tile's partial sums are reduced
over the K rows at the end of each tile (a thread holds all BLOCK_K / 8 rows of its columns when the warps lie
side by side along N: num_warps * 128 <= BLOCK_N, which the launcher checks), then scaled once per column: the
accumulator is one value per column, and a thread can hold 8 or 16 columns, each activation serving as many.

    part[j, n] = sum_i x[8j + i] * (code[8j + i, n] - zero[n])     i = 0..7, one nibble of each word at a time
    acc[n]    += scale[n] * sum_j part[j, n]                         once per K tile (a tile lies in one group)

Layout, split-K protocol (fp32 workspace + per-tile arrival counter, cleaned by the last program), the tile loader
and int4_unpack are int4_gemm.py's; one activation row per program (grid: M * cdiv(N, BLOCK_N), SPLIT_K).
The tile needs GROUP_SIZE % BLOCK_K == 0 (one scale per tile).
"""
from __future__ import annotations

import triton
import triton.language as tl

from minillm.kernels.int4_gemm import _load_tile, int4_unpack
from minillm.kernels.int4_mma import split_k_store

__all__ = ["int4_gemv_kernel"]


@triton.jit
def int4_gemv_kernel(X, QW, S, QZ, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_qk, stride_sg, stride_zg, stride_ym,
                     EXP23, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K):
    """y[m, :] = x[m, :] @ dequant(W)^T, one row m per program; grid (M * cdiv(N, BLOCK_N), SPLIT_K)."""
    ROWS: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    row = pid // num_n
    pid_n = pid % num_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, ROWS)
    n_ok = offs_n < N
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, k_tiles)
    x_row = X + row.to(tl.int64) * stride_xm

    acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
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
        part = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(8):
            q = int4_unpack(w_lo, w_hi, z, i)  # code - zero, exact
            xi = tl.load(x_row + k0 + 8 * offs_j + i, mask=j_ok, other=0.0).to(tl.float32)
            part += xi[:, None] * q
        acc += tl.sum(part, axis=0)[None, :] * s  # rows reduced inside the thread, then one scale per column
        w, s, z = w_next, s_next, z_next

    split_k_store(acc, Y, WS, CNT, BIAS, pid, row + tl.arange(0, 1), offs_n, row + tl.arange(0, 1) < M, n_ok, N,
                  stride_ym, HAS_BIAS, SPLIT_K, 1, BLOCK_N)
