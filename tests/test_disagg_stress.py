"""Randomized differential stress test of the prefill/decode disaggregated engine (chapter 11): random engines,
random request streams, every request against the same request run alone on a plain in-process LLMEngine.

The disaggregated engine is an LLMEngine whose step is a router's (minillm.engine.disagg_engine): a prefill worker
and a decode worker in their own processes, each side its own scheduler and block pool, a transfer queue between
them, and a step that returns when either worker answers. So a request lives in three places in turn (the prefill
side, the transfer queue holding its prefill blocks, the decode side), two Sequence objects stand for it, and an
abort can land while its KV is on the wire. That is the bookkeeping this test hunts in.

For each seed an engine is drawn from what the disaggregated engine supports (tests/stress_helpers.py's
draw_engine_options without async scheduling or speculation, which it refuses): block size 4/8/16, a prefill pool
and a decode pool each of one to two longest sequences (so transfers wait for decode blocks, and both sides
preempt), prefix caching on the prefill side, chunked prefill with a small budget, preemption by recompute or swap,
the priority policy, an fp8 KV cache (the decode side adopts the prefill side's scales), a tokenizer that cannot
decode one token or a model whose forward raises on another (PoisonedSource: the workers unpickle it). Starting
its two worker processes costs about 3 s, so STREAMS request streams (tests/stress_helpers.py's draw_requests:
shared prefixes, stops that fire, min_tokens, seeded sampling, log-probs, poisoned requests, aborts at random
steps) go through each engine one after another, the prefix cache warm from the ones before. After every abort
and every step:

    each side's scheduler and block manager hold together (queues, statuses, ref counts, free + evictable + used);
    the prefill side's blocks are held by its running or swapped prompts and by the transfers still to be
    received, nobody else's; the decode side's by its running or swapped sequences;
    a live request is in exactly one place (a prefill queue, the transfer queue, a decode queue) and the router
    follows the Sequence that place advances;
    an aborted or finished request holds no block on the decode side; on the prefill side only while a send it
    posted is still to be received (the receive drains it: a posted send must complete), or while the decode step
    that receives it is under way;
    no request is reported finished twice, none after its abort, none that was never added;
and at the end of each stream every block on both sides is free, nothing is in flight, and each request that was
not aborted matches the request run alone (tokens, text, finish reason, log-probs; a greedy tie as in
tests/test_engine_stress.py); a poisoned request ends in "error" as alone, and so may only the requests of a
failed worker step that could not be rerun one at a time (its message moved KV, or blocks).

CI runs ENGINES engines of STREAMS streams (about 3 s each). A longer hunt: MINILLM_DISAGG_STRESS_ENGINES=100
(MINILLM_DISAGG_STRESS_FIRST=1000 to start elsewhere, MINILLM_DISAGG_STRESS_STREAMS=10 for longer-lived engines).
"""
from __future__ import annotations

import contextlib
import os
import random

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.disagg_engine import DisaggregatedEngine
from minillm.engine.worker import RandomWeights
from minillm.sampling_params import SamplingParams
from stress_helpers import (MAX_LEN, POISON_FORWARD, POISON_TEXT, ROUNDED_ACTIVATIONS, EngineChecks, FussyTokenizer,
                            PoisonedSource, Reference, Request, Scenario, describe, draw_engine_options, draw_requests,
                            drive, engine_tokenizer, quantized_config, stress_config)
from tiny import ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)

ENGINES = 2
FIRST = int(os.environ.get("MINILLM_DISAGG_STRESS_FIRST", 0))
NUM_ENGINES = int(os.environ.get("MINILLM_DISAGG_STRESS_ENGINES", ENGINES))
STREAMS = int(os.environ.get("MINILLM_DISAGG_STRESS_STREAMS", 3))
WEIGHTS = RandomWeights(seed=5)  # rebuilt bit for bit in each worker process and here for the reference


@pytest.fixture(scope="module")
def reference():
    config = quantized_config(stress_config())  # MINILLM_STRESS_ARCH's shape (Llama's by default) and QUANT
    return Reference((WEIGHTS(config, torch.device("cpu"), torch.float32), config))


