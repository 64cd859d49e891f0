"""Paged prefill attention: new tokens over a cached context, read straight from the paged KV cache (chapter 5).

A prefill with cached context (a later chunk of a chunked prefill, a prompt whose prefix the prefix cache already
holds) has q_len new tokens per sequence that must attend to all seq_len tokens, and the first seq_len - q_len of
them live only in the paged cache:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    token p of sequence b lives in block block_tables[b, p // block_size], row p % block_size.

The simple way gathers every sequence's keys and values into one packed copy and runs the varlen FlashAttention of
chapter 3 (minillm/layers/attention.py: gather_kv_packed). That copy costs a full read and write of the context's
K/V per layer per step, plus its memory. This kernel is FlashAttention-2 with the address translation of the
paged decode kernel moved into its inner loop: each BLOCK_N-key tile is loaded through the block table, wherever
its blocks sit in the pool, so nothing is copied (the idea of vLLM's paged prefill / "unified attention" kernels).
The new tokens' K/V were stored in the cache before attention runs, so the kernel reads *every* key from the cache.

The tiles: one program per (query tile, kv head). The H / KVH query heads that share a kv head need exactly the
same K and V, so a program takes BLOCK_Q new tokens x all QUERY_GROUP heads of the group as one BLOCK_M-row
matrix (row r is token r // QUERY_GROUP, head r % QUERY_GROUP; BLOCK_Q = BLOCK_M // QUERY_GROUP) and reads each K/V
tile once for the whole group: QUERY_GROUP times less K/V traffic than a program per query head, and a
sequence with a single new token (a decode sharing the step with prefills) still fills QUERY_GROUP rows of the
tile instead of one. What it costs: when QUERY_GROUP does not divide BLOCK_M a few rows idle (1 of 64 for
SmolLM2's 3), and a decode's tile still computes BLOCK_M rows of which only QUERY_GROUP are real.

Which sequence a program serves. The query tiles of all sequences are numbered one after another, with sequence
b's first tile at cu_seqlens_q[b] // BLOCK_Q + b (an upper bound on the tiles before it, so no two sequences
overlap; a few numbers stay unused and their programs return at once). Each program finds its sequence by a
binary search over cu_seqlens_q, so the grid, cdiv(num_tokens, BLOCK_Q) + num_seqs tiles, needs only numbers
the host already has: no device-to-host copy, and the launch can be captured in a CUDA graph.

Masks, as in flash_attention.py: query j of a sequence sits at position seq_len - q_len + j and sees keys up to
it (bottom-right alignment). Key tiles wholly before the tile's first query need no mask (first loop); only the
tiles the diagonal cuts through run the masked second loop; tiles past the last query are never loaded.
Heavy tiles (late in long sequences) are launched first, so short ones fill the tail of the grid.

Sliding-window attention (Mistral 7B v0.1, Qwen2's upper layers; `window` W > 0): the query at position p sees only
the W keys p - W + 1 .. p. The tile's rows lie between positions first and last, so keys before first - W + 1 are
never loaded (not even to be masked: the engine may have given their blocks back, block_window.py, and their
table entries are -1), the tiles every row sees in full are those from last - W + 1 up to the diagonal (no mask),
and the keys the window's lower edge cuts through take the masked loop, from first - W + 1 on, with both edges
tested. The work per query is then at most W keys however long the sequence grows.

FP8 KV cache: with k_scale/v_scale (fp32 [KVH]) the cache holds x / scale. The scales are constant along the keys:
k_scale folds into the softmax scale and v_scale multiplies the finished output (as paged_attention.py does).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minillm.kernels.fused import per_head_scale
from minillm.kernels.sliding_window import check_window
from minillm.platform import triton_interpreted

_LOG2E = 1.4426950408889634
MAX_QUERY_GROUP = 128  # query heads per kv head that one program's BLOCK_M rows can hold


@triton.jit
def _find_sequence(CU_SEQLENS_Q, num_seqs, tile, BLOCK_Q: tl.constexpr):
    """The sequence whose query tiles hold tile number `tile`: the last b with cu_seqlens_q[b] // BLOCK_Q + b <= tile
    (sequence 0 starts at tile 0, so there always is one). Binary search: log2(num_seqs) scalar loads."""
    lo = tile * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        starts_before = tl.load(CU_SEQLENS_Q + mid) // BLOCK_Q + mid <= tile
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid - 1)
    return lo


@triton.jit
def _attend_pages(acc, l_i, m_i, q, K_CACHE, V_CACHE, table_row, kv_head, q_pos, lo, hi, qk_scale,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, window,
                  MASKED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, SLIDING: tl.constexpr):
    """Fold keys lo..hi-1 (paged) into the online-softmax state (acc, l_i, m_i), scores in log2 units.
    MASKED: keys >= hi are not loaded and each row sees keys <= its position q_pos (with SLIDING, also only keys
    > q_pos - window); otherwise every row sees all."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + offs_n
        valid = pos < hi
        # address translation: logical position -> (physical block, row in block) -> cache offset
        if MASKED:
            block = tl.load(table_row + pos // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        else:
            block = tl.load(table_row + pos // PAGE_SIZE).to(tl.int64)
        row = pos % PAGE_SIZE
        k_rows = block * stride_kb + row * stride_ks + kv_head * stride_kh
        v_rows = block * stride_vb + row * stride_vs + kv_head * stride_vh
        k_ptrs = K_CACHE + k_rows[None, :] + offs_d[:, None]  # K^T tile [BLOCK_D, BLOCK_N]: S = Q K^T is one dot
        v_ptrs = V_CACHE + v_rows[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        if MASKED:
            k = tl.load(k_ptrs, mask=valid[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=valid[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D == HEAD_DIM:  # the common case: no predicate at all
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        k = k.to(q.dtype)  # fp8 caches are widened here; a no-op otherwise
        v = v.to(q.dtype)
        s = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            keep = valid[None, :] & (pos[None, :] <= q_pos[:, None])
            if SLIDING:
                keep = keep & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a row may have seen no key yet: keep exp2 away from (-inf) - (-inf)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["stride_bt", "num_seqs"])  # they change every step: one compile for all
def _paged_prefill_kernel(Q, K_CACHE, V_CACHE, BLOCK_TABLES, SEQ_LENS, CU_SEQLENS_Q, K_SCALE, V_SCALE, OUT,
                          stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                          stride_bt, stride_ot, stride_oh, qk_scale, num_seqs, window,
                          QUERY_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          PAGE_SIZE: tl.constexpr, HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr = False):
    BLOCK_Q = BLOCK_M // QUERY_GROUP  # new tokens per program (a constexpr: both operands are)
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the last (longest-running) tiles first
    kv_head = tl.program_id(1)
    seq = _find_sequence(CU_SEQLENS_Q, num_seqs, tile, BLOCK_Q)
    q_start = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_start
    first_query = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_query >= q_len:  # an unused tile number
        return
    seq_len = tl.load(SEQ_LENS + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    query = first_query + offs_m // QUERY_GROUP
    heads = kv_head * QUERY_GROUP + offs_m % QUERY_GROUP
    row_ok = (offs_m < BLOCK_Q * QUERY_GROUP) & (query < q_len)
    tokens = (q_start + query).to(tl.int64)
    io_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=io_ok, other=0.0)
    if UPCAST:  # the interpreter mis-multiplies bf16 operands of tl.dot
        q = q.to(tl.float32)
    if HAS_SCALE:  # k = k_scale * k_q, so q.k = k_scale * (q.k_q): fold it into the softmax scale
        qk_scale = qk_scale * tl.load(K_SCALE + kv_head)
    q_pos = context_len + query

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    last_query = tl.minimum(first_query + BLOCK_Q, q_len) - 1
    hi = context_len + last_query + 1  # keys past the tile's last query are never needed
    full_end = (context_len + first_query + 1) // BLOCK_N * BLOCK_N  # keys every row of the tile sees
    lo = full_end * 0  # keys before lo are seen by no row, keys from lo to mid by some rows only
    mid = lo
    if SLIDING:  # the first row's window starts at its position - window + 1, the last row's later
        lo = tl.maximum(context_len + first_query - window + 1, 0)  # not rounded down: earlier blocks may be gone
        mid = tl.cdiv(tl.maximum(context_len + last_query - window + 1, 0), BLOCK_N) * BLOCK_N  # seen by every row
        mid = tl.minimum(tl.maximum(mid, lo), full_end)
        acc, l_i, m_i = _attend_pages(acc, l_i, m_i, q, K_CACHE, V_CACHE, table_row, kv_head, q_pos, lo, mid,
                                      qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                      window, True, PAGE_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, SLIDING)
    acc, l_i, m_i = _attend_pages(acc, l_i, m_i, q, K_CACHE, V_CACHE, table_row, kv_head, q_pos, mid, full_end,
                                  qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                  window, False, PAGE_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, SLIDING)
    tail = tl.maximum(full_end, lo)  # (a window narrower than a tile may start past full_end)
    acc, l_i, m_i = _attend_pages(acc, l_i, m_i, q, K_CACHE, V_CACHE, table_row, kv_head, q_pos, tail, hi,
                                  qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                  window, True, PAGE_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, SLIDING)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # every real row saw its own key; padding rows are not stored
    if HAS_SCALE:
        out = out * tl.load(V_SCALE + kv_head)
    tl.store(OUT + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=io_ok)


# H100/H200 candidates (BLOCK_M rows = tokens x group heads, BLOCK_N keys, num_warps, num_stages)
_GPU_CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 4)]
_autotuned_kernel = None


def _prune_configs(configs, named_args, **kwargs):
    group = kwargs.get("QUERY_GROUP", named_args.get("QUERY_GROUP", 1))
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] >= group
            and (block_d < 256 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]  # shared memory at d256
    return kept or [triton.Config({"BLOCK_M": triton.next_power_of_2(group), "BLOCK_N": 32}, num_warps=4,
                                  num_stages=2)]


def _kernel_and_tiles(group: int, block_m: int | None, block_n: int | None):
    """(kernel, launch kwargs): explicit tiles if given; one small tile under the interpreter (each tile is one
    numpy step there); otherwise autotuned on the first call per (head_dim, group, page size, fp8) on a GPU
    (make that call before capturing a CUDA graph: autotuning times the kernel)."""
    global _autotuned_kernel
    if block_m is not None or block_n is not None or triton_interpreted():
        block_m = block_m or max(32, triton.next_power_of_2(group))
        block_n = block_n or 16
        return _paged_prefill_kernel, dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1)
    if _autotuned_kernel is None:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in _GPU_CONFIGS]
        _autotuned_kernel = triton.autotune(configs, key=["HEAD_DIM", "QUERY_GROUP", "PAGE_SIZE", "HAS_SCALE", "SLIDING"],
                                            prune_configs_by={"early_config_prune": _prune_configs}
                                            )(_paged_prefill_kernel)
    return _autotuned_kernel, {}


