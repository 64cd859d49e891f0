"""The router's queues for prefill/decode disaggregation: a prompt queue, a transfer queue, a decode batch
(chapter 11; the engine that drives them is minillm.engine.disagg_engine).

    add ──► prefill side (PrefillScheduler over the prefill worker's pool): prompts, chunked if enabled
              │ first token sampled, request goes on: hand_off
              ▼
            transfer queue (FIFO): KVTransfer, holding its prefill blocks
              │ decode side has blocks for it (admit_transfers: back-pressure, never a drop)
              ▼
            decode side (DecodeScheduler over the decode worker's pool): continuous batching of decodes

Each side is chapter 6's Scheduler over its own BlockManager, because each worker has its own pool with its own
block ids: a request's prefill block table ([7, 2, 9]) and its decode block table ([0, 5, 3]) are unrelated, and
the KV transfer (minillm.parallel.kv_transfer) maps one onto the other. The two sides hold two Sequence objects
for one request: the prefill side keeps the original until its blocks are freed, the decode side continues a
copy (same request id, tokens, timestamps), so neither block manager ever sees the other's block table.

A transfer moves through: created (hand_off) -> in a prefill message (`sending`, once the decode side has
free blocks for it: sends_to_post) -> `posted` (the prefill worker's isend is up) -> admitted by the decode side
(its recv rides on the next decode step) -> that step returns: the prefill blocks are freed (`complete`). Admission takes the queue's head only, so receives happen in
the order the sends were posted (NCCL matches in order). A request aborted while its send is posted is still
received, into nothing, so that the send completes; it only then leaves the queue.
"""
from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from minillm.engine.scheduler import Scheduler, StepRecord
from minillm.engine.sequence import Sequence, SequenceStatus


@dataclass
class KVTransfer:
    """One request's KV on its way from the prefill pool to the decode pool."""

    tag: int  # the message tag both workers use (gloo matches on it)
    prefill_seq: Sequence  # holds the prefill blocks until the data has arrived
    decode_seq: Sequence  # what the decode side continues
    num_blocks: int
    sending: bool = False  # in a message to the prefill worker
    posted: bool = False  # the prefill worker has posted its isend
    aborted: bool = False  # received into nothing, then dropped
    nbytes: int = 0  # what the prefill worker sent
    generator_state: Any = None  # a seeded request's sampler state, from the prefill worker to the decode worker

    @property
    def request_id(self) -> str:
        return self.decode_seq.request_id


class PrefillScheduler(Scheduler):
    """Chapter 6's scheduler for prompts only: a sequence leaves its running queue as soon as its first token
    is sampled (`detach`), keeping its blocks for the KV send; `release` frees them once the data has arrived."""

    def detach(self, seq: Sequence) -> None:
        self.block_manager.mark_computed(seq)  # its prompt's full blocks may serve later prompts (prefix cache)
        self.running.remove(seq)

    def release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED


class DecodeScheduler(Scheduler):
    """Chapter 6's scheduler, plus admission of a sequence whose prompt K/V arrive from the prefill side.
    A preempted sequence is recomputed here (its prompt prefilled again on the decode worker), as in one engine."""

    def admit_transferred(self, seq: Sequence) -> str:
        """"admit" (blocks allocated, seq running with its prompt computed), "wait" (no room now, or preempted
        sequences are waiting: they came first) or "reject" (it can never fit: finished with "error")."""
        if self.waiting or self.swapped:
            return "wait"
        if reason := self._never_fits(seq, seq.num_tokens):
            self._reject(seq, reason, StepRecord(step=self.num_steps, time=time.perf_counter()))
            return "reject"
        if self._decide(False, self.block_manager.num_blocks_to_allocate(seq)) == "wait":
            return "wait"
        self.block_manager.allocate(seq)
        seq.num_computed_tokens = seq.num_tokens - 1  # the prompt's K/V arrive; the first token's are computed here
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return "admit"


