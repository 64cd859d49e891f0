"""INT4 weight-only GEMM on tensor cores with the weights unpacked two at a time, straight into bf16 (chapter 8).

int4_gemm.py's tensor-core path turns every weight into an fp32 (code - zero) with one AND and one FMA, then
rounds pairs of them to bf16 for tl.dot: about five instructions per weight in all, which at M = 1..16 costs
more time than reading the 4-bit weights from HBM. This kernel does the integer-to-float step on 16-bit halves:

* A 32-bit word holds 8 codes; nibbles i and i + 4 sit at bits 4i and 16 + 4i, one in each 16-bit half. Shift
  the word right by 4i, AND with 0x000F000F and OR in 0x43004300 (one LOP3): each half is now the bf16 number
  0x430c = 128 + c (0x4300 is 128.0, and the mantissa's unit at 128 is exactly 1). Two weights per LOP3; the
  halves become two bf16 tensors (a truncation and a 16-bit shift), which tl.dot consumes with no rounding.
  (fp16 activations use 0x6400 = 1024.0 the same way: Marlin's trick for fp16.)
* The offset and the zero point come out *after* the dot, once per tile and row instead of once per weight:
  sum_k x_k (128 + c_k - z) = [sum_k x_k (128 + c_k)] - (128 + z) sum_k x_k. The dot accumulates in fp32;
  products of bf16 numbers are exact and the offset is only ~17x the codes, so about four of fp32's 24 bits
  go to the cancellation (far below bf16's 8-bit output).
* The scale multiplies the tile's partial sums (a K tile lies inside one group: GROUP_SIZE % BLOCK_K == 0).

K order: the dot pairs activation k = 8j + i with nibble i of packed row j (activations are read with stride 8),
so no weight is moved. Rows M are padded to BLOCK_M >= 16 inside the tensor core (free at decode: the
instructions that matter are the unpacking ones, the same for 1 or 16 rows). Split-K and its workspace protocol
(split_k_store, shared with int4_gemv.py) and the tile loader are int4_gemm.py's. Under the interpreter (and for
fp32 activations) both dot operands are fp32 (the interpreter mis-multiplies bf16 dot operands); the codes are
exact in either type.

Where the unpacked weights live decides the speed. A tensor core's B operand is a register fragment: each thread
holds pairs of K-consecutive weights of one column. int4_mma_kernel's sixteen K = 16 dots per tile are written
to shared memory and read back in that layout (ptxas, sm_90: 16 buffers a tile). int4_mma_tile_kernel makes the
pair the unit instead: the LOP3 already leaves nibbles i and i + 4 side by side in one 32-bit register, so if
the operand's K rows are ordered 8j + 2i + h (nibble i + 4h of word row j) that register *is* the fragment's
pair. The pairs are joined, transposed and reshaped into one [BLOCK_K, BLOCK_N] operand, all inside each thread,
and where the warps split only the columns (BLOCK_N = 16 x num_warps) Triton keeps it in registers: one dot per
tile, the activations gathered in the same K order, about four instructions per weight whatever M <= 16. (The
packed words still take one layout conversion through shared memory as they arrive, 4 bytes per 8 weights,
where int4_mma_kernel writes and reads back 2 bytes per weight.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.int4_gemm import _load_tile, group_scale_zero
from minillm.platform import triton_interpreted

__all__ = ["code_constants", "int4_mma_kernel", "int4_mma_tile_kernel", "launch_int4_mma", "split_k_store",
           "tile_operand", "tile_operand_k"]


def code_constants(dtype: torch.dtype) -> dict:
    """The constexprs that turn a word's nibbles into 16-bit floats of the activations' type: MAGIC2, the
    exponent OR-ed into both halves of a word (1024.0 in each fp16 half: 1024 + c, unit 1; for bf16 and fp32
    activations 128.0 in each bf16 half: 128 + c), OFFSET, the value code 0 becomes, and CODE_T, the halves' type."""
    if dtype == torch.float16:
        return dict(MAGIC2=0x64006400, OFFSET=1024.0, CODE_T=tl.float16)
    return dict(MAGIC2=0x43004300, OFFSET=128.0, CODE_T=tl.bfloat16)