def _is_tile(n) -> bool:
    return n is None or (isinstance(n, int) and n >= 16 and n & (n - 1) == 0)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                            softmax_scale: float | None = None, k_scale=None, v_scale=None,
                            block_m: int | None = None, block_n: int | None = None,
                            window: int | None = None) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' paged K/V: q [T, H, D] -> out [T, H, D].

    Sequence b owns query rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] - 1 (int32 [B+1]); they are the last q_len_b of
    its seq_lens[b] tokens (int32 [B]), all of which, the new ones included, are already in k_cache/v_cache
    ([num_blocks, block_size, KVH, D]) at the blocks named by block_tables (int32 [B, max_blocks], -1 padded).
    Any mix works: chunks over a long context, prefix-cache hits, fresh prompts (q_len = seq_len), decodes
    (q_len = 1). Lengths are not checked on the device (that would need a sync): 1 <= q_len_b <= seq_len_b and
    seq_len_b <= max_blocks * block_size are the caller's promise. k_scale/v_scale: an FP8 cache's dequantisation
    scales (a float or fp32 [KVH]). block_m/block_n: fixed tile sizes (powers of two >= 16; block_m >= H / KVH)
    instead of the autotuned ones. window: sliding-window attention, each query sees its last `window` keys
    (itself included; None: every earlier key).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"need q [T, H, D] and caches [num_blocks, block_size, KVH, D], got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim or not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim must match and lie in [1, 256], got q {head_dim}, cache {cache_dim}")
    if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_QUERY_GROUP:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads}), at most "
                         f"{MAX_QUERY_GROUP} times it")
    batch = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if batch < 1 or cu_seqlens_q.shape != (batch + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"need seq_lens [B >= 1], cu_seqlens_q [B + 1] and block_tables [B, max_blocks], got "
                         f"{tuple(seq_lens.shape)}, {tuple(cu_seqlens_q.shape)}, {tuple(block_tables.shape)}")
    if {t.dtype for t in (seq_lens, cu_seqlens_q, block_tables)} != {torch.int32}:
        raise ValueError(f"seq_lens, cu_seqlens_q and block_tables must be int32, got {seq_lens.dtype}, "
                         f"{cu_seqlens_q.dtype}, {block_tables.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in head_dim")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("give both k_scale and v_scale, or neither")
    check_window(window)
    group = num_heads // num_kv_heads
    if not (_is_tile(block_m) and _is_tile(block_n)) or (block_m is not None and block_m < group):
        raise ValueError(f"block_m/block_n must be powers of two >= 16 (block_m >= {group} heads per kv head), "
                         f"got {block_m}, {block_n}")
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    has_scale = k_scale is not None
    if has_scale:
        k_scale = per_head_scale(k_scale, num_kv_heads, q.device, "k_scale")
        v_scale = per_head_scale(v_scale, num_kv_heads, q.device, "v_scale")
    else:
        k_scale = v_scale = seq_lens  # placeholders the kernel never reads
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    kernel, tiles = _kernel_and_tiles(group, block_m, block_n)
    block_tables, seq_lens, cu_seqlens_q = (t.contiguous() for t in (block_tables, seq_lens, cu_seqlens_q))

    def grid(meta):  # tile numbers: see the module docstring (sequence b starts at cu_seqlens_q[b] // BLOCK_Q + b)
        return (triton.cdiv(num_tokens, meta["BLOCK_M"] // group) + batch, num_kv_heads)

    kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, k_scale, v_scale, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1),
        scale * _LOG2E, batch, window or 0,
        QUERY_GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PAGE_SIZE=block_size,
        HAS_SCALE=has_scale, UPCAST=triton_interpreted() and q.dtype != torch.float32, SLIDING=window is not None, **tiles)
    return out
