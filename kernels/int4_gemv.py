"""INT4 weight-only GEMV for decode (M = 1, 2) on CUDA cores with packed half-precision math (chapter 8).

The first H200 sweep showed the decode GEMM bound by instructions, not bytes: int4_gemm.py's CUDA-core path spends
~5 instructions per weight (an AND and an FMA to unpack into fp32, an FMA to accumulate, and the overheads), which
at 132 SMs x 128 lanes keeps a 4096 x 14336 GEMM near 20 us while its 4-bit weights take 7 us to read.
Here every instruction handles two weights, Marlin's trick on CUDA cores:

* One AND-OR (LOP3) puts nibbles i and i + 4 of a packed word into the two fp16 halves of a 32-bit register as
  1024 + c (0x6400 is 1024.0 in fp16, whose mantissa unit at 1024 is exactly 1): two weights per instruction.
* One sub.f16x2 takes away 1024 + zero from both halves (exact: the result is c - zero in -15..15), one
  fma.rn.f16x2 multiplies both by their activations and adds them into a per-word pair of fp16 accumulators.
* Shifts only once per word (Marlin's arrangement): nibbles 0/4 and 1/5 are masked where they lie, the second
  pair as 1024 + 16c, which one fma.rn.f16x2 (times 1/16, minus 64 + zero: both exact) turns into c - zero in
  place of the sub; the word shifted right by 8 gives nibbles 2/6 and 3/7 the same way.
* After the tile's four nibble pairs, each word's two fp16 sums become one fp32 number (two converts and an add),
  the K rows of the tile are summed inside the thread and the group's scale multiplies the column once. With
  BLOCK_K <= 32 (<= 4 word rows, so <= 16 products per fp16 half) the rows are first added as fp16 pairs
  (add.f16x2) and each column is converted once per tile instead of once per word.
fp16 carries 11 significant bits, and the partial sums in fp16 are four products each (sixteen with BLOCK_K <= 32),
so the result keeps ~1e-3 relative accuracy (bf16's output rounding is 4e-3; the tests bound it at 3e-3). The
activations are scaled by 1/16 on their way to fp16 (and y by 16 after), so |x| up to ~4000 cannot overflow
fp16's 65504 even times a code of 15 sixteen times over.

The packed instructions are PTX (tl.inline_asm_elementwise) and run only on a GPU; under the interpreter
(PACKED=False) the same arithmetic runs half by half in plain Triton, so the CPU tests check the algorithm.
Layout, tile loader and split-K protocol are int4_gemm.py's / int4_mma.py's; one activation row per program.
"""
from __future__ import annotations

import triton
import triton.language as tl

from minillm.kernels.int4_gemm import _load_tile
from minillm.kernels.int4_mma import split_k_store

__all__ = ["int4_gemv_kernel"]

X_SCALE = 0.0625  # activations enter fp16 divided by 16 (headroom), y leaves multiplied by 16
SIXTEENTH2: tl.constexpr = tl.constexpr(0x2C002C00)  # 1/16 in both fp16 halves


