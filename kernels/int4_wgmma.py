"""INT4 weight-only GEMM for decode with the weights as the tensor cores' *register* operand (chapter 8).

int4_mma.py multiplies x [M, K] by the unpacked weight tile, so the weights are tl.dot's second operand. On
Hopper the second operand of a warpgroup MMA (wgmma) must sit in shared memory: every unpacked pair of weights
is stored there and read back, and at M = 1 that kernel took 26 us where the weights take 7 us to read.
Here the product is computed transposed ("swap AB", as Marlin and the FP8 decode GEMMs of vLLM do):

    y^T [N, M] = W [N, K] @ x^T [K, M]

so a tile of BLOCK_N >= 64 output columns is wgmma's M side and may live in registers, where it was unpacked,
and the few activation rows (padded to 16, wgmma's N side) are the small shared-memory operand.

Unpacking lands in the operand's register order with no data movement. A 32-bit word holds 8 codes of one
output column, nibble i (K row 8j + i of word row j) in bits [4i, 4i + 4). Shift by 4i, AND 0x000F000F and OR
0x43004300 (one LOP3): the low half is the bf16 number 128 + code of nibble i, the high half 128 + code of
nibble i + 4 (0x6400 = 1024.0 for fp16, Marlin's trick). A wgmma register operand holds two *adjacent* K
positions per 32-bit register, so this kernel simply defines its K order that way: in a tile of 16 word rows
(128 K rows, one tl.dot), K position 16c + 2(4h + i) + s is nibble i + 4s of word row 8h + c. The activations are
gathered in the same order (they are tiny at decode), and the word needs no shuffling: two weights per LOP3 (plus
a shift), ~1 instruction per weight for the unpacking against int4_gemv.py's ~2.4 for everything.

The offset and the zero point come out after the dots, once per tile, as in int4_mma.py:
sum_k x_k (128 + c_k - z) = [sum_k x_k (128 + c_k)] - (128 + z) sum_k x_k (the row sums of x summed from the
tile the dot reads; a second dot against a tile of ones cost 64 register moves an iteration to rebuild the ones),
and the scale multiplies the tile's partial sums (the 128 K rows lie inside one group). Split-K and the one-launch workspace protocol are int4_mma.split_k_store's. Under the
interpreter (and for fp32 activations) both operands are fp32 (the interpreter mis-multiplies bf16 dots).

What it does on the H200 (triton 3.6, 2026-12-04, RESULTS.md twenty-first session), a lesson in itself: the wgmma
does read its weights from registers, but Triton still moves the unpacked tile through shared memory to reach the
operand's register layout, gathers x with 16-bit loads and reduces its row sums with shuffles, so the K loop costs
~5 instructions per weight, and at 118 registers only 16 warps fit an SM. Each warp's iteration is one long chain
(load, unpack, store, barrier, ldmatrix, wgmma, reduce) with nothing to overlap it: 50 us at M = 1 on
4096 -> 14336 where int4_gemv.py takes 12, L1 82% busy and DRAM 13%. At M = 32 it is the fastest launch on four
of five Llama-3-8B shapes (4-6% under int4_mma.py), which is where the dispatcher offers it. Marlin and vLLM's
Machete reach the bandwidth with what Triton does not expose here: weights pre-shuffled offline into the
operand's register order, and warp-specialised pipelines that keep loads in flight during the math.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.int4_mma import code_constants, split_k_store
from minillm.platform import triton_interpreted

__all__ = ["int4_wgmma_kernel", "launch_int4_wgmma", "WGMMA_BLOCK_K"]

WGMMA_BLOCK_K = 128  # one tile = 16 word rows = one tl.dot of K 128 (eight wgmma steps of K 16)


@triton.jit
def _halves(w, i: tl.constexpr, NIBBLE_MASK, MAGIC2: tl.constexpr, CODE_T: tl.constexpr):
    """(OFFSET + nibble i, OFFSET + nibble i + 4) of every word of w, as two tensors of CODE_T: one shift and one
    LOP3 make both, in the two 16-bit halves of one register."""
    pair = ((w >> (4 * i)) & NIBBLE_MASK) | MAGIC2
    return pair.to(tl.int16).to(CODE_T, bitcast=True), (pair >> 16).to(tl.int16).to(CODE_T, bitcast=True)


@triton.jit
def _stack8(t0, t1, t2, t3, t4, t5, t6, t7):
    """Eight [R, C] tensors -> [R, C, 2, 2, 2] with t_q where the last three indices read q in binary (tl.join adds
    its axis last, so the innermost join's pairs differ in q's top bit and the outermost in its lowest)."""
    return tl.join(tl.join(tl.join(t0, t4), tl.join(t2, t6)), tl.join(tl.join(t1, t5), tl.join(t3, t7)))


@triton.jit(do_not_specialize=["M", "SPLIT_K"])
def int4_wgmma_kernel(X, QW, S, QZ, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_qk, stride_sg, stride_zg, stride_ym,
                      NIBBLE_MASK, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      MAGIC2: tl.constexpr, OFFSET: tl.constexpr, CODE_T: tl.constexpr, UPCAST: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K):
    """y [M, N] = x [M, K] @ dequant(W)^T, computed as W @ x^T; grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K).
    BLOCK_N >= 64 (wgmma's M), BLOCK_M >= 16, GROUP_SIZE % 128 == 0, K % 128 == 0. NIBBLE_MASK = 0x000F000F as a
    run-time value (a LOP3 takes one immediate: beside the literal MAGIC2 it would be rematerialised per word);
    MAGIC2, OFFSET, CODE_T: int4_mma.code_constants(x.dtype)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, 8)
    offs_kk = tl.arange(0, 128)
    m_ok = offs_m < M
    n_ok = offs_n < N  # (all true: the launcher asks N % BLOCK_N == 0, so no load below is masked)
    k_tiles = K // 128
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, k_tiles)
    # x^T in the weights' K order: position kk = 16c + 2(4h + i) + s is K row 8 (8h + c) + i + 4s of the tile.
    # Rows past M (padding up to 16) read row M - 1 again instead of being masked; they are never stored.
    c_, h_, i_, s_ = offs_kk // 16, (offs_kk // 8) % 2, (offs_kk // 2) % 4, offs_kk % 2
    x_ptrs = (X + tl.minimum(offs_m, M - 1)[None, :].to(tl.int64) * stride_xm
              + (t_begin * 128 + 8 * (8 * h_ + c_) + i_ + 4 * s_)[:, None])
    w_ptrs = QW + (t_begin * 16 + offs_c)[None, :].to(tl.int64) * stride_qk + offs_n[:, None]
    s_ptrs = S + offs_n
    z_ptrs = QZ + offs_n // 8
    z_shift = (offs_n % 8) * 4
    w0 = tl.load(w_ptrs)
    w1 = tl.load(w_ptrs + 8 * stride_qk)

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for t in range(t_begin, t_end):
        # the next tile's words go out first (the last tile loads itself again): their latency hides behind this
        # tile's unpacking and dots
        w_ptrs += tl.where(t + 1 < t_end, 16 * stride_qk, 0)
        w0_next = tl.load(w_ptrs)
        w1_next = tl.load(w_ptrs + 8 * stride_qk)
        g = (t * 128) // GROUP_SIZE
        s = tl.load(s_ptrs + g * stride_sg).to(tl.float32)
        if HAS_ZEROS:
            z = ((tl.load(z_ptrs + g * stride_zg) >> z_shift) & 0xF).to(tl.float32)
        else:
            z = tl.full([BLOCK_N], 8.0, tl.float32)
        l0, h0 = _halves(w0, 0, NIBBLE_MASK, MAGIC2, CODE_T)
        l1, h1 = _halves(w0, 1, NIBBLE_MASK, MAGIC2, CODE_T)
        l2, h2 = _halves(w0, 2, NIBBLE_MASK, MAGIC2, CODE_T)
        l3, h3 = _halves(w0, 3, NIBBLE_MASK, MAGIC2, CODE_T)
        l4, h4 = _halves(w1, 0, NIBBLE_MASK, MAGIC2, CODE_T)
        l5, h5 = _halves(w1, 1, NIBBLE_MASK, MAGIC2, CODE_T)
        l6, h6 = _halves(w1, 2, NIBBLE_MASK, MAGIC2, CODE_T)
        l7, h7 = _halves(w1, 3, NIBBLE_MASK, MAGIC2, CODE_T)
        a = _stack8(l0, l1, l2, l3, l4, l5, l6, l7)  # lq: nibble i of word row 8h + c, q = 4h + i
        b = _stack8(h0, h1, h2, h3, h4, h5, h6, h7)  # nibble i + 4
        a = tl.join(a, b).reshape(BLOCK_N, 128)  # K position 16c + 2(4h + i) + s: nibble i + 4s of word row 8h + c
        xb = tl.load(x_ptrs)
        x_ptrs += 128
        if UPCAST:
            a, xb = a.to(tl.float32), xb.to(tl.float32)
        else:
            xb = xb.to(CODE_T)
        part = tl.dot(a, xb, input_precision=DOT_PRECISION)
        x_sum = tl.sum(xb.to(tl.float32), axis=0)  # sum_k x[m, k] over the tile
        acc += (part - x_sum[None, :] * (OFFSET + z)[:, None]) * s[:, None]
        w0, w1 = w0_next, w1_next

    split_k_store(tl.trans(acc), Y, WS, CNT, BIAS, pid, offs_m, offs_n, m_ok, n_ok, N, stride_ym, HAS_BIAS, SPLIT_K,
                  BLOCK_M, BLOCK_N)


