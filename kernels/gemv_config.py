"""Launch configurations of the decode GEMV (kernels/gemv.py, chapter 4): which tile, split-K and inner product a
shape gets.

One kernel serves every decode shape, and how fast it streams the weights is set by its launch: how many output
rows a program owns (block_n) and how much of K it loads per iteration (block_k) decide the bytes each thread has
in flight and how many programs there are to fill the SMs; split_k cuts K among programs when N alone cannot fill
the chip; use_dot takes the tensor cores instead of CUDA-core FMAs; reduce_each and row_passes trade registers
against re-reads of x (gemv.py's docstring tells each path). GemvConfig names one launch and checks it;
default_config is the rule read off the H200 sweep (benchmarks/sweep_gemv.py, benchmarks/RESULTS.md);
TUNED_CONFIGS holds the measured winners of the shapes the sweep ran, and tuned_config takes them where they
exist, default_config elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from minillm.kernels.hardware import SMALL_MATRIX, num_sms

MAX_SPLIT_K = 16  # splits of K a launch may take (GemvConfig.check)


@dataclass(frozen=True)
class GemvConfig:
    """One launch of the GEMV kernel: tile sizes, split-K, inner product, warps and pipeline stages."""

    block_n: int = 16
    block_k: int = 512
    split_k: int = 1
    use_dot: bool = False
    num_warps: int = 4
    num_stages: int = 1
    reduce_each: bool = False  # CUDA cores: sum over K after every tile (for M > 1: fewer registers, wider tiles)
    row_passes: bool = False  # CUDA cores, all of K in one tile: the weight tile is read once, then one pass per row
    pdl: bool = False  # programmatic dependent launch (Hopper): weights stream while the previous kernel ends

    def check(self, m: int, x_is_cuda: bool = True) -> None:
        """ValueError naming the field that is out of range (for rows m)."""
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two >= 1, got {v}")
        if not 1 <= self.split_k <= MAX_SPLIT_K:
            raise ValueError(f"GemvConfig.split_k must lie in [1, {MAX_SPLIT_K}], got {self.split_k}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemvConfig.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise ValueError(f"GemvConfig.num_stages must lie in [1, 8], got {self.num_stages}")
        if self.pdl and (not x_is_cuda or torch.cuda.get_device_capability()[0] < 9):
            raise ValueError("GemvConfig.pdl (programmatic dependent launch) needs a CUDA GPU of compute "
                             "capability >= 9.0 (Hopper)")
        if self.use_dot and (self.block_n < 16 or self.block_k < 16):
            raise ValueError(f"tl.dot needs block_n >= 16 and block_k >= 16, got {self}")
        if self.row_passes and (self.use_dot or self.reduce_each or self.split_k != 1):
            raise ValueError(f"GemvConfig.row_passes is a CUDA-core path over one unsplit K tile: it excludes "
                             f"use_dot, reduce_each and split_k > 1, got {self}")

    def block_m(self, m: int) -> int:
        return 16 if self.use_dot else triton.next_power_of_2(m)


def default_config(m: int, n: int, k: int, num_sms: int = 132) -> GemvConfig:
    """A launch for (M, N, K) without measuring, the rule read off the H200 sweep (benchmarks/RESULTS.md):

    * M = 1: CUDA cores, 8 rows x 1024 columns per program (8 loads of 16 bytes per thread in flight), no
      split-K: on 4096..128256 outputs that is 512+ programs, enough to fill 132 SMs, and splitting K only
      added atomics (every split config measured slower than the same tile unsplit). Rows of at most 2048
      (SmolLM2's K = 576 and 1536): 4 rows per program, each read whole in one tile with a warp per 512
      columns, 1.5-1.7 us against 2.1-3.6 for the 8 x 1024 tile on SmolLM2's qkv, o and down (H200,
      2026-12-04, sweep_gemv.py): one load round per program instead of a loop with a masked tail.
    * M = 2 with rows of at most 2048: the same one-tile read of W, then one pass per row of x (row_passes):
      1.5-1.8 us on SmolLM2's qkv, o and down against 3.0-4.3 for the tensor-core tile and 3.6-5.0 for cuBLAS
      (H200, 2026-12-04). Each pass ends in a cross-thread sum, so passes cost: at 4 rows 2.7-3.6 us, at 8
      5-8 us, and the tensor cores keep M >= 3.
    * M >= 2 otherwise: the 3-D CUDA-core accumulator costs M times the registers, so tensor cores take over (64 x
      128 tiles, 4 stages of cp.async in flight), K split 4 ways when the outputs give fewer than ~2 programs/SM.
    `num_sms` is kept for the split rule (the H200 has 132)."""
    row = triton.next_power_of_2(k)  # one tile holding a whole row of W
    if m <= 2 and row <= 2048:
        return GemvConfig(block_n=4, block_k=row, split_k=1, use_dot=False, num_warps=max(1, row // 512),
                          num_stages=1, row_passes=m == 2)
    if m == 1:
        return GemvConfig(block_n=8, block_k=1024, split_k=1, use_dot=False, num_warps=4, num_stages=1)
    block_n, block_k = 64, 128
    split = 4 if triton.cdiv(n, block_n) < 2 * num_sms and k >= 4 * 2 * block_k else 1
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split, use_dot=True, num_warps=4, num_stages=4)


def code_config(m: int, n: int, k: int, num_sms: int = 132) -> GemvConfig:
    """A launch for 8-bit codes with per-row scales (gemv's weight_scale: int8_rtn, FP8 / INT8 at decode).

    With one-byte weights the CUDA-core tiles that win for bf16 at M = 1 lose: each code needs a conversion before
    its FMA, and the tensor cores convert a tile once and multiply it for every row. The rule read off
    `sweep_gemv.py --int8` (H100, 2026-12-05, benchmarks/RESULTS.md): 64 x 256 tensor-core tiles, 8 warps, 3
    stages, K split into the largest power of two that keeps about 3 programs per SM (qkv 4096 -> 6144: 4 splits,
    12.7 us; gate_up -> 28672: none, 50.2 us; down 14336 -> 4096: 4 splits, 29.4 us at M = 1, within 8% of the
    best of the sweep's 279 launches, against 17.8 / 76.7 / 36.3 us for default_config); where K is not split and
    M > 1, 32 x 256 tiles of 4 warps and 4 stages (gate_up: 55.3 / 46.3 us at M = 4 / 16, default 56.6 / 49.5). Matrices smaller
    than 2^23 weights (SmolLM2's) keep default_config at M = 1 (its one-tile rows measured 2.4-2.8 us there) and
    take CUDA-core tiles of 2 rows x 1024 at M = 2..4 (`sweep_gemv.py --int8 --shapes smol_*`, H100, 2026-12-05:
    2.4 / 2.5 / 6.4 / 3.5 us on qkv / o / gate_up / down at M = 4, against 3.5 / 3.3 / 8.1 / 6.5 for the tensor-core
    tiles below and cuBLAS bf16's 3.6 / 3.6 / 4.3 / 5.0)."""
    if n * k < SMALL_MATRIX and m == 1:
        return default_config(m, n, k, num_sms)
    if n * k < SMALL_MATRIX and m <= 4:
        return GemvConfig(block_n=2, block_k=1024, split_k=1, use_dot=False, num_warps=4, num_stages=1)
    block_n, block_k = 64, 256
    k_tiles = triton.cdiv(k, block_k)
    split = 1
    while split * 2 * triton.cdiv(n, block_n) <= 3 * num_sms and split * 2 <= max(1, k_tiles // 2):
        split *= 2
    if split == 1 and m > 1:  # many outputs, several rows: narrower tiles (gate_up at M = 4 / 16: 55.3 / 46.3 us)
        return GemvConfig(block_n=32, block_k=block_k, split_k=1, use_dot=True, num_warps=4, num_stages=4)
    return GemvConfig(block_n=block_n, block_k=block_k, split_k=split, use_dot=True, num_warps=8, num_stages=3)


# (M, N, K) -> the fastest config measured on the H200 by benchmarks/sweep_gemv.py, 2026-12-02 (Llama-3-8B's
# decode shapes: qkv, o, gate_up, down, lm_head). At M = 1 they beat cuBLAS by 1.04x / 1.13x / 0.97x / 1.04x /
# 1.01x; at M >= 2 nothing beat cuBLAS by more than noise, so those shapes keep default_config (and the engine's
# timed choice picks cuBLAS there).
_FMA = dict(split_k=1, use_dot=False, num_warps=4, num_stages=1)
TUNED_CONFIGS: dict[tuple[int, int, int], GemvConfig] = {
    (1, 6144, 4096): GemvConfig(block_n=8, block_k=512, **_FMA),
    (1, 4096, 4096): GemvConfig(block_n=8, block_k=1024, **_FMA),
    (1, 28672, 4096): GemvConfig(block_n=4, block_k=1024, **_FMA),
    (1, 4096, 14336): GemvConfig(block_n=8, block_k=1024, **_FMA),
    (1, 128256, 4096): GemvConfig(block_n=8, block_k=1024, **_FMA),
}
# SmolLM2-135M's verify steps (M = 1 + k: 6 rows for k = 5, 8 for k = 7): o 576 x 576 and down 576 x 1536 take
# the tensor-core tiles that beat default_config's in two sweeps and again in the engine's own timing (H200,
# 2026-12-04: o 2.8 against 3.0-3.1 us, down 4.0 against 4.4). qkv's sweep winner (64 x 128, 6 stages) lost to
# default_config in that timing (3.4 against 3.1 us) and gate_up's to cuBLAS, so neither has an entry.
_DOT = dict(split_k=1, use_dot=True, num_warps=4)
_SMOLLM2_VERIFY = {(576, 576): GemvConfig(block_n=32, block_k=256, num_stages=4, **_DOT),
                   (576, 1536): GemvConfig(block_n=32, block_k=256, num_stages=4, **_DOT)}
TUNED_CONFIGS.update({(m, n, k): cfg for m in (6, 8) for (n, k), cfg in _SMOLLM2_VERIFY.items()})


def tuned_config(m: int, n: int, k: int, device: torch.device) -> GemvConfig:
    """The measured config for (M, N, K) where the sweep has one, else default_config for this device's SMs."""
    cfg = TUNED_CONFIGS.get((m, n, k))
    return cfg if cfg is not None else default_config(m, n, k, num_sms(device))
