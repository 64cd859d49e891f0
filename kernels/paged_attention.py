"""Paged decode attention with split-KV (flash-decoding), in Triton (chapter 5).

A decode step has one query token per sequence, and its keys and values live in the paged KV cache
(minillm/forward_context.py):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    token p of sequence b lives in block block_tables[b, p // block_size], row p % block_size.

The tiles. With one query per sequence there is no query tile to speak of, and the work is bound by
reading K and V. With grouped-query attention the H / KVH query heads that share a kv head want exactly the
same K and V, so one program takes the whole query *group* as a small matrix ([G, head_dim], padded to 16
rows for the tensor cores) and reads each K/V tile once for all of them: G times less memory traffic than a
program per query head. Each iteration gathers BLOCK_N tokens (several cache blocks) through the block
table, so a sequence's blocks may sit anywhere in the pool, in any order.

Why split-KV. A batch of 8 sequences with 8 kv heads makes only 64 programs, and an H100 has 132 SMs that
each want several programs in flight: most of the chip would idle while a few programs walk 4k tokens one
after another. Flash-decoding cuts each sequence's keys into `num_splits` contiguous ranges, gives each to
its own program (phase 1 grid: batch x kv heads x splits), and each writes a partial output normalised by
its own softmax sum plus the log-sum-exp (lse) of its scores. Phase 2 merges the partials exactly (decode_merge.py:
the formula, the merge kernel, and the fused merge that runs phase 2 inside phase 1).
Short contexts or big batches already fill the chip, so the heuristic uses one split there and phase 2 is
skipped (phase 1 then writes the final output directly). decode_split_rule.choose_decode_config states the
rule (splits and tile from programs per SM, keys per split and the merge's cost) and the H200 measurements behind it.

Several queries per sequence (speculative decoding's verify step: the last token plus k drafts). With a fixed
q_len per sequence, the q_len x G queries of one kv head are still one small matrix: row r is query r // G of
the sequence, query head r % G of the group, and each row sees the keys up to its own position (causal within
the q_len new tokens: query j of a sequence of seq_len tokens sees positions < seq_len - q_len + j + 1). The K/V
tiles are still read once for all of them, so verifying k drafts costs about what one decode step costs.

Token trees (tree speculation, minillm/speculative/tree_verify.py). A tree's nodes are the new tokens of their
sequence, but node i may see only its ancestors, not every earlier node. `tree_mask` gives each query row an
int64 ancestor bitmask over its sequence's new tokens (bit j: new token j is visible; a tree has at most 64 nodes),
read once per program and tested per key with one shift: `(mask >> j) & 1`. Rows of sequences without a tree carry
-1 (every bit), which leaves the causal rule alone. Trees of a batch differ in size, so with `cu_seqlens_q` each
sequence takes its own query length (rows beyond it are masked) and Q_LEN is only the largest; up to 64 queries x
G heads may not fit one program's registers, so the rows are cut into tiles of BLOCK_G (a third grid axis shared
with the splits).

Sliding windows (`window` W): query p sees keys p - W + 1 .. p only, so the splits divide the keys from the first
query's window start to the end (a decode reads W keys, not seq_len) and one more comparison per key masks the
window's lower edge for the later queries of a verify step.

FP8 KV cache: with `k_scale`/`v_scale` (a float, or one scale per kv head) the cache holds quantised values
x_q = x / scale in float8_e4m3fn. The scales are constant along the keys, so they are applied once, not per
element: k_scale folds into the softmax scale (one multiply per score), and v_scale multiplies the output
accumulator at the end. How the bytes become dot operands (int32 words widened to fp16 in registers, `_fp8_tile`,
and fp16 dots) and why the plain cast did not pay: fp8_kv_tile.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minillm.platform import triton_interpreted
from minillm.kernels.fused import per_head_scale
from minillm.kernels.pdl import grid_dependency_sync, launch_options
from minillm.kernels.decode_split_rule import (DecodeConfig, choose_num_splits, decode_tile, fp8_decode_tile,
                                               num_sms_of)
from minillm.kernels.decode_merge import _arrival_counters, _merge_chunk, _merge_row, _merge_splits_kernel
from minillm.kernels.fp8_kv_tile import _fp8_tile
from minillm.kernels.sliding_window import check_window

_LOG2E = 1.4426950408889634
MAX_QUERY_LEN = 16  # query tokens per sequence: a decode (1) or a verify step of up to 15 drafts
MAX_TREE_QUERY_LEN = 64  # with a tree_mask: one int64 ancestor bitmask per node bounds a tree at 64 nodes


# Integers that change from step to step are not specialised (Triton compiles a variant per value that is 1 or
# a multiple of 16): batch-dependent strides and the split count would otherwise recompile mid-run.
@triton.jit(do_not_specialize=["stride_bt", "stride_lb", "stride_lh", "num_splits"])
def _paged_decode_split_kernel(Q, K_CACHE, V_CACHE, BLOCK_TABLES, SEQ_LENS, K_SCALE, V_SCALE, O_PART, LSE_PART,
                               OUT, CU_SEQLENS_Q, TREE_MASK, ARRIVALS, stride_qb, stride_qh, stride_kb, stride_ks,
                               stride_kh, stride_vb, stride_vs,
                               stride_vh, stride_bt, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                               stride_ob, stride_oh, qk_scale, num_splits, window,
                               QUERY_GROUP: tl.constexpr, Q_LEN: tl.constexpr, BLOCK_G: tl.constexpr,
                               HEAD_DIM: tl.constexpr,
                               BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                               HAS_SCALE: tl.constexpr, SINGLE_SPLIT: tl.constexpr, UPCAST: tl.constexpr,
                               VARLEN: tl.constexpr = False, HAS_TREE: tl.constexpr = False,
                               PREFETCH_TABLE: tl.constexpr = False, FP8_WORDS: tl.constexpr = False,
                               FP8_CVT: tl.constexpr = False, FP16_DOT: tl.constexpr = False,
                               FUSED_MERGE: tl.constexpr = False, CHUNK_S: tl.constexpr = 16,
                               PDL: tl.constexpr = False, SLIDING: tl.constexpr = False):
    grid_dependency_sync(PDL)
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2) % num_splits
    row_tile = tl.program_id(2) // num_splits  # which BLOCK_G rows of the Q_LEN x QUERY_GROUP query rows
    seq_len = tl.load(SEQ_LENS + batch)

    offs_g = row_tile * BLOCK_G + tl.arange(0, BLOCK_G)  # row r: query r // QUERY_GROUP, head r % QUERY_GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    query = offs_g // QUERY_GROUP
    heads = kv_head * QUERY_GROUP + offs_g % QUERY_GROUP  # the query heads that share this kv head
    if VARLEN:  # this sequence's own number of queries, packed after the previous sequence's
        q_start = tl.load(CU_SEQLENS_Q + batch).to(tl.int64)
        q_len = tl.load(CU_SEQLENS_Q + batch + 1) - tl.load(CU_SEQLENS_Q + batch)
    else:
        q_start = batch * Q_LEN
        q_len = Q_LEN
    tokens = q_start + query  # the row of q / out holding this query
    first_key = seq_len * 0  # keys before it are outside every query's window (all are inside without one)
    if SLIDING:  # the first query, at seq_len - q_len, sees back to window - 1 keys before itself
        first_key = tl.maximum(seq_len - q_len - window + 1, 0)
    # This program's share of the keys: a contiguous range, a whole number of BLOCK_N tiles long.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len - first_key, num_splits), BLOCK_N) * BLOCK_N
    start = first_key + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)
    g_ok = (offs_g < Q_LEN * QUERY_GROUP) & (query < q_len)
    d_ok = offs_d < HEAD_DIM
    # causal within the new tokens: query j is at position seq_len - q_len + j and sees keys up to it
    first_new = seq_len - q_len
    visible = first_new + query + 1
    if HAS_TREE:  # int64 ancestor bitmask of each row over the new tokens (-1: plain causal)
        tree_bits = tl.load(TREE_MASK + tokens, mask=g_ok, other=-1)
    q = tl.load(Q + tokens[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if FP16_DOT:  # fp16 dots for an fp8 cache (see the module docstring); fp16 tops out at 65504
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    scale = qk_scale
    if HAS_SCALE:  # k = k_scale * k_q, so q.k = k_scale * (q.k_q): fold it into the softmax scale
        scale = scale * tl.load(K_SCALE + kv_head)
    # the bit trick's words hold value / 2^8: the 2^8 goes with the scales (exact, a power of two)
    fp8_unit = 256.0 if FP8_WORDS and not FP8_CVT else 1.0
    scale = scale * fp8_unit

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table = BLOCK_TABLES + batch * stride_bt
    if PREFETCH_TABLE:  # the first tile's physical blocks, before the loop
        next_ids = tl.load(table + (start + offs_n) // PAGE_SIZE, mask=start + offs_n < end, other=0)
    for start_n in range(start, end, BLOCK_N):
        pos = start_n + offs_n
        valid = pos < end
        # Address translation: logical position -> (physical block, row in block) -> cache offset.
        if PREFETCH_TABLE:
            # The block ids were read one iteration ahead, so K/V addresses do not wait on a load of this
            # iteration: Triton's software pipeliner then keeps num_stages - 1 K/V tiles in flight (with the
            # block-table load in the same iteration it keeps one, and waits for it before the math).
            block_id = next_ids.to(tl.int64)
            ahead = pos + BLOCK_N
            next_ids = tl.load(table + ahead // PAGE_SIZE, mask=ahead < end, other=0)
        else:
            block_id = tl.load(table + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        row = pos % PAGE_SIZE
        if FP8_WORDS:  # caches viewed as int32: 4 e4m3 values per word, strides in words
            offs_w = tl.arange(0, BLOCK_D // 4)
            w_ok = valid[:, None] & (offs_w < HEAD_DIM // 4)[None, :]
            k_words = tl.load(K_CACHE + (block_id * stride_kb + row * stride_ks + kv_head * stride_kh)[:, None]
                              + offs_w[None, :], mask=w_ok, other=0)  # [BLOCK_N, BLOCK_D // 4]
            v_words = tl.load(V_CACHE + (block_id * stride_vb + row * stride_vs + kv_head * stride_vh)[:, None]
                              + offs_w[None, :], mask=w_ok, other=0)
            k = tl.trans(_fp8_tile(k_words.to(tl.uint32, bitcast=True), BLOCK_N, BLOCK_D, FP8_CVT))
            v = _fp8_tile(v_words.to(tl.uint32, bitcast=True), BLOCK_N, BLOCK_D, FP8_CVT)
            k = k.to(q.dtype)  # a no-op with FP16_DOT; fp32 in the interpreter
            v = v.to(q.dtype)
        else:
            k = tl.load(K_CACHE + (block_id * stride_kb + row * stride_ks + kv_head * stride_kh)[None, :]
                        + offs_d[:, None], mask=valid[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            v = tl.load(V_CACHE + (block_id * stride_vb + row * stride_vs + kv_head * stride_vh)[:, None]
                        + offs_d[None, :], mask=valid[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            k = k.to(q.dtype)  # a no-op for a cache of q's dtype (or a plain widening: FP8_WORDS=False)
            v = v.to(q.dtype)
        s = tl.dot(q, k) * scale  # [BLOCK_G, BLOCK_N], log2 units
        keep = valid[None, :] & (pos[None, :] < visible[:, None])
        if SLIDING:  # and the window's lower edge: key > position - window
            keep = keep & (pos[None, :] >= visible[:, None] - window)
        if HAS_TREE:  # a new token (pos >= first_new) is seen only by the rows whose bitmask holds its bit
            bit = tl.minimum(tl.maximum(pos - first_new, 0), 63).to(tl.int64)
            in_tree = ((tree_bits[:, None] >> bit[None, :]) & 1) != 0
            keep = keep & ((pos[None, :] < first_new) | in_tree)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row may see no key of this tile yet (an early query, a late tile): keep exp2 away from -inf - -inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None])
        m_i = m_new

    empty = l_i == 0.0  # an empty split (seq shorter than the splits, or keys past the query): weight 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if HAS_SCALE:
        out = out * (tl.load(V_SCALE + kv_head) * fp8_unit)
    if SINGLE_SPLIT:
        tl.store(OUT + tokens[:, None] * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        part = tokens * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(O_PART + part[:, None] + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + tokens * stride_lb + heads * stride_lh + split, lse, mask=g_ok)
        if FUSED_MERGE:  # the last of the row tile's splits to finish merges them all (module docstring)
            tl.debug_barrier()  # every thread's partial is stored before the counter says so (release below)
            row_tiles = tl.num_programs(2) // num_splits
            counter = ARRIVALS + (batch * tl.num_programs(1) + kv_head) * row_tiles + row_tile
            arrived = tl.atomic_add(counter, 1, sem="acq_rel")  # gpu scope: releases ours, acquires theirs
            if arrived == num_splits - 1:
                # the tile's rows that hold a query (rows go query-major, so they are a prefix), one at a time:
                # a [rows, CHUNK_S, BLOCK_D] tile at once took 40-70 more registers a thread (measured in
                # Triton's sm_90 output), and the kernel's occupancy is set by its most register-hungry part
                first = row_tile * BLOCK_G
                last = tl.minimum(first + BLOCK_G, tl.minimum(q_len, Q_LEN) * QUERY_GROUP)
                for r in range(first, last):
                    token = q_start + r // QUERY_GROUP
                    head = kv_head * QUERY_GROUP + r % QUERY_GROUP
                    _merge_row(O_PART, LSE_PART, OUT, token * stride_pb + head * stride_ph,
                               token * stride_lb + head * stride_lh, token * stride_ob + head * stride_oh, offs_d,
                               d_ok, stride_ps, num_splits, CHUNK_S)
                tl.atomic_xchg(counter, 0)  # clean for the next call, or the next replay of a CUDA graph


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float | None = None,
                           num_splits: int | None = None, k_scale=None, v_scale=None,
                           q_len: int = 1, cu_seqlens_q: torch.Tensor | None = None,
                           tree_mask: torch.Tensor | None = None, block_n: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None,
                           prefetch_table: bool | None = None, fp8_widen: str | None = None,
                           fused_merge: bool = False, window: int | None = None) -> torch.Tensor:
    """q_len query tokens per sequence against its paged cache: q [B * q_len, H, D] -> out [B * q_len, H, D]
    (q's dtype). q_len = 1 is a decode step; q_len = 1 + k verifies k draft tokens (speculative decoding).

    The q_len queries of sequence b are rows b*q_len .. b*q_len + q_len - 1, the last q_len of its seq_lens[b]
    tokens (already in the cache), causal among themselves. block_tables int32 [B, max_blocks] (-1 padded),
    seq_lens int32 [B] (each >= q_len and <= max_blocks * block_size; not checked on the device, to avoid a
    sync). num_splits=None picks one from the batch, the table width and the SM count. k_scale/v_scale:
    dequantisation scales of an FP8 cache.

    Token trees and mixed query lengths: with cu_seqlens_q (int32 [B+1]) sequence b owns rows
    cu_seqlens_q[b] .. cu_seqlens_q[b+1] - 1 and q_len is only an upper bound of every sequence's count. tree_mask
    (int64 [num_tokens]): per query row, the ancestor bitmask over its sequence's new tokens (bit j: new token j
    is visible; -1 keeps plain causal attention). Either one allows q_len up to MAX_TREE_QUERY_LEN.

    Launch configuration (None: choose_decode_config's rule for a plain decode step): block_n keys per loop
    iteration (a power of two in [16, 256]), num_warps (1, 2, 4, 8 or 16) and num_stages (software-pipeline
    depth of the K/V loads, 1..6) of the split kernel, and prefetch_table (read the block table one tile ahead,
    see the kernel). Benchmarks sweep them; the engine leaves them alone.
    fp8_widen (float8_e4m3fn caches only; None picks): how the kernel turns cached bytes into dot operands.
    "cvt" (a GPU's default) and "bits" (the interpreter's) load int32 words and widen them to fp16 in registers
    (the hardware instruction, or the exponent-bias bit trick; exact either way); "cast" is the plain
    `k.to(q.dtype)` that the word path replaced, kept for benchmarks/bench_kv_fp8.py's before/after; "cast16"
    loads the bytes as float8_e4m3fn and widens them to fp16 for fp16 dots (q rounded to fp16 as with "cvt"):
    Triton then stages the raw bytes in shared memory (40 KB for 128 keys x 2 stages against the word path's
    100 KB). On the H200 (benchmarks/RESULTS.md, nineteenth session) it was 7-9% faster than "cvt" at batch
    128-256 of serving contexts with 128 keys / 4 warps / 2 stages and -5..+1% elsewhere: an option to sweep, not
    yet the default.
    fused_merge (num_splits > 1 only): True merges the splits in the split kernel (one launch; see
    decode_merge.py; measured slower on the H200), False (the default) in a second kernel. True raises when a
    CUDA-graph capture would have to grow the arrival counters.
    window: sliding-window attention (kernels/sliding_window.py): each query sees its last `window` keys,
    itself included, and the splits share only the keys of the first query's window (None: every earlier key).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"need q [B, H, D] and caches [num_blocks, block_size, KVH, D], got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    varlen = cu_seqlens_q is not None or tree_mask is not None
    limit = MAX_TREE_QUERY_LEN if varlen else MAX_QUERY_LEN
    if isinstance(q_len, bool) or not isinstance(q_len, int) or not 1 <= q_len <= limit:
        raise ValueError(f"q_len must be an int in [1, {limit}], got {q_len!r}")
    num_tokens, num_heads, head_dim = q.shape
    batch = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if cu_seqlens_q is not None and (cu_seqlens_q.dtype != torch.int32 or cu_seqlens_q.shape != (batch + 1,)):
        raise ValueError(f"cu_seqlens_q must be int32 [B + 1] = [{batch + 1}], got {cu_seqlens_q.dtype} "
                         f"{tuple(cu_seqlens_q.shape)}")
    if tree_mask is not None and (tree_mask.dtype != torch.int64 or tree_mask.shape != (num_tokens,)):
        raise ValueError(f"tree_mask must be int64 [num_tokens] = [{num_tokens}], got {tree_mask.dtype} "
                         f"{tuple(tree_mask.shape)}")
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or head_dim > 256:
        raise ValueError(f"head_dim must match and be <= 256, got q {head_dim}, cache {cache_dim}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    rows_ok = num_tokens <= batch * q_len if cu_seqlens_q is not None else batch * q_len == num_tokens
    if not rows_ok or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"need q [B * q_len = B * {q_len}, H, D], block_tables [B, max_blocks] and seq_lens [B], "
                         f"got q {tuple(q.shape)}, block_tables {tuple(block_tables.shape)}, seq_lens "
                         f"{tuple(seq_lens.shape)}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError(f"block_tables and seq_lens must be int32, got {block_tables.dtype}, {seq_lens.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in head_dim")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("give both k_scale and v_scale, or neither")
    check_window(window)
    max_seq_len = block_tables.shape[1] * block_size  # an upper bound known without a device sync
    if window is not None:  # at most window + q_len - 1 keys are read: the split rule sizes the work by that
        max_seq_len = min(max_seq_len, window + q_len - 1)
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8_widen is not None and (not fp8 or fp8_widen not in ("cvt", "bits", "cast", "cast16")):
        raise ValueError(f"fp8_widen must be None, or one of 'cvt', 'bits', 'cast', 'cast16' for a float8_e4m3fn "
                         f"cache; got {fp8_widen!r} for a {k_cache.dtype} cache")
    interp = triton_interpreted()
    if fp8_widen in ("cvt", "bits") and (head_dim % 4 or (fp8_widen == "cvt" and interp)):
        raise ValueError(f"fp8_widen={fp8_widen!r} needs head_dim % 4 == 0 (int32 words of 4 bytes) and, for "
                         f"'cvt', a GPU; got head_dim {head_dim}" + (" in the interpreter" if interp else ""))
    if fp8 and fp8_widen is None:  # the interpreter runs no inline PTX; odd head dims have no whole words
        # on the H200 (Llama-3-8B's attention, 32 x 4k, fp8 rule's tile): cvt 148 us a layer, bits 170, cast 187
        fp8_widen = "cast" if head_dim % 4 else ("bits" if interp else "cvt")
    kv_bytes = k_cache.element_size()
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_seq_len, q.device, kv_bytes)
    if not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits must be in [1, 256], got {num_splits}")
    if block_n is not None and (block_n not in (16, 32, 64, 128, 256)):
        raise ValueError(f"block_n must be a power of two in [16, 256], got {block_n!r}")
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {num_warps!r}")
    if num_stages is not None and (isinstance(num_stages, bool) or not isinstance(num_stages, int)
                                   or not 1 <= num_stages <= 6):
        raise ValueError(f"num_stages must be an int in [1, 6], got {num_stages!r}")
    if prefetch_table is not None and not isinstance(prefetch_table, bool):
        raise ValueError(f"prefetch_table must be a bool or None, got {prefetch_table!r}")
    if not isinstance(fused_merge, bool):
        raise ValueError(f"fused_merge must be a bool, got {fused_merge!r}")
    block_tables = block_tables.contiguous()
    has_scale = k_scale is not None
    if has_scale:
        k_scale = per_head_scale(k_scale, num_kv_heads, q.device, "k_scale")
        v_scale = per_head_scale(v_scale, num_kv_heads, q.device, "v_scale")
    else:
        k_scale = v_scale = seq_lens  # unused placeholders
    out = torch.empty_like(q)
    if batch == 0:
        return out
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interp:  # the CPU: small tiles, no pipeline
        tile = DecodeConfig(num_splits, block_n=32, num_warps=4, num_stages=1)
    elif q_len == 1 and not varlen and head_dim <= 128:  # a plain decode step: the measured rule
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        rule = fp8_decode_tile if fp8_widen in ("cvt", "bits") else decode_tile
        tile = rule(batch * num_kv_heads, num_splits, max_seq_len, num_sms_of(index))
    else:  # verify steps and trees hold q_len x G query rows (registers): the smaller tile they were tuned with
        tile = DecodeConfig(num_splits, block_n=max(16, min(64, 8192 // block_d)), num_warps=4, num_stages=3)
    block_n = tile.block_n if block_n is None else block_n
    num_warps = tile.num_warps if num_warps is None else num_warps
    num_stages = tile.num_stages if num_stages is None else num_stages
    prefetch_table = tile.prefetch_table if prefetch_table is None else prefetch_table
    single = num_splits == 1
    o_part = out if single else torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32,
                                             device=q.device)
    lse_part = o_part if single else torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32,
                                                 device=q.device)
    # partial outputs [B * q_len, H, splits, D] and their lse [B * q_len, H, splits] (unused with one split)
    part_strides = (0, 0, 0, 0, 0) if single else (o_part.stride(0), o_part.stride(1), o_part.stride(2),
                                                   lse_part.stride(0), lse_part.stride(1))
    rows = group * q_len
    block_g = max(16, triton.next_power_of_2(rows))
    if varlen:  # round Q_LEN up (fewer compiled variants) and cap a program's rows (registers): a tile axis
        q_len = triton.next_power_of_2(q_len) if cu_seqlens_q is not None else q_len
        block_g = min(max(16, triton.next_power_of_2(group * q_len)), 64)
        rows = group * q_len
    row_tiles = triton.cdiv(rows, block_g)
    placeholder = seq_lens  # a pointer the kernel never reads when VARLEN / HAS_TREE are off
    words = fp8_widen in ("cvt", "bits")
    if words:  # 4 e4m3 bytes per int32 word: [num_blocks, block_size, KVH, D / 4], strides in words
        k_cache, v_cache = k_cache.view(torch.int32), v_cache.view(torch.int32)
    arrivals = None
    if not single and fused_merge:
        arrivals = _arrival_counters(q.device, batch * num_kv_heads * row_tiles)
        if arrivals is None:
            raise RuntimeError(f"fused_merge=True needs {batch * num_kv_heads * row_tiles} arrival counters, more "
                               f"than this device has, and none can be allocated during a CUDA-graph capture: run "
                               f"the call once before capturing it, or pass fused_merge=False")
    pdl = launch_options(q.device)
    _paged_decode_split_kernel[(batch, num_kv_heads, num_splits * row_tiles)](
        q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale, o_part, lse_part, out,
        placeholder if cu_seqlens_q is None else cu_seqlens_q, placeholder if tree_mask is None else tree_mask,
        placeholder if arrivals is None else arrivals,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), *part_strides,
        out.stride(0), out.stride(1), scale * _LOG2E, num_splits, window or 0,
        QUERY_GROUP=group, Q_LEN=q_len, BLOCK_G=block_g,
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=block_size, BLOCK_N=block_n, HAS_SCALE=has_scale,
        SINGLE_SPLIT=single,
        UPCAST=interp and q.dtype != torch.float32, VARLEN=cu_seqlens_q is not None, HAS_TREE=tree_mask is not None,
        PREFETCH_TABLE=prefetch_table, FP8_WORDS=words, FP8_CVT=fp8_widen == "cvt",
        FP16_DOT=(words or fp8_widen == "cast16") and not interp,
        FUSED_MERGE=arrivals is not None, CHUNK_S=16 if arrivals is None else _merge_chunk(block_d, num_warps),
        SLIDING=window is not None, num_warps=num_warps, num_stages=num_stages, **pdl)
    if not single and arrivals is None:
        # few (token, head) pairs (batch 1: 32 heads) would leave the merge on a handful of SMs: slice head_dim
        d_slices = min(max(1, block_d // 32), triton.next_power_of_2(triton.cdiv(256, num_tokens * num_heads)))
        _merge_splits_kernel[(num_tokens, num_heads, d_slices)](
            o_part, lse_part, out, *part_strides, out.stride(0), out.stride(1), num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d // d_slices, CHUNK_S=16, num_warps=4, **pdl)
    return out
