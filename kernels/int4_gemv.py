"""INT4 weight-only GEMV for decode (M = 1..4) on CUDA cores with packed half-precision math (chapter 8).

A decode GEMV reads every weight once, so it should run at HBM speed: 4096 x 14336 4-bit weights are 29 MB, 7 us
at the H200's 4.2 TB/s. What Nsight Compute showed about the first version of this kernel (H200, 2026-12-03) is
the lesson of this file: it was neither bandwidth- nor instruction-bound but *latency*-bound. 254 registers per
thread allowed 8 warps per SM, the grid gave 1.7, and each warp waited on its own loads and its own dependent
arithmetic (one instruction issued every 2-3 cycles per scheduler, 18-38% of issue slots used, DRAM 19-38% busy).
A load-only kernel with the same tiles was just as slow at the same split; with enough warps it read at ~9 us.
So this version spends fewer registers and fewer instructions per weight, and lets more warps be in flight:

* One AND-OR (LOP3) puts nibbles i and i + 4 of a packed word into the two fp16 halves of a 32-bit register as
  1024 + c (0x6400 is 1024.0 in fp16, whose mantissa unit at 1024 is exactly 1): two weights per instruction.
  Nibbles 1 / 5 are masked where they lie (1024 + 16c) and the word is shifted once, by 8, for nibbles 2-7
  (Marlin's arrangement): one shift per word of eight weights.
* One fma.rn.f16x2 turns both halves into (c - zero) / 16: times 1/16 (or 1/256 for 1024 + 16c) plus
  -(1024 + zero) / 16 (or -(64 + zero) / 16), exact in fp16 since the result is a multiple of 1/16 below 1.
  A second fma.rn.f16x2 multiplies by the activations and accumulates: 2 instructions per pair of weights.
  The 1/16 is the headroom that keeps fp16 sums of up to 32 products (BLOCK_K = 64) of |x| < ~2,000 in range;
  carrying it in the weights leaves the activations untouched, so each activation pair costs only two loads
  and one cvt.rn.f16x2.f32 (the first version scaled, rounded and packed each half: ~12 instructions a pair).
  bf16 activations come two per 32-bit load (2.75 instructions per weight); fp16 ones (an fp16 model, as vLLM
  serves AWQ and GPTQ checkpoints) are already halves: a word row's eight come in two 64-bit loads and each pair
  is one byte permute (2.43).
* Each thread holds whole columns of a tile (one warp spans the tile's columns): the tile's rows are summed in
  fp16 pairs inside the thread (add.f16x2), then each column becomes one fp32 number, times the group's scale.
* No masks in the loop: the dispatcher offers this kernel only where N % BLOCK_N == 0 and K % (SPLIT_K x
  BLOCK_K) == 0 (every real layer); PREFETCH loads the next tile's words before this tile's arithmetic, which
  hides one load latency per tile at the price of a second set of word registers.
fp16 carries 11 significant bits: with sums of up to 32 products per half the result keeps ~1e-3 relative
accuracy (bf16's own output rounding is 4e-3; the tests bound it at 3e-3). ptxas (sm_90) counts ~2.6-2.9
instructions per weight in the loop, 96-128 registers. Split-K adds the programs' partial sums with
int4_mma.py's protocol (one launch, the last split writes y).

int4_gemv_tma_kernel is the same arithmetic with the words brought by Hopper's TMA engine: a host-side tensor
descriptor of qweight, loads that tl.range pipelines STAGES deep into shared memory, so the bytes in flight cost
neither registers nor per-thread load instructions (3.5 instructions per weight with the shared-memory reads, 96-128
registers, 10-20 KB of shared memory per program). The dispatcher offers it on sm_90 and later. Timed on the
H200 (2026-12-04) it was never faster (15.8 us against 14.2 at 4096 -> 14336): bytes in flight were no longer the
limit once the register kernel was rewritten; its loads alone run at a flat read's 9 us, the arithmetic costs the rest.

The packed instructions are PTX (tl.inline_asm_elementwise) and run only on a GPU; under the interpreter
(PACKED=False) the same arithmetic runs half by half in plain Triton (each step rounded to fp16), so the CPU
tests check the algorithm. Layout: int4_gemm.py's (GPTQ's qweight [K // 8, N], scales, packed qzeros).
"""
from __future__ import annotations

import triton
import triton.language as tl

from minillm.kernels.int4_mma import split_k_store
from minillm.kernels.pdl import grid_dependency_sync

__all__ = ["int4_gemv_kernel", "int4_gemv_tma_kernel", "gemv_fits"]

