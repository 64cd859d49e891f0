"""Decode and verify attention on the torch path: every sequence of the step in one SDPA call (chapters 2 and 5).

A decode step gives each sequence one new query (a speculative verify step the same small number q_len); its
keys live in the paged cache, `block_tables[i, p // block_size] * block_size + p % block_size` for key p of
sequence i. The Triton path reads them in place (minillm.kernels.paged_attention); the torch path, what a CPU
runs, gathers them into a padded [B, L, KVH, D] batch and runs one `scaled_dot_product_attention` per layer.

Everything about *where* the keys are is the same for the 30 layers of a step: only the cache tensor differs.
So the index work is done once per step, by `decode_gather_plan`, and the plan is handed to every layer (the
Attention module keeps it in the forward context's per-step memo). On a CPU at batch 1, where a token's forward is
a few hundred small tensor ops around the weight reads, that removes eight ops per layer, and two more:

* contiguous blocks: when the one sequence's blocks are consecutive (a fresh pool hands them out in order), its
  keys are rows start .. start + L of the flat cache, so k and v are *views* of the cache: no gather, no copy
  (the contiguous KV cache of chapter 2 is this case with one block);
* one sequence, one query: grouped-query attention needs no `enable_gqa` when each kv head's H / KVH query heads
  are laid out as that head's queries: q [1, KVH, H/KVH, D] against k [1, KVH, L, D] is plain multi-head attention,
  with nothing to mask (the decode row sees every key). (At batch 256 of a toy model the same layout with a padding
  mask measured 3-8% slower than `enable_gqa` on the CPU, so batches keep the latter.)

A sliding window (kernels/sliding_window.py) changes which keys are gathered, not how: each sequence's last
window + q_len - 1 keys (its first query's window onwards), with the window's lower edge in the mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minillm.layers.kv_quant import dequantize_kv
from minillm.kernels.sliding_window import first_visible_key


@dataclass(frozen=True)
class DecodeGatherPlan:
    """Where the keys of one decode/verify step are; the same for every layer of the step.

    Either `start` (one sequence whose blocks are consecutive: keys at flat cache rows start .. start +
    max_seq_len) or `slots` (int64 [B * num_keys], the flat row of each padded key; padding reads row 0).
    `mask` (bool [B, 1, q_len, num_keys], True = visible) is None where nothing is masked: one sequence
    decoding one token sees all its keys. With a sliding `window`, each sequence's gathered keys start at its
    first query's window (`first_key` rows into the consecutive blocks for `start`), num_keys at most
    window + q_len - 1."""

    num_seqs: int
    q_len: int
    max_seq_len: int
    start: int | None
    slots: torch.Tensor | None
    mask: torch.Tensor | None
    window: int | None = None
    first_key: int = 0


def decode_gather_plan(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, q_len: int,
                       block_size: int, window: int | None = None) -> DecodeGatherPlan:
    """The gather plan of a step of B = block_tables.shape[0] sequences with seq_lens[i] keys each (the largest
    max_seq_len), q_len new tokens each, in a cache of `block_size`-token blocks; window: a sliding window's
    width (None: full attention)."""
    num_seqs = block_tables.shape[0]
    if num_seqs < 1 or q_len < 1 or max_seq_len < q_len or block_size < 1:
        raise ValueError(f"a decode gather plan needs >= 1 sequence, 1 <= q_len <= max_seq_len and block_size >= 1; "
                         f"got {num_seqs} sequences, q_len {q_len}, max_seq_len {max_seq_len}, "
                         f"block_size {block_size}")
    device = block_tables.device
    num_blocks = -(-max_seq_len // block_size)
    if num_blocks > block_tables.shape[1]:
        raise ValueError(f"max_seq_len {max_seq_len} needs {num_blocks} blocks of {block_size}, but block_tables "
                         f"has {block_tables.shape[1]} columns")
    if num_seqs == 1 and q_len == 1 and device.type == "cpu":  # a host table: reading it costs no device sync
        blocks = block_tables[0, :num_blocks].tolist()
        if blocks[0] >= 0 and blocks == list(range(blocks[0], blocks[0] + num_blocks)):
            first_key = first_visible_key(max_seq_len, 1, window)
            return DecodeGatherPlan(1, 1, max_seq_len, blocks[0] * block_size, None, None, window, first_key)
    if window is not None and window + q_len - 1 < max_seq_len:
        return _windowed_plan(block_tables, seq_lens, max_seq_len, q_len, block_size, window)
    pos = torch.arange(max_seq_len, device=device)
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size  # [B, L]; < 0 past the table
    slots = slots.clamp_(min=0).flatten()
    mask = None
    if num_seqs > 1 or q_len > 1:
        last_visible = (seq_lens.to(device=device, dtype=torch.int64)[:, None] - q_len
                        + torch.arange(q_len, device=device))[:, :, None]  # [B, q_len, 1]: each query's position
        mask = pos <= last_visible
        if window is not None:  # every key lies in SOME query's window, not in each one's: the lower edge too
            mask &= pos > last_visible - window
        mask = mask.unsqueeze(1)  # [B, 1, q_len, L]
    return DecodeGatherPlan(num_seqs, q_len, max_seq_len, None, slots, mask, window)


def _windowed_plan(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, q_len: int,
                   block_size: int, window: int) -> DecodeGatherPlan:
    """A gather plan that reads each sequence's last window + q_len - 1 keys (fewer where it is shorter)."""
    device = block_tables.device
    num_keys = window + q_len - 1
    seq_lens = seq_lens.to(device=device, dtype=torch.int64)
    first = (seq_lens - q_len - window + 1).clamp_(min=0)[:, None]  # [B, 1]: the first query's window start
    pos = first + torch.arange(num_keys, device=device)  # [B, num_keys]; past the end: masked below
    blocks = block_tables.long().gather(1, (pos // block_size).clamp_(max=block_tables.shape[1] - 1))
    slots = (blocks * block_size + pos % block_size).clamp_(min=0).flatten()
    query_pos = seq_lens[:, None] - q_len + torch.arange(q_len, device=device)  # [B, q_len]
    keys, query_pos = pos[:, None, :], query_pos[:, :, None]
    mask = ((keys <= query_pos) & (keys > query_pos - window)).unsqueeze(1)  # [B, 1, q_len, num_keys]
    return DecodeGatherPlan(block_tables.shape[0], q_len, max_seq_len, None, slots, mask, window)


def padded_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, q_len: int,
                            scale: float, k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None, plan: DecodeGatherPlan | None = None,
                            window: int | None = None) -> torch.Tensor:
    """A decode step (q_len 1) or a verify step (every sequence has the same q_len new tokens), all B sequences
    in ONE attention call: the torch path's counterpart of the paged decode kernel (chapter 5).

    q: [B * q_len, H, D] packed; k_cache, v_cache: [num_blocks, block_size, KVH, D]; block_tables int32 [B, nb];
    seq_lens int32 [B] (keys per sequence, max_seq_len the largest) -> [B * q_len, H, D]. `plan`: this step's
    `decode_gather_plan` (made here when not given).

    Keys are gathered into a padded [B, max_seq_len, KVH, D] batch by one index (or viewed in place, see the
    module docstring) and padding is masked out, so a step costs a handful of tensor ops whatever the batch size,
    instead of a Python loop of B gathers and B attention calls per layer (on a CPU each small op costs
    microseconds of dispatch, which at batch 8 outweighed the arithmetic). Padded keys read slot 0 or stale rows
    of a block: finite values whose probability the mask sets to 0. Query j of sequence i sits at position
    seq_lens[i] - q_len + j and sees keys 0..that position (with a sliding `window`, the last `window` of them).
    """
    num_seqs = block_tables.shape[0]
    if q.shape[0] != num_seqs * q_len:
        raise ValueError(f"q has {q.shape[0]} rows, expected {num_seqs} sequences x q_len {q_len}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if plan is None:
        plan = decode_gather_plan(block_tables, seq_lens, max_seq_len, q_len, block_size, window)
    elif (plan.num_seqs, plan.q_len, plan.max_seq_len, plan.window) != (num_seqs, q_len, max_seq_len, window):
        raise ValueError(f"the gather plan is for {plan.num_seqs} sequences, q_len {plan.q_len}, max_seq_len "
                         f"{plan.max_seq_len}, window {plan.window}; this call has {num_seqs}, {q_len}, "
                         f"{max_seq_len}, {window}")
    if plan.start is not None:  # consecutive blocks: the keys are a slice of the flat cache, read in place
        rows = slice(plan.start + plan.first_key, plan.start + max_seq_len)
        k = k_cache.view(-1, num_kv_heads, head_dim)[rows].unsqueeze(0)
        v = v_cache.view(-1, num_kv_heads, head_dim)[rows].unsqueeze(0)
    else:  # index_select of whole rows (one memcpy each) is several times faster on a CPU than advanced indexing
        row = num_kv_heads * head_dim
        k = k_cache.view(-1, row).index_select(0, plan.slots).view(num_seqs, -1, num_kv_heads, head_dim)
        v = v_cache.view(-1, row).index_select(0, plan.slots).view(num_seqs, -1, num_kv_heads, head_dim)
    if k_scale is not None:
        k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
    if plan.mask is None:  # one sequence, one query: each kv head's query heads as its queries, [1, KVH, H / KVH, D]
        out = F.scaled_dot_product_attention(q.view(num_seqs, num_kv_heads, -1, head_dim), k.transpose(1, 2),
                                             v.transpose(1, 2), attn_mask=plan.mask, scale=scale)
        return out.reshape(num_seqs, num_heads, head_dim)
    out = F.scaled_dot_product_attention(
        q.unflatten(0, (num_seqs, q_len)).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=plan.mask, scale=scale, enable_gqa=num_kv_heads != num_heads)  # [B, H, q_len, D]
    return out.transpose(1, 2).reshape(num_seqs * q_len, num_heads, head_dim)
