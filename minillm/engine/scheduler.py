"""Continuous batching: decide, every step, which sequences run and how many tokens each computes (chapter 6).

Static batching (static_scheduler.py) waits for the longest request of a batch before admitting anyone.
Here the batch is re-formed at every step (Orca's iteration-level scheduling), over three queues:

    waiting  new requests and recompute-preempted ones (FCFS; or by sampling_params.priority, lower first,
             when config.scheduling_policy == "priority")
    running  sequences holding device blocks
    swapped  preempted sequences whose blocks sit in CPU memory

Each `schedule()`:
  (a) running sequences first (decodes, and chunked prefills under way), in priority order. Each needs room
      for its new tokens; when the pool is out of blocks, the lowest-priority (latest-arrived) running
      sequence is preempted, possibly the one asking. "recompute" frees its blocks and puts it at the FRONT
      of waiting: prompt and generated tokens are prefilled again later (the prefix cache may serve most of
      them). "swap" copies its blocks to CPU (blocks_to_swap_out) and parks it in swapped; with too little
      CPU space it falls back to recompute.
  (b) if nobody was preempted, swapped sequences come back (blocks_to_swap_in) before any new admission.
  (c) if nobody was preempted and nothing is left swapped, waiting sequences are admitted while
      max_num_seqs, the token budget (max_num_batched_tokens) and the free blocks above the watermark allow.
With enable_chunked_prefill a prefill may be cut so that the step's token budget is used exactly, decodes
and prefill chunks sharing one forward (Sarathi-Serve); long_prefill_token_threshold > 0 also caps any one
sequence's chunk, so a long prompt at the head of the queue leaves budget for the prompts behind it (vLLM's option).
Without chunking a prefill runs whole, so max_num_batched_tokens must be >= max_model_len (checked here, as vLLM
does).

Speculative decoding (chapter 9): a running decode whose `spec_token_ids` hold k drafts is extended, after
(a) gave every running sequence its own token, by as many drafts as the token budget, max_model_len and the
free blocks allow (`_grant_drafts`: drafts are trimmed, never a reason to preempt); `postprocess` then gives
back the blocks of the rejected ones. Drafts never ride on a prefill, and stale ones are dropped every step.

Async scheduling (minillm/engine/async_step.py): schedule() runs while the previous step's tokens are still
placeholders; a sequence whose placeholder already reached max_tokens / max_model_len is given no new tokens
(`skip_finished_by_length`): the engine finishes it when the token arrives.

With a sliding window in every layer (block_window.py) the blocks wholly before a running sequence's window are
given back at the start of each step, and a new prompt takes blocks for its first chunk only (later chunks take
theirs in (a)): a sequence then holds about its window, whatever its length.

A request that can never fit (more blocks than the pool can give one sequence, or longer than
max_model_len) is finished with finish_reason "error" and a message naming the numbers, and put in
`self.rejected`, which the engine drains: it never waits forever.

The runner must apply a batch's block operations in this order before the forward: swap-outs, the prefix cache's
CPU-tier stores (blocks_to_offload), swap-ins, copies, the tier's loads (blocks_to_onload): every copy out of a
device block comes before anything that writes it, since a block freed or evicted may be reused in the same step
(minillm/engine/offload_tier.py says why loads come last). `timeline` keeps one StepRecord per
step for chapter 6's Gantt charts. Every block decision goes through `admit_or_preempt` (a pure function of
the step's numbers, chapter 6's exercise).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from minillm.config import EngineConfig
from minillm.engine.block_manager import BlockManager
from minillm.engine.scheduler_interface import ScheduledBatch, update_sequences
from minillm.engine.sequence import Sequence, SequenceStatus
from minillm.hooks import dispatch

TIMELINE_MAX_STEPS = 100_000  # a long-running server keeps only the most recent steps


# >>> exercise ch06.admit_or_preempt
def admit_or_preempt(is_running: bool, num_blocks_needed: int, num_free_blocks: int, watermark_blocks: int,
                     num_running: int, max_num_seqs: int) -> str:
    """The scheduler's decision about one sequence, this step: "run" / "preempt", or "admit" / "wait".

    A RUNNING sequence (is_running=True) needs num_blocks_needed more free blocks to compute its next tokens
    (a decode step that crosses a block boundary, a prefill chunk, a copy-on-write). It was admitted already,
    so it may use the pool down to the last block: "run" when num_blocks_needed <= num_free_blocks, else
    "preempt" (the caller then preempts the lowest-priority running sequence, perhaps this one, and asks again).

    A WAITING sequence (a new request, or a swapped-out one coming back) needs num_blocks_needed blocks to
    join. It never preempts anyone: "admit" only when the batch has room (num_running < max_num_seqs) AND
    taking its blocks leaves at least watermark_blocks free; otherwise "wait". The watermark keeps a little
    room for the running sequences to grow: admitting down to the last block would make the very next decode
    step preempt someone.

    Example: 3 blocks needed, 3 free, watermark 1: running -> "run"; waiting -> "wait".
    Raise ValueError if a count is negative or max_num_seqs < 1.
    """
    # >>> solution
    if min(num_blocks_needed, num_free_blocks, watermark_blocks, num_running) < 0 or max_num_seqs < 1:
        raise ValueError(f"counts must be >= 0 and max_num_seqs >= 1, got num_blocks_needed={num_blocks_needed}, "
                         f"num_free_blocks={num_free_blocks}, watermark_blocks={watermark_blocks}, "
                         f"num_running={num_running}, max_num_seqs={max_num_seqs}")
    if is_running:
        return "run" if num_blocks_needed <= num_free_blocks else "preempt"
    if num_running < max_num_seqs and num_free_blocks - num_blocks_needed >= watermark_blocks:
        return "admit"
    return "wait"
    # <<< solution
# <<< exercise


@dataclass
class StepRecord:
    """What one schedule() decided, for timelines and metrics."""

    step: int
    time: float  # time.perf_counter() when the step was scheduled
    scheduled: list[tuple[int, int]] = field(default_factory=list)  # (seq_id, num_new_tokens)
    prefill_ids: list[int] = field(default_factory=list)  # seq ids whose tokens this step are (part of) a prefill
    preempted: list[int] = field(default_factory=list)
    swapped_out: list[int] = field(default_factory=list)
    swapped_in: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    num_free_blocks: int = 0  # after scheduling
    num_waiting: int = 0
    num_running: int = 0
    num_swapped: int = 0

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    """The continuous-batching scheduler; implements scheduler_interface.Scheduler."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        if config.max_num_seqs is None:
            raise ValueError("EngineConfig.max_num_seqs is None (decided per device): resolve the config first "
                             "(minillm.engine.cache_config.resolve_engine_config) or give max_num_seqs >= 1")
        if (not config.enable_chunked_prefill and config.max_model_len is not None
                and config.max_num_batched_tokens < config.max_model_len):
            raise ValueError(
                f"max_num_batched_tokens={config.max_num_batched_tokens} is smaller than max_model_len="
                f"{config.max_model_len}: without chunked prefill a prompt of max_model_len tokens could never be "
                f"scheduled; set max_num_batched_tokens >= {config.max_model_len} or enable_chunked_prefill=True")
        self.config = config
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.policy = config.scheduling_policy  # checked by EngineConfig: one of SCHEDULING_POLICIES
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.rejected: list[Sequence] = []  # finished with "error" by the scheduler; the engine drains this
        self.timeline: list[StepRecord] = []
        self.num_steps = 0
        self.num_preemptions = 0
        # async scheduling: a decode whose last (not yet downloaded) token reached max_tokens or max_model_len
        # ends when that token is read; it computes nothing more (never true of a sequence in a synchronous step)
        self.skip_finished_by_length = bool(config.async_scheduling)
        # multi-LoRA: at most this many distinct adapters among the running sequences (None: LoRA off)
        self.max_loras = config.max_loras if config.enable_lora else None

    # -- the protocol -------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.num_tokens < 1:
            raise ValueError(f"request {seq.request_id!r} has an empty prompt")
        if seq.status != SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"only a new WAITING sequence without blocks can be added, got {seq!r}")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    def finish(self, seq: Sequence) -> None:
        """Mark seq FINISHED (its finish_reason already set) and free its blocks at once."""
        self._remove(seq)
        self._retire(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Remove every sequence of this request (waiting, running or swapped); return the first, or None."""
        found = None
        for seq in [s for q in (self.waiting, self.running, self.swapped) for s in q if s.request_id == request_id]:
            self._remove(seq)
            seq.finish_reason = "abort"
            self._retire(seq)
            found = found or seq
        return found

    def schedule(self) -> ScheduledBatch:
        bm = self.block_manager
        self.num_steps += 1
        batch = ScheduledBatch()
        record = StepRecord(step=self.num_steps, time=time.perf_counter())
        budget = self.config.max_num_batched_tokens
        for seq in self.running:  # what the last step computed may now be shared; what slid out of a window, go
            bm.mark_computed(seq)
            bm.release_out_of_window(seq)

        # (a) running sequences, highest priority first; victims come off the end of the same order
        order = sorted(self.running, key=self._priority_key)
        i = 0
        while i < len(order):
            seq = order[i]
            n = self._num_new_tokens(seq, budget)
            if n == 0:
                i += 1
                continue
            if reason := self._never_fits(seq, seq.num_computed_tokens + n):
                order.pop(i)
                self.running.remove(seq)
                self._reject(seq, reason, record)
                continue
            while True:  # the plan is made again after each preemption (a victim may have shared seq's blocks)
                plan = bm.write_plan(seq, n)
                if self._decide(True, len(plan[0]) + plan[1]) != "preempt":
                    break
                victim = order.pop()
                self._preempt(victim, batch, record)
                if victim is seq:
                    plan = None
                    break
            if plan is not None:  # seq was marked computed at the top: the plan append_slots would make anew
                batch.blocks_to_copy += bm.append_slots(seq, n, plan=plan)
                self._add_to_batch(batch, record, seq, n)
                budget -= n
                i += 1
        budget, granted = self._grant_drafts(batch, record, budget)

        # (b) swapped sequences come back before anyone new, but not in a step that just preempted
        if not batch.preempted:
            for seq in sorted(self.swapped, key=self._priority_key):
                if len(self.running) >= self.config.max_num_seqs:
                    break
                if not self._lora_fits(seq):
                    continue
                n = self._num_new_tokens(seq, budget)
                if n == 0:
                    break
                if reason := self._never_fits(seq, seq.num_computed_tokens + n):
                    self.swapped.remove(seq)
                    self._reject(seq, reason, record)
                    continue
                if self._decide(False, bm.num_blocks_to_swap_in(seq, n)) == "wait":
                    break
                self.swapped.remove(seq)
                batch.blocks_to_swap_in += bm.swap_in(seq)
                batch.blocks_to_copy += bm.append_slots(seq, n)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                record.swapped_in.append(seq.seq_id)
                self._add_to_batch(batch, record, seq, n)
                budget -= n

        # (c) admissions
        if not batch.preempted and not self.swapped:
            self._admit(batch, record, budget)

        for queue in (self.waiting, self.running, self.swapped):
            for seq in queue:  # drafts not scheduled in (a) are stale by the next step: drop them
                if seq.spec_token_ids and seq.seq_id not in granted:
                    seq.spec_token_ids = []
        batch.blocks_to_offload, batch.blocks_to_onload = bm.take_offload_copies()  # what this plan evicted / hit
        record.num_free_blocks = bm.num_free_blocks
        record.num_waiting, record.num_running, record.num_swapped = \
            len(self.waiting), len(self.running), len(self.swapped)
        self.timeline.append(record)
        if len(self.timeline) > TIMELINE_MAX_STEPS:
            del self.timeline[: len(self.timeline) - TIMELINE_MAX_STEPS]
        return batch

    def postprocess(self, batch: ScheduledBatch, token_ids_per_seq: list[list[int]]) -> None:
        """The step's bookkeeping (scheduler_interface.update_sequences); a sequence that carried drafts then
        keeps only the blocks of its computed tokens, exactly what it would hold had it never drafted."""
        bm = self.block_manager
        update_sequences(batch, token_ids_per_seq, rollback=lambda seq: bm.truncate(seq, seq.num_computed_tokens))

    # -- steps of schedule() ------------------------------------------------------------------------------
    def _grant_drafts(self, batch: ScheduledBatch, record: StepRecord, budget: int) -> tuple[int, set[int]]:
        """Extend the decodes scheduled in (a) by their draft tokens (speculative decoding), as far as the token
        budget, max_model_len and the free blocks allow; returns (the budget left, ids of the sequences that carry
        drafts into this step). This runs after every running
        sequence got its own token, so a draft never preempts anyone: drafts that do not fit are trimmed."""
        bm, limit = self.block_manager, self.config.max_model_len
        capacity = bm.max_blocks_per_seq
        granted: set[int] = set()
        for i, seq in enumerate(batch.seqs):
            n = batch.num_new_tokens[i]
            if not seq.spec_token_ids or seq.is_prefill or seq.num_computed_tokens + n != seq.num_tokens:
                seq.spec_token_ids = []  # a prefill (or a chunk of one) never carries drafts
                continue
            k = min(len(seq.spec_token_ids), budget)
            if limit is not None:
                k = min(k, limit - seq.num_tokens)  # positions past max_model_len are never computed
            while k > 0 and (bm.num_blocks_to_append(seq, n + k) > bm.num_free_blocks
                             or bm.num_blocks_held_at(seq, seq.num_tokens + k) > capacity):
                k -= 1
            seq.spec_token_ids = seq.spec_token_ids[:max(k, 0)]
            if k > 0:
                batch.blocks_to_copy += bm.append_slots(seq, n + k)
                batch.num_new_tokens[i] = n + k
                record.scheduled[i] = (seq.seq_id, n + k)
                budget -= k
                granted.add(seq.seq_id)
        return budget, granted

    def _admit(self, batch: ScheduledBatch, record: StepRecord, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            seq = self._next_waiting()
            if seq is None:
                break  # every waiting request needs an adapter slot the running ones hold
            if reason := self._never_fits(seq, seq.num_tokens):
                self.waiting.remove(seq)
                self._reject(seq, reason, record)
                continue
            n = seq.num_tokens - bm.num_cached_tokens_on_allocate(seq)
            if self.config.enable_chunked_prefill:
                n = self._chunk(n, budget)
            if self._decide(False, bm.num_blocks_to_allocate(seq, n)) == "wait":
                break  # FCFS: the head waits for blocks; nobody overtakes it
            if n > budget and batch.seqs:
                break  # a whole prefill does not fit what is left of this step's budget
            self.waiting.remove(seq)
            batch.blocks_to_copy += bm.allocate(seq, n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_to_batch(batch, record, seq, n)
            budget -= n

    def _preempt(self, seq: Sequence, batch: ScheduledBatch, record: StepRecord) -> None:
        bm = self.block_manager
        self.running.remove(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(seq)
        record.preempted.append(seq.seq_id)
        if self.config.preemption_mode == "swap" and bm.can_swap_out(seq):
            batch.blocks_to_swap_out += bm.swap_out(seq)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
            record.swapped_out.append(seq.seq_id)
        else:
            bm.free(seq)
            seq.num_computed_tokens = 0
            seq.num_cached_tokens = 0
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)  # first in line again: it had already been admitted once

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """Tokens seq would compute this step within `budget` (0: it does not fit this step)."""
        n = seq.num_uncomputed_tokens
        if n == 1 and self.skip_finished_by_length and self._reached_length(seq):
            return 0
        if self.config.enable_chunked_prefill:
            return max(0, self._chunk(n, budget))
        return n if n <= budget else 0

    def _chunk(self, n: int, budget: int) -> int:
        """Tokens a sequence with n uncomputed ones computes this step under chunked prefill: what the budget leaves,
        and at most long_prefill_token_threshold (when > 0), so that a long prompt shares the step with the ones
        behind it instead of taking the whole budget."""
        threshold = self.config.long_prefill_token_threshold
        return min(n, budget, threshold) if threshold else min(n, budget)

    def _reached_length(self, seq: Sequence) -> bool:
        """Has seq generated all it may (max_tokens, or max_model_len tokens in all)? Its engine finishes it."""
        num_tokens = len(seq.token_ids)
        outputs = num_tokens - seq.num_prompt_tokens
        limit = self.config.max_model_len
        return outputs > 0 and (outputs >= seq.sampling_params.max_tokens or (limit is not None and num_tokens >= limit))

    def _never_fits(self, seq: Sequence, num_tokens: int) -> str | None:
        """Why seq can never run (a message naming the numbers), or None."""
        bm = self.block_manager
        limit = self.config.max_model_len
        if limit is not None and seq.num_tokens > limit:
            return f"request {seq.request_id!r} has {seq.num_tokens} tokens, more than max_model_len={limit}"
        if seq.status == SequenceStatus.WAITING:  # its steps to come, a prefill first (a window's: bounded)
            needed = bm.peak_blocks(num_tokens, self.config.max_num_batched_tokens)
        else:  # running or swapped: the blocks it holds once this step's tokens have room
            needed = bm.num_blocks_held_at(seq, num_tokens)
        capacity = bm.max_blocks_per_seq
        if needed > capacity:
            return (f"request {seq.request_id!r} needs {needed} KV blocks of {bm.block_size} tokens for "
                    f"{num_tokens} tokens, but one sequence can have at most {capacity} (the pool's "
                    f"{bm.num_blocks} blocks minus a watermark of {bm.watermark_blocks}); give the KV cache more "
                    f"memory or shorten the request")
        return None

    def _reject(self, seq: Sequence, reason: str, record: StepRecord) -> None:
        seq.finish_reason = "error"
        seq.error = reason
        self._retire(seq)
        self.rejected.append(seq)
        record.rejected.append(seq.seq_id)

    def check_invariants(self) -> None:
        """Raise AssertionError if queues, statuses and blocks disagree (tests call it after every step)."""
        queues = {"waiting": (self.waiting, SequenceStatus.WAITING), "running": (self.running, SequenceStatus.RUNNING),
                  "swapped": (self.swapped, SequenceStatus.SWAPPED)}
        seen: set[int] = set()
        for name, (queue, status) in queues.items():
            for seq in queue:
                if seq.status != status or seq.seq_id in seen:
                    raise AssertionError(f"{seq!r} is in {name} with status {seq.status.value} (or in two queues)")
                if (name == "running") != bool(seq.block_table):
                    raise AssertionError(f"{seq!r} in {name} has block table {seq.block_table}")
                seen.add(seq.seq_id)
        if len(self.running) > self.config.max_num_seqs:
            raise AssertionError(f"{len(self.running)} running > max_num_seqs={self.config.max_num_seqs}")
        self.block_manager.check_invariants()

    # -- helpers ------------------------------------------------------------------------------------------
    def _decide(self, is_running: bool, num_blocks_needed: int) -> str:
        """admit_or_preempt (the learner's, when overridden) on this step's numbers; its answer is checked."""
        bm = self.block_manager
        answer = dispatch("ch06.admit_or_preempt", admit_or_preempt)(
            is_running, num_blocks_needed, bm.num_free_blocks, bm.watermark_blocks, len(self.running),
            self.config.max_num_seqs)
        allowed = ("run", "preempt") if is_running else ("admit", "wait")
        if answer not in allowed:
            raise ValueError(f"admit_or_preempt returned {answer!r} for a {'running' if is_running else 'waiting'} "
                             f"sequence; allowed: {allowed}")
        return answer

    def _priority_key(self, seq: Sequence) -> tuple:
        """Smaller runs first: (priority under the priority policy,) arrival time, then id."""
        if self.policy == "priority":
            return seq.sampling_params.priority, seq.arrival_time, seq.seq_id
        return seq.arrival_time, seq.seq_id

    def _next_waiting(self) -> Sequence | None:
        """The request to admit next: the queue's head (or its highest priority). With LoRA on, a request whose
        adapter would be one more than max_loras among the running is passed over (vLLM's rule: the requests
        behind it may go first); None when every waiting request is passed over."""
        if self.max_loras is None:
            return min(self.waiting, key=self._priority_key) if self.policy == "priority" else self.waiting[0]
        order = sorted(self.waiting, key=self._priority_key) if self.policy == "priority" else self.waiting
        return next((seq for seq in order if self._lora_fits(seq)), None)

    def _lora_fits(self, seq: Sequence) -> bool:
        """Whether seq may run beside the running sequences without a (max_loras + 1)-th adapter among them."""
        request = seq.lora_request
        if request is None or self.max_loras is None:
            return True
        running = {s.lora_request.lora_int_id for s in self.running if s.lora_request is not None}
        return request.lora_int_id in running or len(running) < self.max_loras

    def _add_to_batch(self, batch: ScheduledBatch, record: StepRecord, seq: Sequence, n: int) -> None:
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        record.scheduled.append((seq.seq_id, n))
        if seq.num_computed_tokens + n < seq.num_tokens or seq.num_computed_tokens < seq.num_prompt_tokens:
            record.prefill_ids.append(seq.seq_id)
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = record.time

    def _remove(self, seq: Sequence) -> None:
        for queue in (self.waiting, self.running, self.swapped):
            if seq in queue:
                queue.remove(seq)

    def _retire(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        if seq.finish_time is None:
            seq.finish_time = time.perf_counter()
