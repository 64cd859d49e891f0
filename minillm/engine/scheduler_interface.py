"""What a scheduler hands the model runner each step, and the methods every scheduler offers.

Two schedulers implement this: the static batcher of chapter 2 (`static_scheduler.py`: a batch runs until
its longest request ends, one contiguous KV region per sequence) and the continuous batcher of chapter 6
(`scheduler.py`: paged blocks, admission every step, preemption, prefix caching, chunked prefill). The
engine loop is the same for both:

    batch = scheduler.schedule()               # which sequences, how many new tokens each
    tokens = executor.execute_model(step)      # swaps/copies, one forward; per seq a list of sampled tokens
    scheduler.postprocess(batch, tokens)       # num_computed_tokens, new tokens, rollback of rejected drafts
    scheduler.finish(seq) for finished ones    # frees its blocks at once

A step may append several tokens to a sequence (speculative decoding, chapter 9): a sequence with k draft
tokens (`seq.spec_token_ids`) is scheduled for its uncomputed token plus the k drafts, the runner samples at
those k + 1 rows, an acceptance rule keeps the first a drafts and one more token, and `postprocess` receives
that list L = drafts[:a] + [one sampled token]. `update_sequences` below is that bookkeeping, written once for
the engine, the static batcher and the simulator.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from minillm.engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    """One step of work. For seqs[i], compute tokens
    `seqs[i].num_computed_tokens .. seqs[i].num_computed_tokens + num_new_tokens[i] - 1` of
    `token_ids + spec_token_ids`; its block_table already covers them. Tokens are sampled for seqs[i] only when
    that range reaches the end, `num_tokens + len(spec_token_ids)` (the end of a prefill, a decode step, or a
    verify step: then at its last 1 + len(spec_token_ids) rows)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu_block, device_block)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device_block, cpu_block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    # the prefix cache's CPU tier (minillm/engine/offload_tier.py): evicted cached blocks copied to host memory,
    # and blocks a prompt found there copied back
    blocks_to_offload: list[tuple[int, int]] = field(default_factory=list)  # (device_block, host_block)
    blocks_to_onload: list[tuple[int, int]] = field(default_factory=list)  # (host_block, device_block)
    preempted: list[Sequence] = field(default_factory=list)  # preempted this step (for metrics / timelines)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def moves_blocks(self) -> bool:
        """Whether the step swaps or copies blocks: an empty batch may still (a swap-out, with nothing to run)."""
        return bool(self.blocks_to_swap_out or self.blocks_to_swap_in or self.blocks_to_copy
                    or self.blocks_to_offload or self.blocks_to_onload)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


def update_sequences(batch: ScheduledBatch, token_ids_per_seq: list[list[int]],
                     rollback: Callable[[Sequence], None] | None = None, now: float | None = None) -> None:
    """Apply one step's results to its sequences: the step bookkeeping of every scheduler (`postprocess`).

    For seqs[i] with k = len(spec_token_ids) drafts and new tokens L = token_ids_per_seq[i] (the accepted
    drafts, then one sampled token; [] when the step did not reach the end, e.g. a prefill chunk):
        num_computed_tokens += num_new_tokens[i] - k + max(0, len(L) - 1)
    (the uncomputed tokens and the accepted drafts now have their K/V in the cache; L's last token has not),
    L is appended (one timestamp), spec_token_ids is cleared, and `rollback(seq)` gives back the blocks the
    rejected drafts were scheduled into (called only for sequences that carried drafts).
    Everything is validated before anything changes: ValueError names the sequence and the bad value.
    """
    if len(token_ids_per_seq) != len(batch.seqs):
        raise ValueError(f"postprocess needs one token list per scheduled sequence: {len(batch.seqs)} sequences, "
                         f"got {len(token_ids_per_seq)} lists")
    for seq, n, new in zip(batch.seqs, batch.num_new_tokens, token_ids_per_seq):
        _check_step_result(seq, n, new)
    now = time.perf_counter() if now is None else now
    for seq, n, new in zip(batch.seqs, batch.num_new_tokens, token_ids_per_seq):
        k = len(seq.spec_token_ids)
        seq.num_computed_tokens += n - k + max(0, len(new) - 1)
        for token in new:
            seq.append_token(token, now)
        seq.spec_token_ids = []
        if k and rollback is not None:
            rollback(seq)


def _check_step_result(seq: Sequence, num_new_tokens: int, new: list[int]) -> None:
    if not isinstance(new, list) or any(isinstance(t, bool) or not isinstance(t, int) for t in new):
        raise ValueError(f"sequence {seq.seq_id}: new tokens must be a list of ints, got {new!r}")
    spec = seq.spec_token_ids
    reaches_end = seq.num_computed_tokens + num_new_tokens == seq.num_tokens + len(spec)
    most = seq.num_uncomputed_tokens + len(spec)
    if not 1 <= num_new_tokens <= most:
        raise ValueError(f"sequence {seq.seq_id}: num_new_tokens must be in [1, {most}] (uncomputed tokens + "
                         f"drafts), got {num_new_tokens}")
    if reaches_end != bool(new):
        raise ValueError(f"sequence {seq.seq_id}: a step that reaches the end of the sequence produces 1.."
                         f"{len(spec) + 1} tokens and any other step none; reaches_end={reaches_end}, got {new!r}")
    if len(new) > len(spec) + 1:
        raise ValueError(f"sequence {seq.seq_id}: {len(spec)} drafts allow at most {len(spec) + 1} new tokens, "
                         f"got {len(new)}")
    if new and new[:-1] != spec[:len(new) - 1]:
        raise ValueError(f"sequence {seq.seq_id}: accepted tokens {new[:-1]} are not a prefix of the drafts {spec}")


class Scheduler(Protocol):
    block_size: int

    def add(self, seq: Sequence) -> None: ...

    def schedule(self) -> ScheduledBatch: ...

    def postprocess(self, batch: ScheduledBatch, token_ids_per_seq: list[list[int]]) -> None:
        """After the forward: advance num_computed_tokens, append each sequence's new tokens (the accepted
        drafts and one sampled token), give back the slots of rejected drafts (update_sequences)."""

    def finish(self, seq: Sequence) -> None:
        """Mark seq FINISHED (its finish_reason already set) and free its blocks."""

    def abort(self, request_id: str) -> Sequence | None:
        """Remove the request wherever it is, free its blocks, return it (None if unknown)."""

    def has_unfinished(self) -> bool: ...

    def num_free_blocks(self) -> int: ...
