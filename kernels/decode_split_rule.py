"""How paged decode attention splits its work (split-KV, chapter 4): how many splits per sequence (flash-decoding) and
which tile each program walks, as a rule of the batch, the kv heads, the context and the GPU's SM count.

kernels/paged_attention.py launches what these functions choose; the rule and the H200 measurements behind it
are in choose_decode_config. On a CPU (the interpreter runs programs one after another) there is one split.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeConfig:
    """One launch of the split kernel: how many splits per sequence, and its tile."""
    num_splits: int
    block_n: int
    num_warps: int
    num_stages: int
    prefetch_table: bool = False


PROGRAMS_PER_SM = 4  # split-kernel programs one SM holds at once: ~120 registers x 128 threads each (of 64k)
MIN_SPLIT_TOKENS = 64  # one tile: a shorter split is all start-up (q, block ids, partial write)
MIN_SPLIT_TOKENS_FULL = 1024  # once every SM has a program, a split must pay for the merge (measured as a launch)
MAX_SPLITS = 32  # more partials make the merge a long dependent chain (measured: 64 loses to 32 with BLOCK_N 128)
SINGLE_TILE_TOKENS = 128  # a context this short is one 128-key tile: splitting it only adds the merge


def choose_decode_config(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int,
                         kv_bytes: int = 2) -> DecodeConfig:
    """The decode launch for a batch (one query per sequence) on a GPU with num_sms SMs: a rule, not a table.

    Decode is bound by reading K and V, and a program reads its K/V tiles one after another, so the bandwidth
    the chip delivers grows with the programs in flight until the SMs hold as many as they can (PROGRAMS_PER_SM
    each). batch x kv heads programs come for free; splits multiply them (flash-decoding) at a price: each
    program's fixed start-up (q, block ids, its partial output) and a second kernel, the merge.
      0. First: a context of at most SINGLE_TILE_TOKENS keys (bf16/fp16) is read whole by one program
         in one 128-key tile, with no split and no merge. Two splits of 64 keys save less than the merge
         kernel costs (SmolLM2's heads, 9 q / 3 kv, d 64, ctx 128: 3.3 / 4.3 / 5.0 us unsplit against 4.1 /
         5.8 / 7.1 us in two splits at batch 1 / 8 / 32; a split never paid there).
      1. Splits: the largest power of two that keeps batch x kv heads x splits within one full wave of
         PROGRAMS_PER_SM x num_sms programs, with splits of at least MIN_SPLIT_TOKENS keys (a tile), or of
         MIN_SPLIT_TOKENS_FULL keys when batch x kv heads already puts a program on every SM (then a split
         only raises occupancy, and must be long enough to pay for the merge), and at most MAX_SPLITS.
      2. Tile: 64 keys per iteration (two 16 KB K/V tiles) with a 2-stage pipeline; when the grid holds at
         most two programs per SM and each split has 128 keys or more, 128 keys per iteration, so each
         program keeps twice the bytes in flight.
    Measured on an H200 (132 SMs, benchmarks/sweep_paged_decode.py, Llama-3-8B heads: 32 q / 8 kv, d 128),
    this picks the best of the swept configurations, or one within 6% of it, at batch 1..256 x ctx 1k..32k:
    batch 1: 32 splits, BLOCK_N 128; batch 8: 8 splits; batch 32: 1 split at 1k, 2 beyond; batch >= 64: 1.
    max_seq_len is what paged_decode_attention knows without a device sync, the block table's width: in an
    eager or piecewise step the longest sequence's, in a decode CUDA graph max_model_len (the graph's split
    count is fixed at capture for the longest sequence it could hold; a short one fills only its first splits).

    kv_bytes: bytes per cached element (2 for bf16, 1 for an fp8 cache). The merge's price is paid in bytes,
    so an fp8 split needs twice the keys (MIN_SPLIT_TOKENS_FULL * 2 / kv_bytes). The fp8 tile is the one the
    word-widening path fits in (see paged_attention.py's docstring and fp8_decode_tile); not yet swept on the H200:
    benchmarks/bench_kv_fp8.py times it against the neighbouring tiles.
    """
    for name, value in (("batch", batch), ("num_kv_heads", num_kv_heads), ("max_seq_len", max_seq_len),
                        ("num_sms", num_sms)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "batch" else 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if kv_bytes not in (1, 2, 4):
        raise ValueError(f"kv_bytes must be 1 (fp8), 2 (bf16/fp16) or 4 (fp32), got {kv_bytes!r}")
    if kv_bytes == 2 and max_seq_len <= SINGLE_TILE_TOKENS:
        return DecodeConfig(1, block_n=SINGLE_TILE_TOKENS, num_warps=4, num_stages=3)
    programs = max(batch * num_kv_heads, 1)
    min_tokens = MIN_SPLIT_TOKENS_FULL * 2 // kv_bytes if programs >= num_sms else MIN_SPLIT_TOKENS
    cap = min(PROGRAMS_PER_SM * num_sms // programs, max_seq_len // min_tokens, MAX_SPLITS)
    splits = 1 << (cap.bit_length() - 1) if cap >= 1 else 1  # the largest power of two <= cap
    if kv_bytes == 1:
        return fp8_decode_tile(programs, splits, max_seq_len, num_sms)
    return decode_tile(programs, splits, max_seq_len, num_sms)


def decode_tile(programs: int, splits: int, max_seq_len: int, num_sms: int) -> DecodeConfig:
    """Rule 2 of choose_decode_config: the tile for a grid of programs x splits."""
    if programs * splits <= 2 * num_sms and max_seq_len // splits >= 128:
        return DecodeConfig(splits, block_n=128, num_warps=4, num_stages=3)
    return DecodeConfig(splits, block_n=64, num_warps=4, num_stages=2)


def fp8_decode_tile(programs: int, splits: int, max_seq_len: int, num_sms: int) -> DecodeConfig:
    """Rule 2 for an fp8 cache. The widened fp16 tiles sit in registers before they go to shared memory,
    so a tile costs more registers than bf16's (compiled for sm_90 with Triton 3.6: 64 keys x 4 warps take 136
    registers a thread, 3 programs per SM; 32 keys take 104, 4 per SM as rule 1 assumes). A full grid gets
    32 keys per iteration with a 3-stage pipeline (two 8 KB K+V tiles ahead), a sparse one (<= 2 programs per
    SM) 128 keys over 8 warps (118 registers, 2 per SM). Measured on the H200 with the cvt path (Llama-3-8B's
    attention, 32 sequences x 4096 keys, 2 splits: a full grid), 128 keys over 8 warps with a 2-stage pipeline
    beat the 32-key tile too: 132 us a layer against 148 (and bf16's own kernel, 137); with 3 stages 141. That
    one shape is all the evidence: benchmarks/bench_kv_fp8.py --sweep times the neighbours.
    The sweep of the twentieth session (H200, CUDA graphs, cold L2; benchmarks/RESULTS.md, "fp8 decode tiles on
    full grids") found the exception: one split over more than two programs per SM (64 sequences and up, the
    serving batches of P6) runs fastest with 64 keys over 4 warps in 2 stages, 7-14% under the 128 x 8 tile and
    under bf16 (256 x 2048: 433 us against 505, bf16 497); with two splits the same tile was 41% slower (32 x 4096),
    so it is offered only where the grid needs no split."""
    if programs * splits <= 2 * num_sms and max_seq_len // splits >= 128:
        return DecodeConfig(splits, block_n=128, num_warps=8, num_stages=3)
    if splits == 1 and programs > 2 * num_sms and max_seq_len >= 128:
        return DecodeConfig(1, block_n=64, num_warps=4, num_stages=2)
    if max_seq_len // splits >= 128:
        return DecodeConfig(splits, block_n=128, num_warps=8, num_stages=2)
    return DecodeConfig(splits, block_n=32, num_warps=4, num_stages=3)


@functools.lru_cache(maxsize=None)
def num_sms_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device,
                      kv_bytes: int = 2) -> int:
    """Splits per sequence for a decode batch on `device`: choose_decode_config's rule on a GPU, 1 on a CPU
    (the interpreter runs programs one after another: more of them only cost time)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return choose_decode_config(batch, num_kv_heads, max_seq_len, num_sms_of(index), kv_bytes).num_splits
