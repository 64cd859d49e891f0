"""What a scheduler hands the model runner each step, and the methods every scheduler offers.

Two schedulers implement this: the static batcher of chapter 2 (`static_scheduler.py`: a batch runs until
its longest request ends, one contiguous KV region per sequence) and the continuous batcher of chapter 6
(`scheduler.py`: paged blocks, admission every step, preemption, prefix caching, chunked prefill). The
engine loop is the same for both:

    batch = scheduler.schedule()               # which sequences, how many new tokens each
    runner.execute(batch)                      # swaps/copies, then one forward over the packed tokens
    for each seq: seq.num_computed_tokens += n; append the sampled token if its step reached the end
    scheduler.finish(seq) for finished ones    # frees its blocks at once
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from minillm.engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    """One step of work. For seqs[i], compute tokens
    `seqs[i].num_computed_tokens .. seqs[i].num_computed_tokens + num_new_tokens[i] - 1`;
    its block_table already covers them. A token is sampled for seqs[i] only when that range reaches
    `seqs[i].num_tokens` (the end of a prefill, or a decode step)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu_block, device_block)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device_block, cpu_block)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    preempted: list[Sequence] = field(default_factory=list)  # preempted this step (for metrics / timelines)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler(Protocol):
    block_size: int

    def add(self, seq: Sequence) -> None: ...

    def schedule(self) -> ScheduledBatch: ...

    def finish(self, seq: Sequence) -> None:
        """Mark seq FINISHED (its finish_reason already set) and free its blocks."""

    def abort(self, request_id: str) -> Sequence | None:
        """Remove the request wherever it is, free its blocks, return it (None if unknown)."""

    def has_unfinished(self) -> bool: ...

    def num_free_blocks(self) -> int: ...