MAGIC2: tl.constexpr = tl.constexpr(0x64006400)  # 1024.0 in both fp16 halves
SIXTEENTH2: tl.constexpr = tl.constexpr(0x2C002C00)  # 1/16 in both halves
INV256_2: tl.constexpr = tl.constexpr(0x1C001C00)  # 1/256 in both halves


def gemv_fits(n: int, k: int, group: int, block_n: int, block_k: int, split_k: int) -> bool:
    """Whether a launch covers the shape with whole tiles (the kernel has no masks)."""
    return n % block_n == 0 and k % (split_k * block_k) == 0 and group % block_k == 0 and block_k % 8 == 0


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
def _fma_f16x2(a, b, c, PACKED: tl.constexpr):
    """a * b + c on both fp16 halves of int32 words (fma.rn.f16x2: one rounding)."""
    if PACKED:
        return tl.inline_asm_elementwise(asm="fma.rn.f16x2 $0, $1, $2, $3;", constraints="=r,r,r,r",
                                         args=[a, b, c], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return _pack(_half(a, 0) * _half(b, 0) + _half(c, 0), _half(a, 1) * _half(b, 1) + _half(c, 1))


@triton.jit
def _add_f16x2(a, b):
    """add.f16x2 of two int32 words (the rows' reduction combine, PTX)."""
    return tl.inline_asm_elementwise(asm="add.rn.f16x2 $0, $1, $2;", constraints="=r,r,r", args=[a, b],
                                     dtype=tl.int32, is_pure=True, pack=1)


# The four activation pairs of a word row from its two 64-bit words A = x[8j .. 8j+3], B = x[8j+4 .. 8j+7] of
# fp16 activations, each word two 32-bit halves (al = x[8j], x[8j+1]; ah = x[8j+2], x[8j+3]): pair i = (x[8j+i],
# x[8j+i+4]) is one byte permute (prmt) of two halves, already the fp16 pair the fma wants.
_PAIRS_FP16 = tl.constexpr(
    "{ .reg .b32 al, ah, bl, bh; mov.b64 {al, ah}, $4; mov.b64 {bl, bh}, $5; "
    "prmt.b32 $0, al, bl, 0x5410; prmt.b32 $1, al, bl, 0x7632; "
    "prmt.b32 $2, ah, bh, 0x5410; prmt.b32 $3, ah, bh, 0x7632; }")


# bf16: pairs 2h and 2h + 1 from a = x[8j+2h], x[8j+2h+1] and b = x[8j+2h+4], x[8j+2h+5] (two 32-bit words)
_PAIRS_BF16 = tl.constexpr(
    "{ .reg .b32 fa, fb; shl.b32 fa, $2, 16; shl.b32 fb, $3, 16; cvt.rn.f16x2.f32 $0, fb, fa; "
    "and.b32 fa, $2, 0xFFFF0000; and.b32 fb, $3, 0xFFFF0000; cvt.rn.f16x2.f32 $1, fb, fa; }")


@triton.jit
def _x_pairs_bf16(x_ptrs, PACKED: tl.constexpr):
    """bf16 activations: the pairs (x[8j + i], x[8j + i + 4]) for i = 2h and 2h + 1 (x_ptrs -> x[8j + 2h], 4-byte
    aligned: the launcher checks) as two tensors of fp16 pairs shaped as x_ptrs, from two 32-bit loads per row,
    a = x[8j + 2h .. +1] and b = x[8j + 2h + 4 .. +5]: a bf16 is the top half of an fp32, so a shift (low half) or a
    mask (high half) widens it, and one cvt.rn.f16x2.f32 rounds a pair (2.75 instructions per weight against 2.85 for
    a load per activation, 128 registers both: ptxas, sm_90, N256 x 2 warps)."""
    words = x_ptrs.to(tl.pointer_type(tl.int32), bitcast=True)
    a = tl.load(words)
    b = tl.load(words + 2)
    if PACKED:
        p0, p1 = tl.inline_asm_elementwise(asm=_PAIRS_BF16, constraints="=r,=r,r,r", args=[a, b],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        p0 = _pack((a << 16).to(tl.float32, bitcast=True), (b << 16).to(tl.float32, bitcast=True))
        p1 = _pack((a & -65536).to(tl.float32, bitcast=True), (b & -65536).to(tl.float32, bitcast=True))
    return p0, p1


@triton.jit
def _x_half(v, I: tl.constexpr):
    """fp16 element I (0..3) of 64-bit words holding four of them, as fp32 (the interpreter's path)."""
    return ((v >> (16 * I)) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _x_pair(x_ptrs, PACKED: tl.constexpr):
    """x[8j + i] and x[8j + i + 4] (x_ptrs -> x[8j + i]) as fp16 pairs shaped as x_ptrs, one load each, widened to
    fp32 and rounded in pairs (cvt.rn.f16x2.f32)."""
    lo = tl.load(x_ptrs).to(tl.float32)
    hi = tl.load(x_ptrs + 4).to(tl.float32)
    if PACKED:
        pair = tl.inline_asm_elementwise(asm="cvt.rn.f16x2.f32 $0, $2, $1;", constraints="=r,f,f", args=[lo, hi],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        pair = _pack(lo, hi)
    return pair


@triton.jit
def _x_pairs_fp16(x_ptrs, PACKED: tl.constexpr):
    """fp16 activations (how vLLM serves AWQ and GPTQ models): the pairs (x[8j + i], x[8j + i + 4]), i = 0..3, of
    every word row j (x_ptrs -> x[8j], 8-byte aligned: the launcher checks) as four tensors of fp16
    pairs, from two 64-bit loads per row and one permute per pair. ptxas (sm_90, N256 x 2 warps): 2.43
    instructions per weight in the K loop at 128 registers, against 2.75 for bf16's 32-bit loads, widening and
    rounding. (bf16 from 64-bit loads counted 2.70 but took 142 registers: all four pairs live at once.)"""
    words = x_ptrs.to(tl.pointer_type(tl.int64), bitcast=True)
    a = tl.load(words)
    b = tl.load(words + 1)
    if PACKED:
        p0, p1, p2, p3 = tl.inline_asm_elementwise(asm=_PAIRS_FP16, constraints="=r,=r,=r,=r,l,l", args=[a, b],
                                                   dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True,
                                                   pack=1)
    else:
        p0 = _pack(_x_half(a, 0), _x_half(b, 0))
        p1 = _pack(_x_half(a, 1), _x_half(b, 1))
        p2 = _pack(_x_half(a, 2), _x_half(b, 2))
        p3 = _pack(_x_half(a, 3), _x_half(b, 3))
    return p0, p1, p2, p3


@triton.jit
def _column_sums(sums, PACKED: tl.constexpr):
    """[ROWS, BLOCK_N] fp16 pairs -> fp32 [BLOCK_N] (or [BLOCK_M, ROWS, BLOCK_N] -> [BLOCK_M, BLOCK_N]): the word
    rows added as fp16 pairs (inside each thread on a GPU), then each column's two halves converted and added."""
    AXIS: tl.constexpr = len(sums.shape) - 2
    if PACKED:
        col = tl.reduce(sums, AXIS, _add_f16x2)
        return tl.inline_asm_elementwise(
            asm="{ .reg .f16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; cvt.f32.f16 b, h; "
                "add.f32 $0, a, b; }",
            constraints="=f,r", args=[col], dtype=tl.float32, is_pure=True, pack=1)
    else:  # (a tl.reduce with a custom combine crawls under the interpreter: each half in fp32, rounded once)
        lo = tl.sum(_half(sums, 0), axis=AXIS).to(tl.float16).to(tl.float32)
        hi = tl.sum(_half(sums, 1), axis=AXIS).to(tl.float16).to(tl.float32)
        return lo + hi


@triton.jit
def _per_row(t, BLOCK_M: tl.constexpr):
    """A [ROWS or 1, BLOCK_N] tensor of the weights' side, given the activation rows' axis when there are several."""
    if BLOCK_M == 1:
        return t
    else:
        return t[None, :, :]


@triton.jit
def _per_column(p, BLOCK_M: tl.constexpr):
    """Activation pairs [ROWS] (or [BLOCK_M, ROWS]) given the columns' axis: [ROWS, 1] ([BLOCK_M, ROWS, 1])."""
    if BLOCK_M == 1:
        return p[:, None]
    else:
        return p[:, :, None]


@triton.jit
def _tile_product(w, x_ptrs, S, QZ, g, offs_n, stride_sg, stride_zg, NIBBLE_MASK, HAS_ZEROS: tl.constexpr,
                  PACKED: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One K tile's contribution divided by 16: the packed words w [ROWS, BLOCK_N] (group g) times the activations
    at x_ptrs (x[8j + 0] for word row j: [ROWS] for one row, fp32 [BLOCK_N] out; [BLOCK_M, ROWS] for BLOCK_M rows,
    fp32 [BLOCK_M, BLOCK_N] out). With several rows the codes are unpacked once, [1, ROWS, BLOCK_N], and serve
    them all; one row keeps the 2-D tensors, whose code ptxas schedules best (3-D costs M = 1 ~0.4 instructions
    per weight more: sm_90, triton 3.9)."""
    s = tl.load(S + g * stride_sg + offs_n).to(tl.float32)
    if HAS_ZEROS:
        zw = tl.load(QZ + g * stride_zg + offs_n // 8)
        z = ((zw >> ((offs_n % 8) * 4)) & 0xF).to(tl.float32)
    else:
        z = tl.full([BLOCK_N], 8.0, tl.float32)
    # (1024 + c) / 16 - (1024 + z) / 16 and (1024 + 16c) / 256 - (64 + z) / 16 are both (c - z) / 16
    off_lo = _per_row(_pack(-(1024.0 + z) * 0.0625, -(1024.0 + z) * 0.0625)[None, :], BLOCK_M)
    off_hi = _per_row(_pack(-(64.0 + z) * 0.0625, -(64.0 + z) * 0.0625)[None, :], BLOCK_M)
    sixteenth = _per_row(tl.full([1, BLOCK_N], SIXTEENTH2, tl.int32), BLOCK_M)
    inv256 = _per_row(tl.full([1, BLOCK_N], INV256_2, tl.int32), BLOCK_M)
    mask16 = NIBBLE_MASK << 4  # nibbles 1 and 5 where they lie
    # a pair of fp16 zeros per word (and per activation row)
    sums = tl.zeros([ROWS, BLOCK_N], tl.int32) if BLOCK_M == 1 else tl.zeros([BLOCK_M, ROWS, BLOCK_N], tl.int32)
    HALF: tl.constexpr = x_ptrs.dtype.element_ty == tl.float16
    if HALF:  # the row's four pairs from two 64-bit loads
        x0, x1, x2, x3 = _x_pairs_fp16(x_ptrs, PACKED)
    for h in tl.static_range(2):  # h = 0: nibbles 0/4 and 1/5; h = 1 (the word >> 8): 2/6 and 3/7
        if HALF:
            xa = x0 if h == 0 else x2
            xb = x1 if h == 0 else x3
        elif x_ptrs.dtype.element_ty == tl.bfloat16:
            xa, xb = _x_pairs_bf16(x_ptrs + 2 * h, PACKED)
        else:  # the interpreter's fp32: one load per activation
            xa = _x_pair(x_ptrs + 2 * h, PACKED)
            xb = _x_pair(x_ptrs + 2 * h + 1, PACKED)
        wh = _per_row(w >> (8 * h), BLOCK_M)
        codes = _fma_f16x2((wh & NIBBLE_MASK) | MAGIC2, sixteenth, off_lo, PACKED)
        sums = _fma_f16x2(codes, _per_column(xa, BLOCK_M), sums, PACKED)
        codes = _fma_f16x2((wh & mask16) | MAGIC2, inv256, off_hi, PACKED)
        sums = _fma_f16x2(codes, _per_column(xb, BLOCK_M), sums, PACKED)
    return _column_sums(sums, PACKED) * s


@triton.jit
def _activation_rows(X, M, pid_m, stride_xm, k_begin, BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """Rows pid_m * BLOCK_M .. + BLOCK_M of x: (pointers to x[m, k_begin + 8j], [ROWS] for one row and [BLOCK_M,
    ROWS] for more; the row indices [BLOCK_M]; which of them are real). Rows past M read row M - 1 again (no masks
    in the loop) and are not stored."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        x_ptrs = X + pid_m.to(tl.int64) * stride_xm + k_begin + 8 * tl.arange(0, ROWS)
    else:
        rows = tl.minimum(offs_m, M - 1).to(tl.int64)
        x_ptrs = X + rows[:, None] * stride_xm + k_begin + 8 * tl.arange(0, ROWS)[None, :]
    return x_ptrs, offs_m, offs_m < M


@triton.jit
def _as_tile(acc, BLOCK_M: tl.constexpr):
    """The accumulator as the [BLOCK_M, BLOCK_N] tile split_k_store writes."""
    if BLOCK_M == 1:
        return acc[None, :]
    else:
        return acc


@triton.jit(do_not_specialize=["M", "SPLIT_K"])  # one compile for every M and split
def int4_gemv_kernel(X, QW, S, QZ, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_qk, stride_sg, stride_zg, stride_ym,
                     NIBBLE_MASK, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K,
                     PREFETCH: tl.constexpr = True, BLOCK_M: tl.constexpr = 1, PDL: tl.constexpr = False):
    """y[m, :] = x[m, :] @ dequant(W)^T for BLOCK_M rows m per program; grid (cdiv(M, BLOCK_M) * N // BLOCK_N,
    SPLIT_K), every program K // SPLIT_K rows of K in tiles of BLOCK_K (gemv_fits must hold). With BLOCK_M > 1 each
    word is unpacked once for all the program's rows: one LOP3 and one fma per pair of weights, then one fma per
    pair and row. ptxas counts 1.3 instructions per weight and row at BLOCK_M = 4 against 2.4-2.75 for one row, but
    the price is registers (~220: 9 warps per SM), and the kernel stays latency-bound: on the H200 four rows took
    1.9x one row's time (4096 -> 14336: 26.1 against 13.6 us), 5-24% under the tensor-core kernel, and two rows in
    one program were no faster than two one-row programs (RESULTS.md, nineteenth session). NIBBLE_MASK =
    0x000F000F, a run-time value (a LOP3 takes one immediate operand: as a literal beside MAGIC2 it would be
    rematerialised for every word). PDL (pdl.py): the first tile of words, which no kernel writes, is requested
    before the wait for the previous kernel, so it arrives while that kernel drains."""
    ROWS: tl.constexpr = BLOCK_K // 8  # packed word rows per tile
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = N // BLOCK_N
    offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, ROWS)
    k_per = K // SPLIT_K
    k_begin = pid_k * k_per
    w_ptrs = QW + (k_begin // 8 + offs_j)[:, None].to(tl.int64) * stride_qk + offs_n[None, :]
    x_ptrs, offs_m, m_ok = _activation_rows(X, M, pid // num_n, stride_xm, k_begin, BLOCK_M, ROWS)
    acc = tl.zeros([BLOCK_N], tl.float32) if BLOCK_M == 1 else tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PREFETCH:
        w_next = tl.load(w_ptrs)
    grid_dependency_sync(PDL)  # x, the workspace and y belong to earlier kernels until here
    for k0 in range(k_begin, k_begin + k_per, BLOCK_K):
        if PREFETCH:  # this tile's words arrived during the last tile's arithmetic; ask for the next tile's now
            w = w_next
            more = k0 + BLOCK_K < k_begin + k_per
            w_next = tl.load(w_ptrs + ROWS * stride_qk, mask=(offs_j[:, None] * 0 + more) != 0, other=0)
        else:
            w = tl.load(w_ptrs)
        acc += _tile_product(w, x_ptrs, S, QZ, k0 // GROUP_SIZE, offs_n, stride_sg, stride_zg, NIBBLE_MASK, HAS_ZEROS,
                             PACKED, BLOCK_M, ROWS, BLOCK_N)
        w_ptrs += ROWS * stride_qk
        x_ptrs += BLOCK_K

    split_k_store(_as_tile(acc * 16.0, BLOCK_M), Y, WS, CNT, BIAS, pid, offs_m, offs_n, m_ok, offs_n < N, N,
                  stride_ym, HAS_BIAS, SPLIT_K, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def int4_gemv_tma_kernel(X, W_DESC, S, QZ, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_sg, stride_zg, stride_ym,
                         NIBBLE_MASK, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K,
                         STAGES: tl.constexpr, PDL: tl.constexpr = False):
    """int4_gemv_kernel (one row per program) with the words brought in by the TMA engine (Hopper): W_DESC is a
    host-side tensor descriptor of qweight [K // 8, N] with block [BLOCK_K // 8, BLOCK_N], and tl.range pipelines its
    loads STAGES deep into shared memory. The bytes in flight then cost no registers and no load instructions per
    thread (one thread issues a tile's copy), where the register prefetch holds a second tile of words in every
    thread: the measured limit of int4_gemv_kernel was bytes in flight per SM, not arithmetic."""
    grid_dependency_sync(PDL)
    ROWS: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = N // BLOCK_N
    n0 = (pid % num_n) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k_per = K // SPLIT_K
    k_begin = pid_k * k_per
    x_ptrs, offs_m, m_ok = _activation_rows(X, M, pid // num_n, stride_xm, 0, 1, ROWS)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_begin, k_begin + k_per, BLOCK_K, num_stages=STAGES):
        w = W_DESC.load([k0 // 8, n0])
        acc += _tile_product(w, x_ptrs + k0, S, QZ, k0 // GROUP_SIZE, offs_n, stride_sg, stride_zg, NIBBLE_MASK,
                             HAS_ZEROS, PACKED, 1, ROWS, BLOCK_N)
    split_k_store(_as_tile(acc * 16.0, 1), Y, WS, CNT, BIAS, pid, offs_m, offs_n, m_ok, offs_n < N, N, stride_ym,
                  HAS_BIAS, SPLIT_K, 1, BLOCK_N)