@triton.jit
def split_k_store(acc, Y, WS, CNT, BIAS, tile, offs_m, offs_n, m_ok, n_ok, N, stride_ym, HAS_BIAS: tl.constexpr,
                  SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write a program's fp32 partial tile acc [BLOCK_M, BLOCK_N] of y (+ bias), in one launch however K was
    split: with SPLIT_K > 1 each split adds its partial into the fp32 workspace WS and bumps the tile's counter;
    the last to arrive reads the sum (at L2, through atomics), writes y and zeroes the workspace and the counter
    again, so the next call (or a CUDA-graph replay) finds them clean. int4_gemm.py's kernel does the same.
    Atomics add in arrival order, so the last bits of y may differ from run to run; gemv.py's store_rows keeps a
    slot per split and adds them in order instead (bit-repeatable), at the price of SPLIT_K x M x N fp32 slots."""
    y_mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)
    else:
        ws_ptrs = WS + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=y_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is in before the counter says so (release below)
        arrived = tl.atomic_add(CNT + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.atomic_add(ws_ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=y_mask, sem="acquire")
            if HAS_BIAS:
                total += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=y_mask)
            tl.store(ws_ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=y_mask)
            tl.atomic_xchg(CNT + tile, 0)


@triton.jit
def _program_tiles(M, N, K, SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's share of a split-K GEMM on grid (row tiles x column tiles, SPLIT_K): (its tile index, row and
    column offsets, their masks, and the K tiles [t_begin, t_end) it sums)."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = tl.program_id(1) * per_split
    return pid, offs_m, offs_n, offs_m < M, offs_n < N, t_begin, tl.minimum(t_begin + per_split, k_tiles)


@triton.jit(do_not_specialize=["M", "M_BUCKET", "SPLIT_K"])  # one compile for every M and split
def int4_mma_kernel(X, QW, S, QZ, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_qk, stride_sg, stride_zg, stride_ym,
                    M_BUCKET, NIBBLE_MASK, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                    MAGIC2: tl.constexpr, OFFSET: tl.constexpr, CODE_T: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K):
    """y [M, N] = x [M, K] @ dequant(W)^T; grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K);
    GROUP_SIZE % BLOCK_K == 0, BLOCK_K >= 128 (16 packed rows: tl.dot's K), BLOCK_M >= 16. M_BUCKET (M rounded
    up to a power of two) is only the autotuner's key. MAGIC2, OFFSET, CODE_T: code_constants(x.dtype).
    NIBBLE_MASK = 0x000F000F arrives as a run-time value: as a literal beside the literal MAGIC2 the compiler
    would rematerialise one of the two constants for every word (a LOP3 takes one immediate operand)."""
    ROWS: tl.constexpr = BLOCK_K // 8
    pid, offs_m, offs_n, m_ok, n_ok, t_begin, t_end = _program_tiles(M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_j = tl.arange(0, ROWS)
    x_rows = X + offs_m[:, None].to(tl.int64) * stride_xm

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w, s, z = _load_tile(QW, S, QZ, t_begin, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg, stride_zg,
                         GROUP_SIZE, HAS_ZEROS, True, ROWS, BLOCK_K, BLOCK_N)
    for t in range(t_begin, t_end):
        # the next tile's loads go out first: their latency hides behind this tile's unpacking
        w_next, s_next, z_next = _load_tile(QW, S, QZ, t + 1, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg,
                                            stride_zg, GROUP_SIZE, HAS_ZEROS, True, ROWS, BLOCK_K, BLOCK_N)
        k0 = t * BLOCK_K
        x_ok = m_ok[:, None] & ((k0 // 8 + offs_j) < K // 8)[None, :]
        part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_sum = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # sum_k x[m, k] over the tile, in every column
        for i in tl.static_range(4):
            pair = ((w >> (4 * i)) & NIBBLE_MASK) | MAGIC2  # nibbles i and i + 4, one per 16-bit half
            lo = pair.to(tl.int16).to(CODE_T, bitcast=True)  # OFFSET + code of K rows 8j + i
            hi = (pair >> 16).to(tl.int16).to(CODE_T, bitcast=True)  # OFFSET + code of K rows 8j + i + 4
            x_lo = tl.load(x_rows + (k0 + 8 * offs_j + i)[None, :], mask=x_ok, other=0.0)
            x_hi = tl.load(x_rows + (k0 + 8 * offs_j + i + 4)[None, :], mask=x_ok, other=0.0)
            if UPCAST:
                x_lo, x_hi, lo, hi = x_lo.to(tl.float32), x_hi.to(tl.float32), lo.to(tl.float32), hi.to(tl.float32)
            else:
                lo, hi = lo.to(x_lo.dtype), hi.to(x_hi.dtype)
            part = tl.dot(x_lo, lo, part, input_precision=DOT_PRECISION)
            part = tl.dot(x_hi, hi, part, input_precision=DOT_PRECISION)
            # the row sums of x on the tensor cores too (a dot with ones lands them in part's own layout)
            ones = tl.full([ROWS, BLOCK_N], 1.0, x_lo.dtype)
            x_sum = tl.dot(x_lo, ones, x_sum, input_precision=DOT_PRECISION)
            x_sum = tl.dot(x_hi, ones, x_sum, input_precision=DOT_PRECISION)
        # remove the offset and the zero point once per tile and row, then scale once per tile
        acc += (part - x_sum * (OFFSET + z)) * s
        w, s, z = w_next, s_next, z_next

    split_k_store(acc, Y, WS, CNT, BIAS, pid, offs_m, offs_n, m_ok, n_ok, N, stride_ym, HAS_BIAS, SPLIT_K,
                  BLOCK_M, BLOCK_N)


@triton.jit
def _even_tile(QW, S, QZ, t, more, offs_j, offs_n, stride_qk, stride_sg, stride_zg, GROUP_SIZE: tl.constexpr,
               HAS_ZEROS: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """_load_tile's words, scales and zeros of K tile t where tiles divide the matrix: one predicate (`more`,
    false for the prefetch past a program's last tile) instead of row and column masks."""
    w = tl.load(QW + (t * ROWS + offs_j)[:, None].to(tl.int64) * stride_qk + offs_n[None, :],
                mask=(offs_j[:, None] * 0 + more) != 0, other=0)
    s, z = group_scale_zero(S, QZ, (t * BLOCK_K) // GROUP_SIZE, offs_n, (offs_n * 0 + more) != 0, stride_sg,
                            stride_zg, HAS_ZEROS, BLOCK_N)
    return w, s, z


