"""Static batching: chapter 2's baseline scheduler.

The oldest way to batch requests, and the one `model.generate(batch)` gives you: take up to `max_num_seqs`
waiting requests, prefill them together, then decode them together until *every one* of them has finished;
only then admit the next batch. A finished request stops taking part in the forward (its row drops out of the
packed batch), but its batch slot stays idle until the whole batch ends. That idle time, waiting for the
longest request, is what continuous batching (chapter 6, `scheduler.py`) removes.

Memory: each batch slot owns a fixed range of KV blocks large enough for `max_model_len` tokens. With the
contiguous layout (block_size = max_model_len) that range is a single block, so `block_table = [slot]`.
"""
from __future__ import annotations

from collections import deque

from minillm.engine.scheduler_interface import ScheduledBatch, update_sequences
from minillm.engine.sequence import Sequence, SequenceStatus


class StaticScheduler:
    """Implements the Scheduler protocol of scheduler_interface.py."""

    def __init__(self, max_num_seqs: int, max_model_len: int, block_size: int,
                 max_num_batched_tokens: int | None = None) -> None:
        if max_num_seqs < 1 or max_model_len < 1 or block_size < 1:
            raise ValueError(f"max_num_seqs, max_model_len and block_size must be >= 1, "
                             f"got {max_num_seqs}, {max_model_len}, {block_size}")
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.blocks_per_slot = -(-max_model_len // block_size)
        self.num_blocks = max_num_seqs * self.blocks_per_slot  # size of the KV pool this scheduler addresses
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.batch: list[Sequence] = []  # the current static batch, finished members included until it ends
        self.slot_of: dict[int, int] = {}  # seq_id -> batch slot
        self.free_slots: list[int] = list(range(max_num_seqs))

    # -- protocol -----------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.num_tokens > self.max_model_len:
            raise ValueError(f"sequence {seq.request_id!r} has {seq.num_tokens} tokens, more than "
                             f"max_model_len={self.max_model_len}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        if not any(not s.is_finished for s in self.batch):
            self._start_next_batch()
        batch = ScheduledBatch()
        for seq in self.batch:
            if seq.is_finished:
                continue
            if seq.spec_token_ids:
                raise ValueError(f"sequence {seq.request_id!r} carries {len(seq.spec_token_ids)} draft tokens: static "
                                 "batching has no speculative decoding (use scheduling='continuous')")
            # the first step of a batch prefills every uncomputed token; later steps decode one token
            batch.seqs.append(seq)
            batch.num_new_tokens.append(seq.num_uncomputed_tokens)
        return batch

    def postprocess(self, batch: ScheduledBatch, token_ids_per_seq: list[list[int]]) -> None:
        """The shared step bookkeeping; a slot's blocks are fixed, so there is nothing to give back."""
        update_sequences(batch, token_ids_per_seq)

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self._release(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SequenceStatus.FINISHED
                return seq
        for seq in self.batch:
            if seq.request_id == request_id and not seq.is_finished:
                self.finish(seq)
                return seq
        return None

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(not s.is_finished for s in self.batch)

    def num_free_blocks(self) -> int:
        return len(self.free_slots) * self.blocks_per_slot

    # -- internals ----------------------------------------------------------------------------------------
    def _start_next_batch(self) -> None:
        """Admit up to max_num_seqs waiting requests (and at most max_num_batched_tokens prompt tokens,
        but always at least one request, so a long prompt cannot block the queue)."""
        self.batch = []
        budget = self.max_num_batched_tokens
        while self.waiting and self.free_slots:
            seq = self.waiting[0]
            if budget is not None and self.batch and seq.num_uncomputed_tokens > budget:
                break
            self.waiting.popleft()
            slot = self.free_slots.pop(0)
            self.slot_of[seq.seq_id] = slot
            first = slot * self.blocks_per_slot
            seq.block_table = list(range(first, first + self.blocks_per_slot))
            seq.status = SequenceStatus.RUNNING
            self.batch.append(seq)
            if budget is not None:
                budget -= seq.num_uncomputed_tokens

    def _release(self, seq: Sequence) -> None:
        slot = self.slot_of.pop(seq.seq_id, None)
        if slot is not None:
            self.free_slots.append(slot)
            self.free_slots.sort()
        seq.block_table = []