@triton.jit
def _half(v, H: tl.constexpr):
    """Half H (0: bits 0..15, 1: bits 16..31) of int32 words, read as fp16, as fp32."""
    return ((v >> (16 * H)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _pack(lo, hi):
    """Two fp32 tensors rounded to fp16 and packed into int32 words (lo in bits 0..15)."""
    lo16 = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo16 | (hi16 << 16)


@triton.jit
def _sub_fma_f16x2(pair, zz, xx, acc, PACKED: tl.constexpr):
    """acc += (pair - zz) * xx on both fp16 halves of each int32 word (one sub.f16x2, one fma.rn.f16x2)."""
    if PACKED:
        return tl.inline_asm_elementwise(
            asm="{ .reg .b32 t; sub.rn.f16x2 t, $1, $2; fma.rn.f16x2 $0, t, $3, $4; }",
            constraints="=r,r,r,r,r", args=[pair, zz, xx, acc], dtype=tl.int32, is_pure=True, pack=1)
    else:
        lo = (_half(pair, 0) - _half(zz, 0)) * _half(xx, 0) + _half(acc, 0)
        hi = (_half(pair, 1) - _half(zz, 1)) * _half(xx, 1) + _half(acc, 1)
        return _pack(lo, hi)


@triton.jit
def _fma_fma_f16x2(pair, sixteenth, nzz, xx, acc, PACKED: tl.constexpr):
    """acc += (pair * sixteenth + nzz) * xx on both fp16 halves (two fma.rn.f16x2): pair holds 1024 + 16 c,
    sixteenth 1/16 and nzz -(64 + zero) in both halves, so the first FMA leaves c - zero exactly."""
    if PACKED:
        return tl.inline_asm_elementwise(
            asm="{ .reg .b32 t, c; mov.b32 c, 0x2C002C00; fma.rn.f16x2 t, $1, c, $2; fma.rn.f16x2 $0, t, $3, $4; }",
            constraints="=r,r,r,r,r", args=[pair, nzz, xx, acc], dtype=tl.int32, is_pure=True, pack=1)
    else:
        lo = (_half(pair, 0) * 0.0625 + _half(nzz, 0)) * _half(xx, 0) + _half(acc, 0)  # (sixteenth's value)
        hi = (_half(pair, 1) * 0.0625 + _half(nzz, 1)) * _half(xx, 1) + _half(acc, 1)
        return _pack(lo, hi)


@triton.jit
def _x_pair(x_row, k0, offs_j, j_ok, i: tl.constexpr):
    """Activations of K rows 8j + i and 8j + i + 4, divided by 16 (X_SCALE), as fp16 pairs [ROWS, 1]."""
    x_lo = tl.load(x_row + k0 + 8 * offs_j + i, mask=j_ok, other=0.0).to(tl.float32)
    x_hi = tl.load(x_row + k0 + 8 * offs_j + i + 4, mask=j_ok, other=0.0).to(tl.float32)
    return _pack(x_lo * 0.0625, x_hi * 0.0625)[:, None]


@triton.jit
def _two_pairs(wp, zz, nzz, mask, mask16, x_row, k0, offs_j, j_ok, sums, I: tl.constexpr, PACKED: tl.constexpr):
    """sums += the products of nibbles I, I + 4 (bits 0..3 of each half of wp: 1024 + c) and I + 1, I + 5
    (bits 4..7: 1024 + 16 c) with their activations."""
    pair = (wp & mask) | 0x64006400
    sums = _sub_fma_f16x2(pair, zz, _x_pair(x_row, k0, offs_j, j_ok, I), sums, PACKED)
    pair16 = (wp & mask16) | 0x64006400
    return _fma_fma_f16x2(pair16, SIXTEENTH2, nzz, _x_pair(x_row, k0, offs_j, j_ok, I + 1), sums, PACKED)


@triton.jit
def _add_f16x2(a, b):
    """add.f16x2 of two int32 words (the fp16-pair reduction's combine, PTX)."""
    return tl.inline_asm_elementwise(asm="add.rn.f16x2 $0, $1, $2;", constraints="=r,r,r", args=[a, b],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _sum_rows_f16x2(sums, PACKED: tl.constexpr):
    """[ROWS, BLOCK_N] fp16 pairs -> [BLOCK_N] fp16 pairs summed over the rows: add.f16x2 in a tree on a GPU;
    under the interpreter (where a tl.reduce with a custom combine crawls) each half summed in fp32, rounded once."""
    if PACKED:
        return tl.reduce(sums, 0, _add_f16x2)
    else:
        return _pack(tl.sum(_half(sums, 0), axis=0), tl.sum(_half(sums, 1), axis=0))


@triton.jit
def _sum_halves(acc, PACKED: tl.constexpr):
    """fp32 sum of the two fp16 halves of each int32 word."""
    if PACKED:
        return tl.inline_asm_elementwise(
            asm="{ .reg .f16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; cvt.f32.f16 b, h; "
                "add.f32 $0, a, b; }",
            constraints="=f,r", args=[acc], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return _half(acc, 0) + _half(acc, 1)


@triton.jit(do_not_specialize=["M", "SPLIT_K"])  # one compile for every M and split
def int4_gemv_kernel(X, QW, S, QZ, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_qk, stride_sg, stride_zg, stride_ym,
                     NIBBLE_MASK, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K,
                     ONE_SHIFT: tl.constexpr = True):
    """y[m, :] = x[m, :] @ dequant(W)^T, one row m per program; grid (M * cdiv(N, BLOCK_N), SPLIT_K).
    GROUP_SIZE % BLOCK_K == 0; NIBBLE_MASK = 0x000F000F (a run-time value: see int4_mma_kernel).
    ONE_SHIFT=False is the first version (a shift and a sub per nibble pair, every word converted to fp32), kept
    for the benchmark's A/B."""
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

    nibble_mask16 = NIBBLE_MASK << 4  # 0x00F000F0, a register like NIBBLE_MASK (a LOP3 has one immediate)
    acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    w, s, z = _load_tile(QW, S, QZ, t_begin, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg, stride_zg,
                         GROUP_SIZE, HAS_ZEROS, True, ROWS, BLOCK_K, BLOCK_N)
    for t in range(t_begin, t_end):
        w_next, s_next, z_next = _load_tile(QW, S, QZ, t + 1, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg,
                                            stride_zg, GROUP_SIZE, HAS_ZEROS, True, ROWS, BLOCK_K, BLOCK_N)
        k0 = t * BLOCK_K
        j_ok = (k0 // 8 + offs_j) < K // 8
        zz = _pack(z + 1024.0, z + 1024.0)  # [1, BLOCK_N]: 1024 + zero in both halves
        nzz = _pack(-64.0 - z, -64.0 - z)  # -(64 + zero): (1024 + 16 c) / 16 - (64 + zero) = c - zero
        sums = tl.zeros([ROWS, BLOCK_N], dtype=tl.int32)  # a pair of fp16 zeros per word
        if ONE_SHIFT:
            sums = _two_pairs(w, zz, nzz, NIBBLE_MASK, nibble_mask16, x_row, k0, offs_j, j_ok, sums, 0, PACKED)
            sums = _two_pairs(w >> 8, zz, nzz, NIBBLE_MASK, nibble_mask16, x_row, k0, offs_j, j_ok, sums, 2,
                              PACKED)  # (the only shift of the word)
        else:
            for i in tl.static_range(4):
                pair = ((w >> (4 * i)) & NIBBLE_MASK) | 0x64006400  # 1024 + code of nibbles i and i + 4
                sums = _sub_fma_f16x2(pair, zz, _x_pair(x_row, k0, offs_j, j_ok, i), sums, PACKED)
        if ONE_SHIFT and ROWS <= 4:  # <= 16 products per half: add the rows' pairs in fp16, one conversion a column
            acc += _sum_halves(_sum_rows_f16x2(sums, PACKED), PACKED)[None, :] * s
        else:
            acc += tl.sum(_sum_halves(sums, PACKED), axis=0)[None, :] * s
        w, s, z = w_next, s_next, z_next

    split_k_store(acc * 16.0, Y, WS, CNT, BIAS, pid, row + tl.arange(0, 1), offs_n, row + tl.arange(0, 1) < M, n_ok,
                  N, stride_ym, HAS_BIAS, SPLIT_K, 1, BLOCK_N)