def launch_int4_wgmma(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                      group: int, bias: torch.Tensor | None, y: torch.Tensor, ws: torch.Tensor, cnt: torch.Tensor,
                      config: dict | None = None) -> None:
    """y [M, N] = x2 [M, K] @ dequant(W)^T (+ bias) with int4_wgmma_kernel; operands checked by int4_gemm, ws /
    cnt its split-K workspace. config: BLOCK_M, BLOCK_N, SPLIT_K, num_warps, num_stages (None: the smallest tile,
    for the interpreter; int4_dispatch.py picks the GPU's)."""
    m, k = x2.shape
    n = qweight.shape[1]
    cfg = dict(BLOCK_M=16, BLOCK_N=64, SPLIT_K=1) if config is None else dict(config)
    if (cfg["BLOCK_M"] < 16 or cfg["BLOCK_N"] < 64 or n % cfg["BLOCK_N"] or group % WGMMA_BLOCK_K
            or k % WGMMA_BLOCK_K):
        raise ValueError(f"int4_wgmma needs BLOCK_M >= 16, BLOCK_N >= 64 dividing N ({n}) and K ({k}) and the group "
                         f"({group}) multiples of {WGMMA_BLOCK_K}, got {cfg}")
    interp = triton_interpreted()
    if interp:
        cfg.pop("num_warps", None), cfg.pop("num_stages", None)
    qz = qzeros if qzeros is not None else qweight  # a placeholder when symmetric
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    int4_wgmma_kernel[grid](x2, qweight, scales, qz, bias if bias is not None else scales, y, ws, cnt, m, n, k,
                            x2.stride(0), qweight.stride(0), scales.stride(0), qz.stride(0), y.stride(0), 0x000F000F,
                            GROUP_SIZE=group, HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None,
                            **code_constants(x2.dtype), UPCAST=interp or x2.dtype == torch.float32,
                            DOT_PRECISION="ieee" if interp or x2.dtype == torch.float32 else "tf32", **cfg)
