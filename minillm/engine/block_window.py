"""Sliding-window KV blocks: giving back the blocks that slid out of every layer's window (chapters 2 and 5).

With a sliding window of W keys (Mistral 7B v0.1: W = 4096 in every layer) the query at position p sees only keys
p - W + 1 .. p. Positions only grow, so once a sequence has computed c tokens, its next query (at c) and every later
one sees nothing before c - W + 1: the blocks wholly before that key will never be read again. Keeping them would
make a 32k-token conversation hold 32k tokens of K/V where 4k are ever read; giving them back bounds each sequence
by its window (vLLM's sliding-window KV manager does the same).

How it is kept in the block table. A released block's entry becomes NULL_BLOCK (-1, the value tables are padded
with): the table keeps its logical length, so position p is still in entry p // block_size and every rule of the
block manager about logical blocks holds; the released entries are always a leading run (`num_released`). Nothing
reads them: the paged decode kernel starts at the first query's window, the paged prefill kernel's first key tile
starts there too, the torch path gathers from there (layers/attention.py). What goes on around the table:
    - before a block goes, the sequence's full computed blocks are offered to the prefix cache: a released block
      that is cached stays evictable, so a later request with the same prefix still hits it; and a hit needs only
      the blocks its window sees (BlockManager._window_hits): the oldest, released first, are evicted first (to
      the CPU tier when there is one, and out of it later), and a prefix whose chain from block 0 is broken still
      hits as far as its window's blocks are cached on the device or in the tier;
    - a prompt is allocated chunk by chunk (`allocate(seq, num_new_tokens)`): a 32k-token prompt under chunked
      prefill never holds more than its window plus one chunk, and a cached prefix's blocks before the window are
      not taken at all;
    - a swapped-out sequence keeps its released entries in its CPU table, so swap-in rebuilds the same layout;
    - a sequence preempted by recompute starts again from its first token, like any other.
A sequence then holds at most cdiv(W - 1 + n, block_size) + 1 blocks in a step that computes n tokens
(`peak_blocks`), which is what the scheduler and the request checks compare with the pool.

Only when EVERY layer slides (ModelConfig.uniform_sliding_window): a full-attention layer beside them (Qwen2's lower
layers) reads every key, so nothing can go. Not in disaggregated serving either (its prefill-to-decode transfer
sends whole tables) nor in a draft model's own cache (speculative/draft.py). Mixed in to BlockManager
(block_manager.py); its state is the manager's.
"""
from __future__ import annotations

from bisect import bisect_left

from minillm.engine.sequence import Sequence

NULL_BLOCK = -1  # a block-table entry given back (slid out of the window); nothing reads it


def num_released(block_table: list[int]) -> int:
    """How many leading entries of block_table were given back (NULL_BLOCK): they are always a leading run."""
    return bisect_left(block_table, True, key=lambda block: block != NULL_BLOCK)


def held_blocks(block_table: list[int]) -> list[int]:
    """The physical blocks a table still holds (its entries after the released ones)."""
    return block_table[num_released(block_table):]


class SlidingWindowBlocks:
    """Mixed into BlockManager: the sliding-window release of blocks (no-ops when `sliding_window` is None)."""

    sliding_window: int | None = None

    def first_kept_block(self, num_computed_tokens: int) -> int:
        """The first logical block a sequence with num_computed_tokens computed tokens may still read: its next query,
        at num_computed_tokens, sees back to num_computed_tokens - W + 1 (0 without a window)."""
        if self.sliding_window is None:
            return 0
        return max(0, num_computed_tokens - self.sliding_window + 1) // self.block_size

    def covered_tokens(self, num_tokens: int, num_computed_tokens: int, num_new_tokens: int | None) -> int:
        """The tokens a new sequence's table covers at allocation: all of them without a window (a prompt is
        allocated whole), only the computed ones plus this step's chunk with one."""
        if self.sliding_window is None or num_new_tokens is None:
            return num_tokens
        return min(num_tokens, num_computed_tokens + num_new_tokens)

    def peak_blocks(self, num_tokens: int, max_step_tokens: int) -> int:
        """The most blocks a sequence of num_tokens tokens ever holds at once when a step computes at most
        max_step_tokens of its tokens: all of them without a window; with one, the window plus a step's tokens
        (cdiv(W - 1 + n, block_size) + 1: the window's first block may be partly before it)."""
        needed = self.blocks_needed(num_tokens)
        if self.sliding_window is None:
            return needed
        return min(needed, self.blocks_needed(self.sliding_window - 1 + max_step_tokens) + 1)

    def num_blocks_held_at(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks seq (on the device or swapped out) would hold once its table covers num_tokens tokens (its
        released ones not counted)."""
        table = self._cpu_tables.get(seq.seq_id, seq.block_table)
        return self.blocks_needed(num_tokens) - num_released(table)

    def release_out_of_window(self, seq: Sequence) -> int:
        """Give back seq's blocks that no query of it will read again; returns how many went. Its full computed
        blocks are offered to the prefix cache first, so a cached one stays a hit for others (evictable)."""
        if self.sliding_window is None or seq.seq_id not in self._on_device:
            return 0
        table = seq.block_table
        start, end = num_released(table), min(self.first_kept_block(seq.num_computed_tokens), len(table))
        if end <= start:
            return 0
        self.mark_computed(seq)
        gone = table[start:end]
        table[start:end] = [NULL_BLOCK] * (end - start)
        self._release(gone)
        return end - start
