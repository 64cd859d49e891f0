"""Async scheduling: the host prepares step N+1 while the device runs step N (chapter 4's overlap, vLLM's
`async_scheduling`). `EngineConfig(async_scheduling=True)` / `LLM(..., async_scheduling=True)`.

Why. A synchronous engine step is a relay race with one runner at a time: the host schedules, builds and uploads
step N, launches it, then waits for its tokens, runs the per-request output loop (stop checks, detokenizer,
outputs) and only then schedules step N+1. Every millisecond of host work is a millisecond the GPU idles: on the
H200 an 8B decode step is ~10 ms of GPU and ~3-7 ms of host (benchmarks/RESULTS.md, P6). Overlapped, the step
takes max(GPU, host) instead of GPU + host.

How. What the host needs of step N's tokens to schedule step N+1 is only how many there are, and that is known in
advance: a decode (or the last chunk of a prefill) produces exactly one token. So one engine call does

    1. schedule step N+1, assuming every sequence that sampled in step N now has one more token. That token is a
       *placeholder* in `seq.token_ids`: the negative number -(r + 1), meaning "row r of step N's sampled tokens".
    2. build and launch step N+1 without waiting (ModelRunner.launch). Its input ids hold the placeholders; on the
       device, before the forward, `resolve_deferred_ids` replaces each by step N's sampled token (a gather from
       the tensor that is still on the device: no host round trip). The step's download goes into a pinned buffer
       with `non_blocking=True`, followed by a CUDA event.
    3. wait for step N's download only (the event: step N+1 keeps running), write the real tokens over the
       placeholders, and run the output loop for step N exactly as a synchronous step would.
    4. apply step N+1's bookkeeping with new placeholders (num_computed_tokens, one token per sampling sequence),
       skipping the requests that step 3 finished. It returns step N's outputs: a caller sees each token one
       call later than in a synchronous engine.

The price is the token a finished request computes for nothing. A request that stops in step N (EOS, stop string)
was already scheduled into step N+1; its block for that extra token exists (the scheduler appended it as for any
decode) and is freed with the others when step 3 finishes the request; step N+1's sample for it is dropped. Its
stray K/V write lands above num_computed_tokens, in a block nobody else holds (copy-on-write made it private), and a
block freed here and reused later is written again after it, in stream order. Requests that end by length are
known in advance: the scheduler gives them no step N+1 at all (Scheduler.skip_finished_by_length).

Everything else stays exact. Placeholders never reach the prefix cache: the cache hashes only computed tokens
(below num_computed_tokens), and by the time a placeholder's position is computed (step N+2's schedule), step 3 has
replaced it. Preemption needs no special case: a preempted sequence keeps its token list (placeholder included) and
gets its real token in step 3; it is not in step N+1, and it is re-admitted only after step 3. Swaps and copies
are queued in stream order before step N+1's forward (a swap-out brings blocks to host memory, so it waits for
the device: such a step loses its overlap, not its correctness; so does a step that stores evicted blocks in the
prefix cache's CPU tier, minillm/engine/offload_tier.py, whose loads, host to device, keep it).

What falls back to synchronous steps: verify steps of speculative decoding (the number of tokens a verify step
produces is not known in advance), and executors that cannot split a step in launch and collect (workers in other
processes). A speculative engine runs a step async when SpeculativeDecoder.steps_async expects it to verify
nothing (speculation switched off by disable_by_batch_size, or a prompt-lookup proposer that expects no draft), so
that such steps cost what plain decoding's do; otherwise `drain` first reads the step in flight, and the next call
decides again with every token known (it may still find nothing to verify: the guess was one token behind).
Going one step further, launching prompt lookup's verify step behind the step in flight (drafting one token
behind, the earlier occurrence's next token taken as the guess for the token in flight), was built and measured:
no faster (1.04x / 1.07x of plain against 1.05x / 1.10x at prompt_lookup_min 2 / 3, H200), since a wrong guess
turns a whole verify step into one token, and it was taken out (benchmarks/RESULTS.md, twenty-sixth session).
For the verify steps themselves that costs most of speculation's gain on a small model: on the H200 an n-gram
verify step of SmolLM2 took 1.67 ms of wall time for 0.83 ms of GPU work, where an async plain step hides its host
work (0.76 ms for 0.67; benchmarks/RESULTS.md, nineteenth session). Making verify steps async means scheduling
step N+1 before step N's accepted count is known: reserve KV slots for 1 + k tokens per sequence (the most a step
can keep), keep each sequence's length on the device and derive step N+1's positions, slot mapping and input ids
there from step N's accepted count (placeholders become "row r of step N's kept tokens, however many"), draft on
the device (an EAGLE head already does; n-gram lookup would have to), and let the host's num_computed_tokens catch
up one step late, rolling back the slots a rejection freed. vLLM's EAGLE path works this way; here it is not built yet.
Greedy outputs and those of requests with their own seed are the same as a synchronous run's (tested in fp32 on a
CPU; in bf16 a batch that holds a wasted token rounds like any other batch of that size, so near-ties may part).
Unseeded random sampling draws from the shared generator for wasted tokens too, so its outputs differ.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import SequenceStatus
from minillm.engine.step_input import build_step_input
from minillm.engine.step_isolation import can_isolate, forget_unfilled_blocks
from minillm.outputs import RequestOutput

logger = logging.getLogger(__name__)
FINISHED = SequenceStatus.FINISHED


@dataclass
class InFlightStep:
    """A launched step whose tokens the host has not read: its batch, the runner's handle, and per sequence the
    position of its placeholder token (-1: the step samples nothing for it, or it had finished already)."""

    batch: ScheduledBatch
    launched: Any  # ModelRunner's LaunchedStep, through the executor
    positions: list[int]


class AsyncSteps:
    """The engine's step when async scheduling is on (LLMEngine._step hands over to `step`)."""

    def __init__(self, engine: Any) -> None:
        # a weak reference: the engine owns this object, and a strong one back would make every async engine a
        # reference cycle, freed not when dropped but whenever Python's cyclic collector next runs (with its
        # CUDA graphs, KV cache and pinned buffers still held until then)
        self.engine = weakref.proxy(engine)
        self.in_flight_step: InFlightStep | None = None

    @property
    def in_flight(self) -> bool:
        return self.in_flight_step is not None

    def step(self) -> list[RequestOutput]:
        """Schedule and launch step N+1, then read step N and return its outputs (see the module docstring)."""
        engine = self.engine
        batch, outputs = engine._schedule()
        launched = step_input = failure = None
        if batch.is_empty:  # nothing to launch, but a swap-out to carry out (behind the step in flight)
            outputs += engine._apply_block_ops(batch)
        else:
            try:
                step_input = build_step_input(batch, engine.cache_config.block_size, engine._finished_since_last_step,
                                              engine.lora_slots)
                engine._finished_since_last_step = []
                step_input.deferred_input_ids = min(step_input.input_ids) < 0
                launched = engine.executor.launch_model(step_input)
            except Exception as err:  # isolate: this step's requests fail (after the step in flight is read)
                logger.exception("engine step failed for %d request(s)", len(batch.seqs))
                failure = f"{type(err).__name__}: {err}"
                if engine.lora_slots is not None:  # a slot's copy may have failed halfway: copy them all again
                    engine.lora_slots.forget()
        previous, self.in_flight_step = self.in_flight_step, None
        if previous is not None:
            self._read(previous, outputs)
        if failure is not None:
            forget_unfilled_blocks(engine.scheduler, batch)
            alive = [(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens) if not seq.is_finished]
            batch = dataclasses.replace(batch, seqs=[seq for seq, _ in alive], num_new_tokens=[n for _, n in alive])
            if can_isolate(batch, engine.executor, engine.speculative):  # nothing is in flight now: rerun
                outputs += engine._rerun_one_by_one(batch)  # synchronously, one request at a time
            else:
                outputs += [engine._finish(seq, "error", error=failure) for seq in batch.seqs]
        elif launched is not None:
            self.in_flight_step = self._expect(batch, step_input.num_sampled, launched)
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Read the step in flight, if any, and launch nothing: after it every token is on the host (a speculative
        engine calls this before a verify step, whose proposer drafts from the latest token)."""
        outputs: list[RequestOutput] = []
        previous, self.in_flight_step = self.in_flight_step, None
        if previous is not None:
            self._read(previous, outputs)
        return outputs

    def _expect(self, batch: ScheduledBatch, num_sampled: list[int], launched: Any) -> InFlightStep:
        """Step N+1's bookkeeping before its tokens exist: num_computed_tokens advances and every sequence that
        samples gets the placeholder -(r + 1) for its row r of the step's sampled tokens. Sequences finished
        while step N was read are left alone (their sample will be dropped)."""
        if max(num_sampled) > 1:
            raise ValueError(f"a sequence samples {max(num_sampled)} rows in one step: async scheduling expects one "
                             f"token per step (speculative steps run synchronously)")
        seqs, counts, new, positions = [], [], [], []
        row = 0
        for seq, n, k in zip(batch.seqs, batch.num_new_tokens, num_sampled):
            if seq.status is FINISHED:
                positions.append(-1)
            else:
                seqs.append(seq)
                counts.append(n)
                new.append([-1 - row] if k else [])
                positions.append(len(seq.token_ids) if k else -1)  # where the placeholder is about to go
            row += k
        self.engine.scheduler.postprocess(ScheduledBatch(seqs=seqs, num_new_tokens=counts), new)
        return InFlightStep(batch, launched, positions)

    def _read(self, flight: InFlightStep, outputs: list[RequestOutput]) -> None:
        """Wait for a launched step's tokens, put them in place of its placeholders and run the output loop for
        the requests still alive (an aborted one, or one that finished the step before, is skipped)."""
        engine = self.engine
        seqs = flight.batch.seqs
        live = [i for i, seq in enumerate(seqs) if seq.status is not FINISHED]
        try:
            output = engine.executor.collect_model(flight.launched)
            tokens = output.sampled_token_ids
            now = time.perf_counter()
            positions = flight.positions
            for i in live:
                position = positions[i]
                if position < 0:
                    continue
                seq, new = seqs[i], tokens[i]
                token_ids = seq.token_ids
                if token_ids[position] >= 0 or len(new) != 1:
                    raise RuntimeError(f"sequence {seq.request_id!r}: expected a placeholder at position {position} "
                                       f"and one sampled token, found {token_ids[position:]} and {new}")
                token_ids[position] = new[0]
                seq.token_times[-1] = now  # when the host learned it
                if position == seq.num_prompt_tokens:
                    seq.first_token_time = now
            scored = engine._scored_tokens(flight.batch, output, tokens)
        except Exception as err:  # the step's requests fail, the engine goes on
            logger.exception("reading a launched step failed; finishing %d request(s) with 'error'", len(live))
            message = f"{type(err).__name__}: {err}"
            for i in live:  # a token never read is no token: its placeholder goes (as abort drops it)
                position, seq = flight.positions[i], seqs[i]
                if 0 <= position < seq.num_tokens and seq.token_ids[position] < 0:
                    seq.truncate_output(position)
            outputs += [engine._finish(seqs[i], "error", error=message) for i in live]
            return
        if len(live) == len(seqs):
            engine._emit_outputs(seqs, tokens, scored, outputs)
        else:
            engine._emit_outputs([seqs[i] for i in live], [tokens[i] for i in live], [scored[i] for i in live],
                                 outputs)
