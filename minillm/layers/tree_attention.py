"""Tree attention: the mask of a token-tree verify step, for the torch path and the Triton path (chapter 9).

A tree verify step (minillm/speculative/tree_verify.py) feeds a sequence's draft tree as its new tokens, flattened
parents first: node 0 is the last emitted token, node i sits at position prefix + depth(i), and node i may see the
whole cached prefix, its ancestors and itself, but not its siblings or cousins, which are alternatives for the
same positions. The forward context carries that as one int64 per query row (AttentionMetadata.tree_mask): bit j
set when the row may see new token j of its sequence. Rows of sequences without a tree carry -1 (all bits), which
leaves the causal rule as it is, so one step can mix trees, chains, decodes and prefills.

* torch path: `tree_visibility` expands one sequence's bitmasks into the bool [q_len, kv_len] mask that
  attention_reference / sdpa_attention take instead of the causal one;
* Triton path: `paged_tree_attention` runs the paged decode kernel in its varlen + tree-mask mode (every
  sequence has at most 64 new tokens); with a longer sequence in the batch (a prefill or a chunk) the caller
  first computes every row with the causal varlen path and this module overwrites the rows of the short
  sequences (trees included) with the tree-masked kernel's: tree rows are few, so computing them twice costs
  little and keeps FlashAttention's kernel (a chapter 3 exercise) free of tree logic.
"""
from __future__ import annotations

import torch

from minillm.forward_context import AttentionMetadata

MAX_TREE_NODES = 64  # one int64 ancestor bitmask per node


def tree_visibility(row_masks: torch.Tensor, kv_len: int) -> torch.Tensor:
    """bool [q_len, kv_len]: which keys each of a sequence's q_len new tokens may see. row_masks: int64 [q_len]
    ancestor bitmasks over the new tokens (-1: every bit). Keys before the new tokens are always visible; new
    token j is visible to row i when bit j of row_masks[i] is set and j <= i (the causal rule still holds)."""
    q_len = row_masks.shape[0]
    if not 1 <= q_len <= min(kv_len, MAX_TREE_NODES):
        raise ValueError(f"a tree-masked sequence needs 1 <= q_len <= min(kv_len, {MAX_TREE_NODES}), got q_len="
                         f"{q_len}, kv_len={kv_len}")
    bits = torch.arange(q_len, device=row_masks.device)
    in_tree = ((row_masks.long().unsqueeze(1) >> bits.unsqueeze(0)) & 1).bool()  # [q_len, q_len]
    causal = bits.unsqueeze(0) <= bits.unsqueeze(1)
    prefix = torch.ones(q_len, kv_len - q_len, dtype=torch.bool, device=row_masks.device)
    return torch.cat([prefix, in_tree & causal], dim=1)


def _short_rows(meta: AttentionMetadata, q_lens: list[int], device: torch.device):
    """(sequence indices, their packed row indices, their cu_seqlens_q) of the sequences with at most
    MAX_TREE_NODES new tokens; built once per step and kept on the metadata (every layer needs the same)."""
    if meta.tree_rows is None:
        seqs, rows, cu = [], [], [0]
        start = 0
        for i, n in enumerate(q_lens):
            if n <= MAX_TREE_NODES:
                seqs.append(i)
                rows.extend(range(start, start + n))
                cu.append(cu[-1] + n)
            start += n
        as_tensor = lambda x, dtype: torch.tensor(x, dtype=dtype).to(device, non_blocking=True)  # noqa: E731
        meta.tree_rows = (as_tensor(seqs, torch.int64), as_tensor(rows, torch.int64), as_tensor(cu, torch.int32),
                          max((q_lens[i] for i in seqs), default=0))
    return meta.tree_rows


def paged_tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                         q_lens: list[int], scale: float, out: torch.Tensor | None = None,
                         k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Tree-masked attention of the packed queries q [T, H, D] over the paged cache (their K/V already stored;
    k_scale/v_scale: an fp8 cache's dequantisation scales, as paged_decode_attention takes them).

    out None: every sequence has <= MAX_TREE_NODES new tokens; one varlen launch computes all rows.
    out given (the causal result of the whole batch): the rows of the short sequences are recomputed with their
    tree masks and written into it; the long ones (prefills, chunks: never trees) keep their causal rows."""
    from minillm.kernels.paged_attention import paged_decode_attention

    if out is None:
        cu = meta.cu_seqlens_q.to(device=q.device, dtype=torch.int32)
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, softmax_scale=scale,
                                      q_len=max(q_lens), cu_seqlens_q=cu, tree_mask=meta.tree_mask,
                                      k_scale=k_scale, v_scale=v_scale)
    seqs, rows, cu, longest = _short_rows(meta, q_lens, q.device)
    if longest == 0:
        return out
    short = paged_decode_attention(q.index_select(0, rows), k_cache, v_cache,
                                   meta.block_tables.index_select(0, seqs), meta.seq_lens.index_select(0, seqs),
                                   softmax_scale=scale, q_len=longest, cu_seqlens_q=cu,
                                   tree_mask=meta.tree_mask.index_select(0, rows), k_scale=k_scale,
                                   v_scale=v_scale)
    return out.index_copy_(0, rows, short)
