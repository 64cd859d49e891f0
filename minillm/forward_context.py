"""The forward context: per-step attention metadata, visible to every Attention layer.

The model's forward takes only `input_ids` and `positions` (both packed: the new tokens of every sequence
in the batch, one after another, no padding). Everything attention needs to know about *which* sequence a
token belongs to and *where* its keys and values live is put here by the engine's model runner before the
forward and cleared after it (nano-vllm passes its attention metadata the same way). This is the one piece
of global mutable state in minillm, and it is named as such.

KV cache layout (one per layer, used by the torch path and by the Triton kernels alike):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

A token's *slot* is `block_id * block_size + offset_in_block`; the flat view `k_cache.view(-1, kvh, d)[slot]`
holds its key. `block_tables[i, j]` is the physical block holding tokens `j*block_size .. (j+1)*block_size-1`
of sequence i (padded with -1). The contiguous cache of chapter 2 is the same layout with
`block_size = max_model_len` and one block per sequence, so one attention path serves both.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


# A batch whose sequences all have this many new tokens or fewer (the same number each) is a "decode-like"
# batch: a decode step (1) or a speculative verify step (the last token + up to 7 drafts).
MAX_DECODE_QUERY_LEN = 8


@dataclass
class AttentionMetadata:
    """Where each query token comes from and where keys/values are, for one forward step.

    For sequence i of the batch, the new (query) tokens are `q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`; they are
    the *last* `q_len_i` tokens of its `seq_lens[i]` tokens, so query j sits at position `seq_lens[i] - q_len_i + j`
    and attends causally to keys 0..that position. A plain prefill has q_len == seq_len; a decode has q_len == 1;
    a chunked prefill or a prefix-cache hit has 1 < q_len < seq_len.
    """

    cu_seqlens_q: torch.Tensor  # int32 [B+1], prefix sums of query lengths
    seq_lens: torch.Tensor  # int32 [B], total tokens (cached + new) per sequence = keys attended
    max_seqlen_q: int
    max_seqlen_k: int
    slot_mapping: torch.Tensor | None = None  # int64 [T]: cache slot of each new token (-1: don't store)
    # int32 [B, max_blocks], -1 padded (in a step a CUDA graph replays: a view of the graph's static table, whose
    # rows are max_blocks_per_seq apart)
    block_tables: torch.Tensor | None = None
    block_size: int = 0
    # seq_lens / query lengths as Python lists (the StepInput's own), so the torch path need not sync to slice
    seq_lens_list: list[int] | None = None
    query_lens_list: list[int] | None = None
    # Filled by the first layer that needs it, then reused by every other layer of the same step: the flat cache
    # slots of each sequence's keys, packed, and their prefix sums (see layers/attention.py: gather_kv_packed).
    context_kv_index: tuple[torch.Tensor, torch.Tensor] | None = None
    # Token-tree verify steps (chapter 9, minillm/layers/tree_attention.py): int64 [T], per query token an ancestor
    # bitmask over its sequence's new tokens (bit j: new token j visible; -1: plain causal). None: no tree.
    tree_mask: torch.Tensor | None = None
    # filled by the first layer of a tree step that needs it: (seq indices, rows, cu_seqlens_q, max q_len) of the
    # sequences short enough for the tree-masked paged kernel
    tree_rows: tuple | None = None
    # What the torch path works out once per step and every layer reuses (layers/attention.py: the decode gather
    # plan, whether every slot is stored); emptied each time the metadata enters `forward_context`, so a metadata
    # object replayed with new contents (a CUDA graph's, a recorder's) never serves last step's values.
    step_memo: dict = field(default_factory=dict)
    # multi-LoRA (minillm.lora.layers.LoRAMapping): which adapter slot each sequence's tokens use, read by every
    # adapted Linear; None: no token of this step uses an adapter
    lora: object | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.numel()

    @property
    def is_decode_only(self) -> bool:
        return self.max_seqlen_q == 1

    @property
    def decode_query_len(self) -> int | None:
        """q_len when every sequence has the same small number of new tokens (1: a decode step; 1 + k: a
        speculative verify step of k drafts), the batches the paged decode kernel and the CUDA graphs take;
        None for anything else (prefills, chunks, mixed batches). Needs no device sync when query_lens_list
        is set (the runner and the graphs set it)."""
        if self.max_seqlen_q == 1:
            return 1
        if not 1 < self.max_seqlen_q <= MAX_DECODE_QUERY_LEN:
            return None
        q_lens = self.query_lens_list
        if q_lens is None:
            q_lens = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).tolist()
        return self.max_seqlen_q if all(n == self.max_seqlen_q for n in q_lens) else None

    @property
    def has_cache(self) -> bool:
        return self.slot_mapping is not None

    @property
    def prefill_without_context(self) -> bool:
        """Every sequence is seeing all its tokens for the first time (no prefix in the cache)."""
        if self.query_lens_list is not None and self.seq_lens_list is not None:
            return self.query_lens_list == self.seq_lens_list
        q_lens = self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]
        return bool(torch.equal(q_lens, self.seq_lens))


_FORWARD_CONTEXT: AttentionMetadata | None = None


def get_forward_context() -> AttentionMetadata | None:
    return _FORWARD_CONTEXT


@contextmanager
def forward_context(metadata: AttentionMetadata | None) -> Iterator[AttentionMetadata | None]:
    """Set the attention metadata for the duration of one forward pass."""
    global _FORWARD_CONTEXT
    if metadata is not None:
        metadata.step_memo.clear()
    previous, _FORWARD_CONTEXT = _FORWARD_CONTEXT, metadata
    try:
        yield metadata
    finally:
        _FORWARD_CONTEXT = previous


def prefill_metadata(seq_lens: list[int], device: torch.device | str = "cpu") -> AttentionMetadata:
    """Metadata for a cache-less prefill of packed sequences (tests, perplexity, the oracle comparison)."""
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seq_lens, dtype=torch.int32), 0)
    return AttentionMetadata(
        cu_seqlens_q=cu.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_seqlen_q=max(seq_lens), max_seqlen_k=max(seq_lens),
        seq_lens_list=list(seq_lens), query_lens_list=list(seq_lens),
    )
