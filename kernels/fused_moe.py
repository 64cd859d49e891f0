"""A mixture-of-experts MLP in three launches: every expert's rows in one grouped GEMM (chapter 11, the GPU path).

minillm/layers/moe.py runs a MoE layer as the reference code does: sort the (token, expert) rows by expert, then
for each expert a gather and two matmuls. On a GPU that is four or more launches per expert, so a decode step of
a model with 64-128 experts per layer spends its time launching, and the host must know how many rows each
expert got (a sync per layer). vLLM's fused_moe does the whole layer as a few launches whose shapes do not depend
on the routing; this file builds the same thing:

1. `moe_align(topk_ids, num_experts, BLOCK_M)`: the T x k (token, expert) pairs sorted by expert, each expert's
   run padded to a multiple of BLOCK_M, so that every BLOCK_M rows belong to one expert. Out come sorted_pairs
   (pair index per row, `num_pairs` for a padding row) and block_expert (the expert of each BLOCK_M rows, -1
   past the last). All tensor ops of fixed sizes: the bound P + min(P, E) x (BLOCK_M - 1) on the padded length
   (each expert that got a pair wastes at most BLOCK_M - 1 rows) sizes the buffers, never the counts themselves.
2. `_grouped_gemm_kernel`, twice. A program takes BLOCK_M sorted rows and BLOCK_N output columns; it reads its
   block's expert, gathers the rows of A (the tokens themselves for the first GEMM: row = pair // k; the pairs'
   own rows for the second), multiplies them by that expert's weight tile and writes each row back to its pair's
   place. Programs whose block is padding return at once. The first GEMM is x @ w13[e]^T (gate | up), then
   silu_and_mul (kernels/fused.py), then the second h @ w2[e]^T with each pair's routing weight multiplied in
   before the store, in fp32.
3. The k rows of each token summed (in fp32) and rounded to the activations' dtype.

Weights are stacked per layer: w13 [E, 2I, H] and w2 [E, H, I], the experts' Linear weights in their own [out,
in] layout (MixtralSparseMoeBlock makes its experts' parameters views into the stacks, so nothing is held twice).
Quantized experts enter as 8-bit codes with per-row scales (int8_rtn: W8A16; fp8: W8A8, the activation rows
rounded to e4m3 before each GEMM): the codes are what the kernel reads, and each row's scale multiplies its sum
once, after the K loop. 4-bit experts (rtn, gptq, awq) enter in GPTQ's packed layout, dequantized per group in
registers inside the K loop (_grouped_gemm_int4_kernel, W4A16). Expert capacity (dropping rows) is the loop's business; this path routes every row. Under Triton's interpreter on
a CPU it runs too (fp32), which is how the tests check it against the loop.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from minillm.kernels.fused import silu_and_mul
from minillm.kernels.int4_gemm import int4_unpack
from minillm.kernels.int4_mma import code_constants, tile_operand, tile_operand_k
from minillm.platform import triton_interpreted

__all__ = ["moe_align", "fused_moe"]

_CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)  # 8-bit weights, given with per-row scales


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                             torch.Tensor]:
    """(sorted_pairs int32 [R], block_expert int32 [R / block_m], counts int64 [E]) for topk_ids [T, k] (step 1 of
    the module docstring). Row r of the sorted order holds pair sorted_pairs[r] (= token * k + j), or the
    sentinel T * k on a padding row; rows [b * block_m, (b + 1) * block_m) all belong to expert block_expert[b]
    (-1: unused). Within an expert the pairs keep their token order (a stable sort). No host sync."""
    flat = topk_ids.reshape(-1)
    num_pairs, device = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(num_pairs, device=device) - start[expert_of]  # place within its expert's run
    num_blocks = triton.cdiv(num_pairs + min(num_pairs, num_experts) * (block_m - 1), block_m)
    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[padded_start[expert_of] + rank] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True)  # first run ending after the start
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert, counts


@triton.jit
def _store_rows(acc, C, PAIR_WEIGHT, pairs, valid, offs_n, n_ok, stride_cm, MUL_WEIGHT: tl.constexpr):
    """Each sorted row's sums (times its pair's routing weight) written back to its pair's place in C."""
    if MUL_WEIGHT:
        acc *= tl.load(PAIR_WEIGHT + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = C + pairs[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _grouped_gemm_kernel(A, W, C, PAIR_WEIGHT, SORTED, BLOCK_EXPERT, A_SCALE, W_SCALE, num_pairs, N, K, stride_am,
                         stride_we, stride_wn, stride_se, stride_cm, ROWS_PER_A: tl.constexpr,
                         MUL_WEIGHT: tl.constexpr, HAS_A_SCALE: tl.constexpr, HAS_W_SCALE: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[pair, n] = sum_k A[pair // ROWS_PER_A, k] * W[expert, n, k] (x PAIR_WEIGHT[pair]) for the BLOCK_M sorted
    rows of program_id(0) and the BLOCK_N columns of program_id(1) (step 2 of the module docstring). With 8-bit
    codes W the sum is scaled afterwards by W_SCALE[expert, n] (and by A_SCALE[row] for e4m3 activations): a row's
    scale is one number for the whole K sum, so it leaves the loop. UPCAST converts both tiles before the dot
    (0: none; 1: fp32, 2: bf16, 3: fp16): int8 codes to the activations' dtype, or e4m3 where no fp8 dot runs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    if expert < 0:  # a block past the last expert's padded run: nothing to do
        return
    pairs = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs  # padding rows carry the sentinel num_pairs
    a_rows = (pairs // ROWS_PER_A).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_base = W + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(A + a_rows[:, None] * stride_am + offs_k[None, :], mask=valid[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_base + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST == 1:
            a, w = a.to(tl.float32), w.to(tl.float32)
        elif UPCAST == 2:
            a, w = a.to(tl.bfloat16), w.to(tl.bfloat16)
        elif UPCAST == 3:
            a, w = a.to(tl.float16), w.to(tl.float16)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_W_SCALE:
        acc *= tl.load(W_SCALE + expert * stride_se + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_A_SCALE:
        acc *= tl.load(A_SCALE + a_rows, mask=valid, other=0.0)[:, None]
    _store_rows(acc, C, PAIR_WEIGHT, pairs, valid, offs_n, n_ok, stride_cm, MUL_WEIGHT)


@triton.jit
def _tile_dot_int4(A, PERM, a_rows, valid, w, zero, expert, k0, K, stride_am, stride_pe, NIBBLE_MASK,
                   HAS_PERM: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, MAGIC2: tl.constexpr,
                   OFFSET: tl.constexpr, CODE_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """One K tile of _grouped_gemm_int4_kernel as a single dot: sum_k a[m, k] (code[k, n] - zero[n]) for the
    tile's words w [BLOCK_K / 8, BLOCK_N] (one group), before the group's scale."""
    cols = k0 + tile_operand_k(BLOCK_K)
    cols_ok = cols < K
    if HAS_PERM:  # sorted weight row -> the activation column it multiplies
        cols = tl.load(PERM + expert * stride_pe + cols, mask=cols_ok, other=0)
    a = tl.load(A + a_rows[:, None] * stride_am + cols[None, :], mask=valid[:, None] & cols_ok[None, :], other=0.0)
    codes = tile_operand(w, NIBBLE_MASK, MAGIC2, CODE_T)  # OFFSET + code, in tile_operand_k's row order
    ad = a.to(tl.float32) if UPCAST == 1 else a.to(CODE_T)
    part = tl.dot(ad, codes.to(ad.dtype), input_precision=PRECISION)
    # the rows' sums of a on the tensor cores too: a dot with ones lands them in part's own layout, where a
    # reduction across the lanes would cost shuffles (ptxas, sm_90, 16-row blocks: 4.1 instructions per weight
    # against 4.4)
    sums = tl.dot(ad, tl.full([BLOCK_K, w.shape[1]], 1.0, ad.dtype), input_precision=PRECISION)
    return part - sums * (OFFSET + zero)


@triton.jit
def _grouped_gemm_int4_kernel(A, QW, S, QZ, PERM, C, PAIR_WEIGHT, SORTED, BLOCK_EXPERT, num_pairs, N, K, stride_am,
                              stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg, stride_pe, stride_cm,
                              EXP23, ROWS_PER_A: tl.constexpr, MUL_WEIGHT: tl.constexpr, HAS_PERM: tl.constexpr,
                              GROUP_SIZE: tl.constexpr,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILE_DOT: tl.constexpr = False,
                              NIBBLE_MASK=0x000F000F, MAGIC2: tl.constexpr = 0x43004300, OFFSET: tl.constexpr = 128.0,
                              CODE_T: tl.constexpr = tl.bfloat16):
    """_grouped_gemm_kernel with 4-bit weights in GPTQ's layout (kernels/int4_gemm.py's docstring): QW [E, K / 8,
    N] words packed along K, S [E, K / G, N] scales, QZ [E, K / G, N / 8] zero points packed along N. A K tile
    brings [BLOCK_K / 8, BLOCK_N] words; nibble i of word row j is weight row 8j + i, so the tile is 8 dots of
    K = BLOCK_K / 8, each with the activation columns 8j + i, the codes turned into numbers in registers on the way
    (int4_unpack: one AND and one FMA a weight; W4A16, never a dequantized copy in memory). With act-order
    (HAS_PERM) the weight rows are stored sorted by group and PERM [E, K] names each one's activation column, which
    the loads gather. When a tile lies inside
    one group (G a multiple of BLOCK_K) the dots take code - zero, small integers exact in bf16 / fp16, and the
    group's scale multiplies the tile's partial sums once; otherwise each weight is scaled in registers. EXP23 =
    0x4B000000 comes as a run-time value (int4_gemm.py says why). TILE_DOT (one-group tiles only): one dot per K
    tile instead of eight, the codes unpacked two per LOP3 into OFFSET + code halves (MAGIC2, OFFSET, CODE_T:
    int4_mma.code_constants) and joined into the operand's own register layout (int4_mma_tile_kernel's trick, K
    rows 8j + 2i + h, the activation columns gathered to match); OFFSET + zero comes off with the rows' sums."""
    ROWS: tl.constexpr = BLOCK_K // 8
    ONE_GROUP: tl.constexpr = GROUP_SIZE % BLOCK_K == 0
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    a_rows = (pairs // ROWS_PER_A).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_j = tl.arange(0, ROWS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rows = k0 // 8 + offs_j
        ok = (rows < K // 8)[:, None] & n_ok[None, :]
        w = tl.load(QW + expert * stride_qe + rows[:, None].to(tl.int64) * stride_qk + offs_n[None, :], mask=ok,
                    other=0)
        if ONE_GROUP:  # [1, BLOCK_N]: the tile's one group
            g = k0 // GROUP_SIZE
            scale = tl.load(S + expert * stride_se + g * stride_sg + offs_n, mask=n_ok, other=0.0)
            scale = scale.to(tl.float32)[None, :]
            zw = tl.load(QZ + expert * stride_ze + g * stride_zg + offs_n // 8, mask=n_ok, other=0)
            zero = ((zw >> ((offs_n % 8) * 4)) & 0xF).to(tl.float32)[None, :]
        else:  # [ROWS, BLOCK_N]: each word row's group
            g = (rows * 8 // GROUP_SIZE)[:, None]
            scale = tl.load(S + expert * stride_se + g * stride_sg + offs_n[None, :], mask=ok, other=0.0)
            scale = scale.to(tl.float32)
            zw = tl.load(QZ + expert * stride_ze + g * stride_zg + offs_n[None, :] // 8, mask=ok, other=0)
            zero = ((zw >> ((offs_n[None, :] % 8) * 4)) & 0xF).to(tl.float32)
            zero_scaled = zero * scale  # (q - z) s = q s - z s: one FMA a weight
        if TILE_DOT and ONE_GROUP:
            acc += _tile_dot_int4(A, PERM, a_rows, valid, w, zero, expert, k0, K, stride_am, stride_pe, NIBBLE_MASK,
                                  HAS_PERM, UPCAST, PRECISION, MAGIC2, OFFSET, CODE_T, BLOCK_K) * scale
        else:  # eight dots of K = BLOCK_K / 8, one per nibble
            w_lo = w | EXP23
            w_hi = (w >> 16) | EXP23
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for i in tl.static_range(8):
                if ONE_GROUP:
                    q = int4_unpack(w_lo, w_hi, zero, i)  # code - zero, exact
                else:
                    q = int4_unpack(w_lo, w_hi, 0.0, i) * scale - zero_scaled
                cols = k0 + 8 * offs_j + i
                cols_ok = cols < K
                if HAS_PERM:  # sorted weight row -> the activation column it multiplies
                    cols = tl.load(PERM + expert * stride_pe + cols, mask=cols_ok, other=0)
                a = tl.load(A + a_rows[:, None] * stride_am + cols[None, :], mask=valid[:, None] & cols_ok[None, :],
                            other=0.0)
                if UPCAST == 1:
                    a, q = a.to(tl.float32), q.to(tl.float32)
                elif UPCAST == 2:
                    a, q = a.to(tl.bfloat16), q.to(tl.bfloat16)
                else:
                    a, q = a.to(tl.float16), q.to(tl.float16)
                part = tl.dot(a, q, part, input_precision=PRECISION)
            acc += part * scale if ONE_GROUP else part
    _store_rows(acc, C, PAIR_WEIGHT, pairs, valid, offs_n, n_ok, stride_cm, MUL_WEIGHT)


_UPCAST_CODE = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


def _fp8_dot_runs(device: torch.device) -> bool:
    """Whether tl.dot takes e4m3 operands here: Ada / Hopper and later, and Triton's interpreter."""
    return triton_interpreted() or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_pairs: torch.Tensor,
                  block_expert: torch.Tensor, rows_per_a: int, pair_weight: torch.Tensor | None, block_m: int,
                  w_scale: torch.Tensor | None = None, a_scale: torch.Tensor | None = None,
                  compute_dtype: torch.dtype | None = None) -> None:
    """One launch of _grouped_gemm_kernel; compute_dtype: the dot's operand dtype (the activations' for dense
    weights and int8 codes; e4m3 stays e4m3 where fp8 dots run)."""
    num_pairs, n, k = out.shape[0], w.shape[1], w.shape[2]
    block_n, block_k = (32, 32) if triton_interpreted() else (64, 64)
    compute_dtype = compute_dtype or a.dtype
    upcast = 0 if a.dtype == w.dtype == compute_dtype else _UPCAST_CODE[compute_dtype]
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, pair_weight if pair_weight is not None else out, sorted_pairs, block_expert,
        a_scale if a_scale is not None else out, w_scale if w_scale is not None else out, num_pairs, n, k,
        a.stride(0), w.stride(0), w.stride(1), w_scale.stride(0) if w_scale is not None else 0, out.stride(0),
        ROWS_PER_A=rows_per_a, MUL_WEIGHT=pair_weight is not None, HAS_A_SCALE=a_scale is not None,
        HAS_W_SCALE=w_scale is not None, UPCAST=upcast,
        PRECISION="ieee" if compute_dtype == torch.float32 or triton_interpreted() else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)


# Whether one-group 4-bit tiles of at most 32 rows take the one-dot path (_tile_dot_int4). Off until timed against
# the eight dots on a GPU (benchmarks/bench_fused_moe.py --int4-tile-dot); the CPU tests run both.
INT4_TILE_DOT = False


def _grouped_gemm_int4(a: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       perm: torch.Tensor | None, group_size: int, out: torch.Tensor, sorted_pairs: torch.Tensor,
                       block_expert: torch.Tensor, rows_per_a: int, pair_weight: torch.Tensor | None,
                       block_m: int) -> None:
    """One launch of _grouped_gemm_int4_kernel (K = qweight's rows x 8; group_size -1: one group per column;
    perm [E, K]: act-order's input permutation per expert, or None)."""
    num_pairs, k, n = out.shape[0], qweight.shape[1] * 8, qweight.shape[2]
    # (a GPU's dot wants K / 8 >= 16 rows; the interpreter's 64 lets g64 tiles take the one-group path there too)
    block_n, block_k, warps = (32, 64, 4) if triton_interpreted() else (64, 128, 4)
    group = k if group_size == -1 else group_size
    # the one-dot path where it keeps the codes in registers (ptxas, sm_90): 16 columns a warp, at most 32 rows
    tile_dot = INT4_TILE_DOT and group % block_k == 0 and block_m <= 32
    if tile_dot and not triton_interpreted():
        block_n, warps = 128, 8
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm_int4_kernel[grid](
        a, qweight, scales, qzeros, perm if perm is not None else qzeros, out,
        pair_weight if pair_weight is not None else out, sorted_pairs, block_expert, num_pairs, n, k, a.stride(0),
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), qzeros.stride(0), qzeros.stride(1),
        perm.stride(0) if perm is not None else 0, out.stride(0), 0x4B000000, ROWS_PER_A=rows_per_a,
        MUL_WEIGHT=pair_weight is not None, HAS_PERM=perm is not None, GROUP_SIZE=group,
        UPCAST=_UPCAST_CODE[a.dtype], PRECISION="ieee" if a.dtype == torch.float32 or triton_interpreted() else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, TILE_DOT=tile_dot, **code_constants(a.dtype),
        num_warps=warps)


def _check_operands(w13, w2, w13_scale, w2_scale, w13_zeros, w2_zeros, hidden: int, int4: bool) -> int:
    """The experts' operands against the module docstring's shapes; returns 2I (w13's output width)."""
    experts = w13.shape[0]
    if int4:  # GPTQ's layout: [E, in / 8, out] words, [E, in / G, out] scales, [E, in / G, out / 8] zeros
        double_inter = w13.shape[2]
        for name, codes, scale, zeros, k, n in (("w13", w13, w13_scale, w13_zeros, hidden, double_inter),
                                                ("w2", w2, w2_scale, w2_zeros, double_inter // 2, hidden)):
            if codes.dtype != torch.int32 or codes.shape != (experts, k // 8, n) or scale is None or zeros is None \
                    or scale.shape[::2] != (experts, n) or zeros.shape != (experts, scale.shape[1], n // 8):
                raise ValueError(f"fused_moe: 4-bit {name} needs qweight [{experts}, {k // 8}, {n}] int32, scales "
                                 f"[{experts}, groups, {n}] and qzeros [{experts}, groups, {n // 8}], got "
                                 f"{tuple(codes.shape)}, {getattr(scale, 'shape', None)}, "
                                 f"{getattr(zeros, 'shape', None)}")
        return double_inter
    double_inter = w13.shape[1]
    if w13.shape[2] != hidden or w2.shape != (experts, hidden, double_inter // 2):
        raise ValueError(f"fused_moe: need w13 [E, 2I, {hidden}] and w2 [E, {hidden}, I], got {tuple(w13.shape)} "
                         f"and {tuple(w2.shape)}")
    for name, codes, scale, rows in (("w13", w13, w13_scale, double_inter), ("w2", w2, w2_scale, hidden)):
        if (codes.dtype in _CODE_DTYPES) != (scale is not None) or (scale is not None and
                                                                    scale.shape != (experts, rows)):
            raise ValueError(f"fused_moe: {name} of dtype {codes.dtype} needs "
                             + (f"{name}_scale [{experts}, {rows}], got "
                                f"{None if scale is None else tuple(scale.shape)}" if codes.dtype in _CODE_DTYPES
                                else f"no {name}_scale (only int8 / float8_e4m3fn codes are scaled)"))
    return double_inter


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, block_m: int = 16, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None,
              quantize_rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
              w13_zeros: torch.Tensor | None = None, w2_zeros: torch.Tensor | None = None,
              group_size: int | None = None, w13_perm: torch.Tensor | None = None,
              w2_perm: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE MLP of x [T, H]: (out [T, H] in x's dtype, rows routed to each expert [E] int64, on x's device).

    w13 [E, 2I, H] (each expert's gate | up projection, as its Linear holds it), w2 [E, H, I]; topk_weights
    [T, k] (fp32) and topk_ids [T, k] from the router. out[t] = sum_j topk_weights[t, j] *
    w2[e] (silu(gate) * up)(x[t]) with e = topk_ids[t, j], every expert's rows in one grouped GEMM per projection.

    Quantized experts (an MoE model under int8_rtn or fp8): w13 / w2 hold 8-bit codes (int8 or float8_e4m3fn)
    with per-row scales w13_scale [E, 2I] and w2_scale [E, H], W = codes * scale[:, None] per expert. int8 codes are
    converted to x's dtype inside the kernel (W8A16: one byte per weight read). `quantize_rows` (x [R, K] -> e4m3
    codes [R, K], fp32 scales [R, 1]) rounds each activation row to e4m3 before each GEMM, W8A8 as fp8's dense
    layers do (minillm.quant.fp8); the product then runs on fp8 tensor cores where they exist. 4-bit experts (rtn,
    gptq, awq): w13 / w2 are GPTQ qweights [E, in / 8, out] (int32), with scales [E, in / G, out] (w13_scale,
    w2_scale), zero points w13_zeros / w2_zeros [E, in / G, out / 8] and `group_size` G (-1: per column); for
    act-order checkpoints w13_perm [E, H] / w2_perm [E, I]: each expert's stored row i multiplies input column
    perm[e, i] (minillm.quant.int4.sort_act_order)."""
    num_tokens, hidden = x.shape
    int4 = w13.dtype == torch.int32
    if int4 and (group_size is None or group_size == 0 or (group_size != -1 and hidden % group_size)):
        raise ValueError(f"fused_moe: 4-bit experts need group_size -1 or a divisor of {hidden}, got {group_size}")
    double_inter = _check_operands(w13, w2, w13_scale, w2_scale, w13_zeros, w2_zeros, hidden, int4)
    for name, perm, k in (("w13_perm", w13_perm, hidden), ("w2_perm", w2_perm, double_inter // 2)):
        if perm is not None and (not int4 or perm.shape != (w13.shape[0], k)):
            raise ValueError(f"fused_moe: {name} is a 4-bit expert's input permutation [{w13.shape[0]}, {k}], got "
                             f"{tuple(perm.shape)} beside {w13.dtype} weights")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"fused_moe: topk_ids and topk_weights must both be [{num_tokens}, k], got "
                         f"{tuple(topk_ids.shape)} and {tuple(topk_weights.shape)}")
    if quantize_rows is not None and not (w13.dtype == w2.dtype == torch.float8_e4m3fn):
        raise ValueError(f"fused_moe: quantize_rows (e4m3 activations) needs float8_e4m3fn codes, got {w13.dtype} "
                         f"and {w2.dtype}")
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    sorted_pairs, block_expert, counts = moe_align(topk_ids, w13.shape[0], block_m)
    x = x.contiguous()

    def grouped_gemm(a, w, out, rows_per_a, pair_weight, w_scale, w_zeros, perm):
        if int4:
            _grouped_gemm_int4(a, w, w_scale, w_zeros, perm, group_size, out, sorted_pairs, block_expert, rows_per_a,
                               pair_weight, block_m)
            return
        a_scale, compute = None, x.dtype
        if quantize_rows is not None:  # W8A8: e4m3 rows, their scales applied after the sum
            a, a_scale = quantize_rows(a)
            a_scale = a_scale.reshape(-1).float().contiguous()
            compute = torch.float8_e4m3fn if _fp8_dot_runs(x.device) else x.dtype
        _grouped_gemm(a, w, out, sorted_pairs, block_expert, rows_per_a, pair_weight, block_m, w_scale, a_scale,
                      compute)

    gate_up = torch.empty(num_pairs, double_inter, dtype=x.dtype, device=x.device)
    grouped_gemm(x, w13, gate_up, top_k, None, w13_scale, w13_zeros, w13_perm)
    inner = silu_and_mul(gate_up)
    mixed = torch.empty(num_pairs, hidden, dtype=torch.float32, device=x.device)
    grouped_gemm(inner, w2, mixed, 1, topk_weights.reshape(-1).float().contiguous(), w2_scale, w2_zeros, w2_perm)
    return mixed.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype), counts