def draw_engine(rng: random.Random, seed: int) -> tuple[dict, dict, str | None]:
    """(EngineConfig options, disaggregation plan, poison) of a random disaggregated engine."""
    options = draw_engine_options(rng, random.Random(f"engine extras {seed}"))
    options["async_scheduling"] = False  # refused here: the workers answer each step in turn
    per_seq = -(-MAX_LEN // options["block_size"])
    plan = {"prefill_num_kv_blocks": options.pop("num_kv_blocks"),
            "decode_num_kv_blocks": rng.randint(per_seq, 2 * per_seq)}
    rounded = "kv_cache_dtype" in options or ROUNDED_ACTIVATIONS  # rounding that may part tokens from the run alone's
    poison = None if rounded else rng.choice([None, None, "text", "forward"])
    return options, plan, poison


class DisaggChecks(EngineChecks):
    """EngineChecks for two sides and the transfer queue between them (see the module docstring)."""

    def _receiving(self) -> list:
        """Transfers whose prefill blocks are still held: queued, or in the decode worker's step under way."""
        in_flight = self.engine._in_flight.get("decode", (None, []))[1]
        return list(self.engine.scheduler.transfers) + list(in_flight)

    def _held_by(self, rid: str) -> dict[str, list[int]]:
        """Request `rid`'s device and CPU blocks on each side."""
        held = {}
        for side in ("prefill", "decode"):
            bm = getattr(self.engine.scheduler, side).block_manager
            ids = {seq.seq_id for seq in bm._on_device.values() if seq.request_id == rid}
            held[side] = [b for seq in bm._on_device.values() if seq.request_id == rid for b in seq.block_table]
            held[side] += [c for seq_id, table in bm._cpu_tables.items() if seq_id in ids for c in table]
        return held

    def holds_nothing(self, rid: str, seq) -> None:
        assert self._held_by(rid) == {"prefill": [], "decode": []}, f"request {rid} holds blocks after it finished"
        assert not any(t.request_id == rid for t in self._receiving()), f"finished request {rid} is in a transfer"

    def after_abort(self, rid: str, seq) -> None:
        held = self._held_by(rid)
        assert not held["decode"], f"aborted request {rid} holds decode blocks {held['decode']}"
        # a transfer still queued was sent (else abort freed its prefill blocks) and is marked to be received into
        # nothing; one already riding in the decode step under way keeps its prefill blocks until that step returns
        queued = [t for t in self.engine.scheduler.transfers if t.request_id == rid]
        assert all(t.aborted and t.sending for t in queued), \
            f"aborted request {rid}: its queued transfer is live or was never sent ({queued})"
        if not any(t.request_id == rid for t in self._receiving()):
            assert not held["prefill"], f"aborted request {rid} holds prefill blocks {held['prefill']}"

    def after_step(self) -> None:
        engine, sched = self.engine, self.engine.scheduler
        sched.check_invariants()
        receiving = self._receiving()
        holders = {"prefill": {s.seq_id for s in sched.prefill.running} | {t.prefill_seq.seq_id for t in receiving},
                   "decode": {s.seq_id for s in sched.decode.running}}
        for side, expected in holders.items():
            scheduler = getattr(sched, side)
            bm = scheduler.block_manager
            assert set(bm._on_device) == expected, \
                f"{side} side: blocks held by {sorted(bm._on_device)}, expected {sorted(expected)}"
            assert set(bm._cpu_tables) == {s.seq_id for s in scheduler.swapped}, f"{side} side: swap space"
        assert all(t.sending for t in sched.transfers if t.aborted), "an aborted, unsent transfer kept its blocks"
        places = {}  # request id -> where its live Sequence is
        queues = [(f"{side} {name}", getattr(getattr(sched, side), name))
                  for side in ("prefill", "decode") for name in ("waiting", "running", "swapped")]
        for where, seqs in queues + [("transfer queue", [t.decode_seq for t in sched.transfers if not t.aborted])]:
            for seq in seqs:
                assert seq.request_id not in places, f"request {seq.request_id} in {places[seq.request_id]} and {where}"
                places[seq.request_id] = where
                state = engine._requests.get(seq.request_id)
                assert state is not None and state.seq is seq, \
                    f"request {seq.request_id} in {where}: the router follows another Sequence (or none)"
        live = set(engine._requests)
        assert set(places) == live, f"requests nowhere: {live - set(places)}, ended but queued: {set(places) - live}"

    def at_end(self) -> None:
        engine = self.engine
        assert engine.num_used_blocks() == {"prefill": 0, "decode": 0}, "blocks leaked"
        for side in (engine.scheduler.prefill, engine.scheduler.decode):
            assert side.block_manager.num_used_cpu_blocks == 0 and not side.block_manager._on_device
        assert not engine.scheduler.transfers and not engine._in_flight

    @contextlib.contextmanager
    def recording_collateral(self, collateral: set[str]):
        """A worker step that raised and may not be rerun one request at a time (DisaggregatedEngine._can_rerun:
        its message moved KV, block operations in it) fails every request in it and its transfers: note them."""
        engine, can_rerun = self.engine, self.engine._can_rerun

        def recording(role, batch, transfers, error):
            ok = can_rerun(role, batch, transfers, error)
            if not ok:
                collateral.update([seq.request_id for seq in batch.seqs] + [t.request_id for t in transfers])
            return ok

        engine._can_rerun = recording
        try:
            yield
        finally:
            del engine._can_rerun


@pytest.mark.parametrize("seed", range(FIRST, FIRST + NUM_ENGINES))
def test_random_workloads_on_a_disaggregated_engine_match_requests_run_alone(reference, seed):
    rng = random.Random(seed)
    options, plan, poison = draw_engine(rng, seed)
    source = PoisonedSource(WEIGHTS) if poison == "forward" else WEIGHTS
    engine = DisaggregatedEngine(source, engine_tokenizer(poison), reference.config,
                                 EngineConfig(**options), disaggregation=plan)
    scenario, stream = None, 0
    try:
        for stream in range(STREAMS):
            scenario = Scenario({**options, **plan}, None, poison=poison)
            draw_requests(rng, scenario, reference, seeded=not ("kv_cache_dtype" in options or ROUNDED_ACTIVATIONS),
                          priorities=options.get("scheduling_policy") == "priority", prefix=f"{stream}.",
                          embed_rng=random.Random(f"embed {seed} {stream}"),  # (refused here, by name)
                          proc_rng=random.Random(f"processors {seed} {stream}"))
            drive(engine, scenario, reference, DisaggChecks(engine))
    except AssertionError as err:
        raise AssertionError(f"seed {seed} stream {stream}: {err}\n{describe(scenario)}") from err
    except Exception as err:
        raise RuntimeError(f"seed {seed} stream {stream}: {type(err).__name__}: {err}\n{describe(scenario)}") from err
    finally:
        engine.shutdown()


# -- regressions the stress test found, replayed by hand -------------------------------------------------------

def test_a_failed_step_spares_a_request_aborted_under_it_and_unreadable_text_fails_only_its_request(reference):
    """Two bugs of the router's `_complete`, both in one engine (a model that raises on POISON_FORWARD, a tokenizer
    that cannot decode POISON_TEXT; one sequence per step, so the prefill side takes prompts one by one):

    1. Request "bad" is aborted while its prefill step is under way on the worker (the router does not wait), and
       that step raises: the router finished every sequence of the step with "error", the aborted one too, so
       the caller got an output for a request after its abort (seed 6).
    2. A request whose text cannot be made (the tokenizer raises): one engine fails that request alone
       (StepOutputs._emit_outputs), the router's own output loop let the exception out of step(), so nobody's
       step finished (seeds 2, 7, 10)."""
    config = reference.config
    engine = DisaggregatedEngine(PoisonedSource(WEIGHTS), FussyTokenizer(), config,
                                 EngineConfig(max_model_len=MAX_LEN, block_size=16, max_num_seqs=1, num_kv_blocks=8))
    try:
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        engine.add_request("first", [10, 11, 12], params)
        engine.add_request("bad", [20, 21, POISON_FORWARD], params)
        engine.step()  # "first" has its first token; the prefill worker is computing "bad"'s prompt meanwhile
        assert [s.request_id for s in engine._in_flight["prefill"][0].seqs] == ["bad"]
        assert engine.abort("bad").outputs[0].finish_reason == "abort"
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
        assert "bad" not in {o.request_id for o in outputs}
        assert [o.outputs[0].finish_reason for o in outputs if o.finished] == ["length"]  # "first"
        assert engine.num_used_blocks() == {"prefill": 0, "decode": 0}

        scenario = Scenario({}, None, [(0, "add", "text", Request((30, 31, POISON_TEXT), 4)),
                                       (0, "add", "ok", Request((40, 41, 42), 4))], poison="forward")
        drive(engine, scenario, reference, DisaggChecks(engine))  # "text" ends in "error" as alone, "ok" as alone
    finally:
        engine.shutdown()


def test_a_request_that_breaks_a_worker_step_fails_alone(reference, caplog):
    """Three prompts in one prefill step, the middle one poisoned (the model raises on POISON_FORWARD): one engine
    reruns such a step one request at a time and only the poisoned request fails; the router used to finish all
    three with "error" (the stress test's poisoned streams counted the other two as collateral)."""
    engine = DisaggregatedEngine(PoisonedSource(WEIGHTS), ByteTokenizer(), reference.config,
                                 EngineConfig(max_model_len=MAX_LEN, block_size=16, max_num_seqs=4, num_kv_blocks=8))
    try:
        scenario = Scenario({}, None, [(0, "add", "good", Request((50, 51, 52, 53), 5)),
                                       (0, "add", "bad", Request((60, 61, POISON_FORWARD), 5)),
                                       (0, "add", "also good", Request((70, 71), 5, logprobs=2))], poison="forward")
        with caplog.at_level("ERROR", logger="minillm.engine.disagg_engine"):
            drive(engine, scenario, reference, DisaggChecks(engine))  # no collateral: "good" ones as alone
        assert "prefill step failed; rerunning its 3 requests one by one" in caplog.text
    finally:
        engine.shutdown()