class DisaggScheduler:
    """The engine's `scheduler`: the scheduler protocol (add, finish, abort, has_unfinished) over both sides
    and the transfer queue between them."""

    def __init__(self, prefill: PrefillScheduler, decode: DecodeScheduler) -> None:
        self.prefill, self.decode = prefill, decode
        self.transfers: deque[KVTransfer] = deque()
        self._next_tag = 0

    def add(self, seq: Sequence) -> None:
        self.prefill.add(seq)

    def has_unfinished(self) -> bool:
        return self.prefill.has_unfinished() or bool(self.transfers) or self.decode.has_unfinished()

    def num_free_blocks(self) -> int:
        return self.decode.num_free_blocks()

    def finish(self, seq: Sequence) -> None:
        side = self.prefill if any(seq is s for q in _queues(self.prefill) for s in q) else self.decode
        side.finish(seq)

    def abort(self, request_id: str) -> Sequence | None:
        found = self.prefill.abort(request_id)
        for transfer in [t for t in self.transfers if t.request_id == request_id and not t.aborted]:
            transfer.aborted = True
            found = found or transfer.decode_seq
            if not transfer.sending:  # nothing was sent: free the prefill blocks now
                self.transfers.remove(transfer)
                self.prefill.release(transfer.prefill_seq)
        return self.decode.abort(request_id) or found

    # -- the hand-off ---------------------------------------------------------------------------------------
    def hand_off(self, seq: Sequence) -> KVTransfer:
        """Move a sequence whose first token was just sampled from the prefill side to the transfer queue."""
        self.prefill.detach(seq)
        decode_seq = copy.copy(seq)  # same request, id, timestamps; its own lists and no blocks
        decode_seq.token_ids, decode_seq.token_times = list(seq.token_ids), list(seq.token_times)
        decode_seq.block_table, decode_seq.status = [], SequenceStatus.WAITING
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(seq, name) is not None:
                setattr(decode_seq, name, list(getattr(seq, name)))
        num_blocks = self.prefill.block_manager.blocks_needed(seq.num_prompt_tokens)
        transfer = KVTransfer(self._next_tag, seq, decode_seq, num_blocks)
        self._next_tag += 1
        self.transfers.append(transfer)
        return transfer

    def sends_to_post(self) -> list[KVTransfer]:
        """Transfers to hand to the prefill worker now, in queue order (marked `sending`): as many as the decode
        side has free blocks for, counting those already sent. A posted send waits for its receive, and an NCCL
        send that waits keeps a kernel spinning on the prefill GPU (and, after the group's timeout, fails), so a
        transfer the decode side has no room for stays unsent, holding its prefill blocks: that is the
        back-pressure. One that can never fit is sent anyway: the decode side rejects it and drains the send."""
        bm = self.decode.block_manager
        capacity = bm.max_blocks_per_seq
        room = bm.num_free_blocks - bm.watermark_blocks
        fresh = []
        for transfer in self.transfers:
            needed = bm.blocks_needed(transfer.decode_seq.num_tokens)
            if not transfer.sending:
                if needed > room and needed <= capacity:
                    break  # FIFO: the ones behind wait too (NCCL receives in posting order)
                transfer.sending = True
                fresh.append(transfer)
            room -= needed
        return fresh

    def mark_posted(self, posted: list[tuple[int, int, Any]]) -> list[KVTransfer]:
        """The prefill worker's (tag, bytes, generator state) of the sends it has posted; returns those transfers."""
        reports = {tag: (nbytes, state) for tag, nbytes, state in posted}
        marked = [t for t in self.transfers if t.tag in reports]
        for transfer in marked:
            transfer.posted = True
            transfer.nbytes, transfer.generator_state = reports[transfer.tag]
        return marked

    def admit_transfers(self) -> list[KVTransfer]:
        """Take posted transfers off the head of the queue while the decode side admits them (an aborted or
        rejected one is taken too: it is received into nothing). Its decode_seq then holds decode blocks."""
        taken = []
        while self.transfers and self.transfers[0].posted:
            transfer = self.transfers[0]
            if not transfer.aborted:
                answer = self.decode.admit_transferred(transfer.decode_seq)
                if answer == "wait":
                    break
                transfer.aborted = answer == "reject"
            taken.append(self.transfers.popleft())
        return taken

    def complete(self, transfers: list[KVTransfer]) -> None:
        """The decode step that received these has returned: their data has arrived, free the prefill blocks."""
        for transfer in transfers:
            self.prefill.release(transfer.prefill_seq)

    def fail_unposted(self, transfers: list[KVTransfer]) -> list[KVTransfer]:
        """After a failed prefill message: the transfers it carried whose send was never posted leave the
        queue, their prefill blocks freed; returned so the engine can fail their requests."""
        failed = [t for t in transfers if not t.posted and t in self.transfers]
        for transfer in failed:
            self.transfers.remove(transfer)
            self.prefill.release(transfer.prefill_seq)
        return failed

    def check_invariants(self) -> None:
        self.prefill.check_invariants()
        self.decode.check_invariants()


def _queues(scheduler: Scheduler) -> tuple:
    return scheduler.waiting, scheduler.running, scheduler.swapped