@triton.jit
def tile_operand_k(BLOCK_K: tl.constexpr):
    """[BLOCK_K]: the activation column (within the tile) that row r of the joined operand multiplies: row
    r = 8j + 2i + h holds nibble i + 4h of word row j, which is weight row 8j + i + 4h."""
    r = tl.arange(0, BLOCK_K)
    return (r // 8) * 8 + (r % 8) // 2 + 4 * (r % 2)


@triton.jit
def tile_operand(w, NIBBLE_MASK, MAGIC2: tl.constexpr, CODE_T: tl.constexpr):
    """The packed words w [BLOCK_K / 8, BLOCK_N] as one [BLOCK_K, BLOCK_N] dot operand of OFFSET + code halves in
    tile_operand_k's row order: one LOP3 leaves nibbles i and i + 4 side by side in a register (a fragment's pair);
    the join, transpose and reshape stay inside each thread."""
    pair = ((w[:, None, :] >> (4 * tl.arange(0, 4))[None, :, None]) & NIBBLE_MASK) | MAGIC2  # [ROWS, 4, BLOCK_N]
    lo = pair.to(tl.int16).to(CODE_T, bitcast=True)
    hi = (pair >> 16).to(tl.int16).to(CODE_T, bitcast=True)
    return tl.reshape(tl.join(lo, hi).permute(0, 1, 3, 2), [w.shape[0] * 8, w.shape[1]])


@triton.jit(do_not_specialize=["M", "M_BUCKET", "SPLIT_K"])
def int4_mma_tile_kernel(X, QW, S, QZ, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_qk, stride_sg, stride_zg,
                         stride_ym, M_BUCKET, NIBBLE_MASK, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                         HAS_BIAS: tl.constexpr, MAGIC2: tl.constexpr, OFFSET: tl.constexpr, CODE_T: tl.constexpr,
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K, EVEN: tl.constexpr = False):
    """int4_mma_kernel's arithmetic with one dot per K tile instead of sixteen: the pairs of every word are joined
    into a single [BLOCK_K, BLOCK_N] operand whose K rows are ordered 8j + 2i + h <- nibble i + 4h of word row j
    (activations gathered in that order). The join, the transpose and the reshape are all inside each thread's
    registers, so where the warps split only the columns (BLOCK_N = 16 x num_warps) Triton lays the unpacked
    tile out in the tensor core's operand layout directly: the unpacked weights never touch shared memory, which
    int4_mma_kernel's small dots cross sixteen times a tile (in the loop, ptxas sm_90 at N128 x 8 warps: the
    activations' buffer and one layout conversion of the packed words, 4 bytes per 8 weights). The rows' sums of
    x come from a second dot, with ones (a reduction across lanes costs shuffles). Same constraints and arguments
    as int4_mma_kernel; EVEN (N % BLOCK_N == 0 and K % BLOCK_K == 0, every real layer): no masks in the loop but
    the last prefetch's, rows past M reading row M - 1 again (never stored)."""
    ROWS: tl.constexpr = BLOCK_K // 8
    pid, offs_m, offs_n, m_ok, n_ok, t_begin, t_end = _program_tiles(M, N, K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_j = tl.arange(0, ROWS)
    r = tl.arange(0, BLOCK_K)
    x_rows = tl.minimum(offs_m, M - 1) if EVEN else offs_m
    x_ptrs = X + x_rows[:, None].to(tl.int64) * stride_xm + tile_operand_k(BLOCK_K)[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w, s, z = _load_tile(QW, S, QZ, t_begin, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg, stride_zg,
                         GROUP_SIZE, HAS_ZEROS, True, ROWS, BLOCK_K, BLOCK_N)
    for t in range(t_begin, t_end):
        k0 = t * BLOCK_K
        if EVEN:
            w_next, s_next, z_next = _even_tile(QW, S, QZ, t + 1, t + 1 < t_end, offs_j, offs_n, stride_qk,
                                                stride_sg, stride_zg, GROUP_SIZE, HAS_ZEROS, ROWS, BLOCK_K, BLOCK_N)
            x = tl.load(x_ptrs + k0)
        else:
            w_next, s_next, z_next = _load_tile(QW, S, QZ, t + 1, t_end, offs_j, offs_n, n_ok, K, stride_qk,
                                                stride_sg, stride_zg, GROUP_SIZE, HAS_ZEROS, True, ROWS, BLOCK_K,
                                                BLOCK_N)
            x = tl.load(x_ptrs + k0, mask=m_ok[:, None] & (k0 + r < K)[None, :], other=0.0)
        codes = tile_operand(w, NIBBLE_MASK, MAGIC2, CODE_T)  # OFFSET + code
        xd = x.to(tl.float32) if UPCAST else x
        part = tl.dot(xd, codes.to(xd.dtype), input_precision=DOT_PRECISION)
        # the rows' sums of x on the tensor cores too: a dot with ones lands them in part's own layout
        x_sum = tl.dot(xd, tl.full([BLOCK_K, BLOCK_N], 1.0, xd.dtype), input_precision=DOT_PRECISION)
        acc += (part - x_sum * (OFFSET + z)) * s
        w, s, z = w_next, s_next, z_next

    split_k_store(acc, Y, WS, CNT, BIAS, pid, offs_m, offs_n, m_ok, n_ok, N, stride_ym, HAS_BIAS, SPLIT_K,
                  BLOCK_M, BLOCK_N)


def launch_int4_mma(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                    group: int, bias: torch.Tensor | None, y: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor,
                    config: dict | None = None, tile_dot: bool = False) -> None:
    """y [M, N] = x2 [M, K] @ dequant(W)^T (+ bias) with int4_mma_kernel (int4_mma_tile_kernel with `tile_dot`);
    operands already checked by int4_gemm, ws / cnt its split-K workspace. config: BLOCK_M, BLOCK_N, BLOCK_K,
    SPLIT_K, num_warps, num_stages (None: one small tile, for the interpreter; int4_dispatch.py picks the GPU's)."""
    m, k = x2.shape
    n = qweight.shape[1]
    interp = triton_interpreted()
    qz = qzeros if qzeros is not None else qweight  # a placeholder when symmetric
    args = (x2, qweight, scales, qz, bias if bias is not None else scales, y, ws, cnt, m, n, k, x2.stride(0),
            qweight.stride(0), scales.stride(0), qz.stride(0), y.stride(0), min(triton.next_power_of_2(m), 256),
            0x000F000F)
    consts = dict(GROUP_SIZE=group, HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None,
                  **code_constants(x2.dtype), UPCAST=interp or x2.dtype == torch.float32,
                  DOT_PRECISION="ieee" if interp or x2.dtype == torch.float32 else "tf32")
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=1) if config is None else dict(config)
    if cfg["BLOCK_M"] < 16 or cfg["BLOCK_K"] < 128 or group % cfg["BLOCK_K"]:
        raise ValueError(f"int4_mma needs BLOCK_M >= 16, BLOCK_K >= 128 dividing the group ({group}), got {cfg}")
    if interp:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    if tile_dot:
        consts["EVEN"] = n % cfg["BLOCK_N"] == 0 and k % cfg["BLOCK_K"] == 0
    (int4_mma_tile_kernel if tile_dot else int4_mma_kernel)[grid](*args, **consts, **cfg)
