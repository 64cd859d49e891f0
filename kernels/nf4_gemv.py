"""NF4 weight-only GEMV for decode: y = x W^T with W in QLoRA's NormalFloat4, read at 4 bits (chapter 7).

minillm.quant.nf4 stores W [N, K] as 4-bit level indices, two per byte (`qweight` uint8 [N, K/2], weight 2j in
the low nibble), and one absmax per block of 64 weights along a row, itself double-quantized (int8 codes in
rows of 256 with one fp32 scale each, plus one global offset). Its reference dequantizes the whole weight to
the activations' dtype on every call and then multiplies: at decode that writes and re-reads a 16-bit copy of
every weight, three times the bytes of bf16 itself. This kernel is bitsandbytes' idea for batch-1 NF4
inference, written from the idea: read the packed bytes once and decode them in registers.

* Program (pid_n, pid_k) owns BLOCK_N output rows and one K range (split-K). It walks its range a step of
  BLOCKS absmax blocks at a time, reading the step's bytes as a [BLOCK_N, BLOCKS, 32] tile: byte j of a block
  holds weights 2j (low nibble) and 2j + 1 (high nibble), which meet x's even and odd positions without any
  reshuffle.
* A nibble becomes its level by a gather from the 16-entry table (64 bytes, always in L1). The block's absmax
  (an int8 code times its row of 256's scale plus the offset: the double quantization undone in two loads and an
  FMA) scales the block's sum once, not each weight: with the blocks a tile axis of their own, no reshape
  spreads it over the bytes.
* Rows of x: the decoded tile is kept in registers and each row makes one pass over it (a product and a sum per
  row), so M rows cost M passes but one decode. (The first version's tensor-core path, x padded to 16 rows,
  measured 0.07-0.12x of cuBLAS bf16; the row passes are 1.9-3.8x faster than it at M = 16.)
* Split-K where the rows alone leave SMs idle: the splits' sums meet in kernels/gemv.py's workspace and the
  last split writes y (its epilogue `store_rows`, shared). Weight rows past N are clamped onto row N - 1 and
  only a row's last, partial step is masked (K is a multiple of 64).

`nf4_gemv(x, qweight, absmax_q, absmax_scale, absmax_offset, levels, bias)` is the entry point;
minillm.quant.nf4.nf4_linear calls it on CUDA at decode and keeps its reference everywhere else.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from minillm.kernels.gemv import split_workspace, store_rows
from minillm.kernels.hardware import num_sms

__all__ = ["MAX_M", "Nf4Config", "nf4_config", "nf4_gemv"]

MAX_M = 16
BLOCK = 64  # weights per absmax (minillm.quant.nf4.BLOCK_SIZE)
# absmax values per double-quantization scale: minillm.quant.nf4.DOUBLE_QUANT_BLOCK, the kernel's `flat // 256`


@dataclass(frozen=True)
class Nf4Config:
    """One launch of the NF4 GEMV: BLOCK_N weight rows per program, `blocks` absmax blocks (64 weights each) per
    K step, `num_warps`, and `split_k` programs along K per tile of rows (their sums meet in gemv's workspace)."""
    block_n: int = 32
    blocks: int = 4
    num_warps: int = 4
    split_k: int = 1


def nf4_config(m: int, n: int, k: int, num_sms: int = 132) -> Nf4Config:
    """The launch rule, read off a sweep of 12 tiles x 3 splits (H100, 2026-12-05; benchmarks/RESULTS.md,
    results/nf4_sweep_s31_h100.json): steps of 4 absmax blocks and 4 warps everywhere (Nf4Config's defaults);
    16-row tiles where rows are short (K <= 2048: a small model's matrices), 32 otherwise; K split while the grid
    stays under ~6 programs per SM and every split keeps a step (not for one row over fewer than 4 steps). Within
    1.03x of each shape's best launch (geometric mean over Llama-3-8B's and SmolLM2's matrices at M = 1 / 4 / 16)."""
    cfg = Nf4Config(block_n=16 if k <= 2048 else 32)
    steps = triton.cdiv(k // BLOCK, cfg.blocks)
    tiles = triton.cdiv(n, cfg.block_n)
    split = 1
    while split * 2 * tiles <= 6 * num_sms and split * 2 <= steps and (m > 1 or steps >= 4):
        split *= 2  # (a single row over a short K measured faster unsplit)
    return dataclasses.replace(cfg, split_k=split)


@triton.jit
def _nf4_gemv_kernel(X, QW, AQ, AS, AO, LEVELS, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_qn, stride_ym, SPLIT_K,
                     HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    rows_w = tl.minimum(offs_n, N - 1)  # clamped: unmasked loads; rows past N are never stored
    offs_b = tl.arange(0, BLOCKS)  # the step's absmax blocks
    offs_j = tl.arange(0, 32)  # the 32 bytes (64 weights) of a block
    n_blocks = K // 64
    steps = tl.cdiv(n_blocks, BLOCKS)
    steps_per_split = tl.cdiv(steps, SPLIT_K)
    step_lo = pid_k * steps_per_split
    step_hi = tl.minimum(step_lo + steps_per_split, steps)
    q_rows = QW + rows_w.to(tl.int64) * stride_qn  # [BLOCK_N]
    absmax_rows = rows_w.to(tl.int64) * n_blocks  # flat index of each row's first absmax
    offset = tl.load(AO).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(step_lo, step_hi):
        blk = step * BLOCKS + offs_b
        blk_ok = blk < n_blocks  # a row's last step may hold fewer blocks
        byte = blk[:, None] * 32 + offs_j[None, :]  # [BLOCKS, 32]: byte j of a block holds weights 2j, 2j + 1
        packed = tl.load(q_rows[:, None, None] + byte[None, :, :], mask=blk_ok[None, :, None], other=0).to(tl.int32)
        w_lo = tl.load(LEVELS + (packed & 0xF))  # [BLOCK_N, BLOCKS, 32] levels of the even weights (low nibbles)
        w_hi = tl.load(LEVELS + (packed >> 4))  # and of the odd ones
        # each block's absmax, its double quantization undone: an int8 code times its row of 256's scale + offset
        flat = absmax_rows[:, None] + blk[None, :]
        absmax = tl.load(AQ + flat, mask=blk_ok[None, :], other=0).to(tl.float32) * tl.load(
            AS + flat // 256, mask=blk_ok[None, :], other=0.0) + offset  # [BLOCK_N, BLOCKS]
        for i in range(0, M):  # each row of x meets the decoded tile; the absmax scales a block's sum once
            x_even = X + i * stride_xm + 2 * byte
            xe = tl.load(x_even, mask=blk_ok[:, None], other=0.0).to(tl.float32)
            xo = tl.load(x_even + 1, mask=blk_ok[:, None], other=0.0).to(tl.float32)
            block_sums = tl.sum(w_lo * xe[None, :, :] + w_hi * xo[None, :, :], axis=2)  # [BLOCK_N, BLOCKS]
            row = tl.sum(block_sums * absmax, axis=1)
            acc = tl.where(offs_m[:, None] == i, acc + row[None, :], acc)
    store_rows(acc, Y, BIAS, WS, CNT, offs_m, offs_n, rows_w, M, N, stride_ym, pid_n, pid_k, SPLIT_K, HAS_BIAS,
               USE_SPLIT, BLOCK_M, BLOCK_N)


def nf4_gemv(x: torch.Tensor, qweight: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
             absmax_offset: torch.Tensor, levels: torch.Tensor, bias: torch.Tensor | None = None,
             config: Nf4Config | None = None) -> torch.Tensor:
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
    cfg = config if config is not None else nf4_config(m, n, k, num_sms(x.device))
    grid_n = triton.cdiv(n, cfg.block_n)
    split = max(1, min(cfg.split_k, triton.cdiv(k // BLOCK, cfg.blocks)))
    ws, cnt = split_workspace(x2.device, split * m * n, grid_n) if split > 1 else (y, y)
    _nf4_gemv_kernel[(grid_n, split)](
        x2, qweight, absmax_q, absmax_scale, absmax_offset, levels.float(), bias if bias is not None else y, y, ws,
        cnt, m, n, k, x2.stride(0), qweight.stride(0), y.stride(0), split, HAS_BIAS=bias is not None,
        USE_SPLIT=split > 1, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCKS=cfg.blocks,
        num_warps=cfg.num_warps)
    return y.reshape(*x.shape[:-1], n)
