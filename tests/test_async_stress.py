"""Randomized differential stress test of AsyncLLM (chapter 10's front end): the engine stress test's scenarios,
served to concurrent coroutines instead of stepped by hand.

Seed N takes the engine stress test's scenario N (test_engine_stress.draw_scenario: an engine with prefix caching,
chunked prefill, preemption by recompute or swap, async scheduling, speculation, an fp8 KV cache, a poisoned
tokenizer or model; requests with shared prefixes, stop tokens and stop strings cut from their own runs alone,
min_tokens, ignore_eos, seeds, log-probs of sampled and prompt tokens, skip_special_tokens=False now and then,
LoRA adapters (generate's lora_request);
the steps at which they arrive and are aborted; here 3 in 10 requests without a stop also get a stop string of
up to 4 characters, what a stream must hold back) and serves it through AsyncLLM.generate: one coroutine per
request, arriving once the engine has taken that many steps. An abort event becomes one of the ways a client
leaves early, at that step:
    "abort"   it calls AsyncLLM.abort(its request id) and reads on: its stream ends with a finished output
              (finish_reason "abort", or the real one if the request finished first);
    "break"   it leaves its `async for` at the first output from that step on (the generator is dropped, closed
              by the event loop's finalizer, and the request aborted);
    "cancel"  its task is cancelled, wherever it waits (maybe before the loop handed the request to the engine;
              with an adapter, half the time maybe while generate() reads it in a thread, before anything is
              queued: the engine then never sees the request, and nobody else notices).
A fifth of the requests ask for output_kind="final_only", and a few clients ask generate() for what it must refuse
before anything is queued (BAD_CALLS): ValueError or TypeError with a message, and nobody else notices.

Checked (async_stress_helpers.EngineRecorder, a step listener, sees every output the engine hands out):
    after every step and every batch of aborts, the scheduler's and block manager's bookkeeping holds, and the
    LoRA slots' (stress_helpers.lora_problem: at most max_loras adapters among the running);
    every output of a request extends the one before (tokens, text, one log-prob entry per token): streamed text
    is never taken back, and a running request never shows a stop string (min_tokens 0: it would have stopped);
    a client that reads to the end receives exactly the engine's outputs for its request, in order, the last one
    finished and nothing after it; a final_only client receives one output;
    every request ends; one that finished (stop, length, error) has the tokens, text, finish reason and log-probs
    of the same request run alone (stress_helpers.compare: the same exceptions at a greedy tie, with fp8, and
    for the requests of a failed step that could not be rerun one at a time); one that ended early holds the
    start of its run alone (check_partial);
    afterwards no stream, add or abort is left, every KV block (and swap block) is free, and the loop still
    answers a plain request as the engine alone does.

CI runs SEEDS seeds (about half a second each; none of the first 16 draws LoRA) and LORA_SEEDS scenarios forced to
serve adapters (test_engine_stress.draw_scenario(lora=True)). A longer hunt: MINILLM_ASYNC_STRESS_SEEDS=500,
MINILLM_ASYNC_STRESS_LORA_SEEDS=100 (and MINILLM_ASYNC_STRESS_FIRST=10000 to start elsewhere); a failing seed
prints its scenario and its clients.
"""
from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass

import pytest

from async_stress_helpers import POLL, EngineRecorder, check_partial, gather_clients, settle, until_step
from minillm.engine.async_llm import AsyncLLM
from minillm.pooling import PoolingParams
from minillm.sampling_params import SamplingParams
from stress_helpers import MAX_LEN, EngineChecks, Reference, Request, Scenario, compare, describe, draw_stop
from test_engine_stress import build_engine, draw_scenario, head_dirs, model_and_config, reference  # noqa: F401
from tiny import one_thread  # noqa: F401  (autouse fixture)

SEEDS = 16
FIRST = int(os.environ.get("MINILLM_ASYNC_STRESS_FIRST", 0))
NUM_SEEDS = int(os.environ.get("MINILLM_ASYNC_STRESS_SEEDS", SEEDS))
LORA_SEEDS = 2  # scenarios forced to serve LoRA adapters (the first SEEDS draw none)
NUM_LORA_SEEDS = int(os.environ.get("MINILLM_ASYNC_STRESS_LORA_SEEDS", LORA_SEEDS))
LEAVES = ("abort", "abort", "break", "cancel")  # how a client whose request the scenario aborts leaves
AFTER = Request((7, 8, 9, 10), 8, ignore_eos=True)  # a plain request once every client has gone


def _mutated() -> SamplingParams:
    params = SamplingParams(max_tokens=4)
    params.temperature = -1.0  # assigned after construction: generate() checks a copy
    return params


BAD_CALLS = {  # what generate() must refuse before anything is queued: name -> (prompt, params)
    "n=2": lambda: ([1, 2, 3], SamplingParams(n=2)),
    "empty prompt": lambda: ([], SamplingParams()),
    "prompt longer than the context": lambda: ([5] * (MAX_LEN + 1), SamplingParams()),
    "token outside the vocabulary": lambda: ([5, 300], SamplingParams()),
    "logit bias outside the vocabulary": lambda: ([5], SamplingParams(logit_bias={400: 1.0})),
    "temperature set to -1 after construction": lambda: ([5], _mutated()),
    "params as a dict": lambda: ([5], {"temperature": 0}),
}


@dataclass
class Client:
    rid: str
    req: Request
    arrive: int  # the engine step at which it calls generate()
    leave: str = "stay"  # or one of LEAVES
    leave_at: int = 0
    final_only: bool = False
    cancel_in_check: bool = False  # with an adapter, "cancel" may land while generate() reads it (nothing queued)


def draw_clients(seed: int, scenario: Scenario, reference: Reference
                 ) -> tuple[dict[str, Client], list[tuple[int, str]], tuple[int, bool] | None]:
    """The scenario's requests as clients (3 in 10 of those without a stop given a stop string of up to 4
    characters), (step, BAD_CALLS name) for the clients that ask for nonsense, and (step, whether to sleep) of a
    pause_generation, or None."""
    rng = random.Random(f"async {seed}")  # not the scenario's generator: seed N keeps the engine test's scenario N
    clients: dict[str, Client] = {}
    kv_dtype = scenario.options.get("kv_cache_dtype", "auto")
    for step, kind, rid, req in scenario.events:
        if kind == "add":
            if req.pooling is not None and scenario.spec is not None:  # a speculating engine refuses to embed
                req.pooling = None  # (tests/test_engine_stress.py checks the refusal): it generates instead
            if req.pooling is None and not req.stop and not req.stop_token_ids:  # more and longer stop strings
                draw_stop(rng, req, reference, kv_dtype, scenario.poison, odds=(0.0, 0.3), longest=4)
            clients[rid] = Client(rid, req, step, final_only=rng.random() < 0.2)
        else:
            clients[rid].leave, clients[rid].leave_at = rng.choice(LEAVES), step
            if clients[rid].req.lora is not None and clients[rid].leave == "cancel":
                clients[rid].cancel_in_check = rng.random() < 0.5
    last = scenario.events[-1][0]
    bad = [(rng.randint(0, last + 3), rng.choice(sorted(BAD_CALLS))) for _ in range(rng.randint(1, 3))]
    # 1 time in 2 an RL trainer's turn at some step: pause ("wait": running requests finish, new ones wait), half
    # the time a sleep at level 1 and a wake, then resume (no client notices but by the delay)
    pause = (rng.randint(0, last + 3), rng.random() < 0.5) if rng.random() < 0.5 else None
    return clients, bad, pause


async def serve(llm: AsyncLLM, clients: dict[str, Client], bad: list[tuple[int, str]], recorder: EngineRecorder,
                unqueued: set[str], pause: tuple[int, bool] | None = None) -> dict[str, list]:
    """Run every client concurrently against the started `llm`; each client's outputs, as it received them.
    Fills `unqueued`: the clients cancelled inside generate() before their request was queued (an adapter's
    read), which the engine never sees."""
    seen: dict[str, list] = {rid: [] for rid in clients}

    async def client(c: Client, arrived: asyncio.Event) -> None:
        await until_step(llm, c.arrive)
        params, pooling = c.req.params(), None
        if c.final_only:
            params = params.checked_copy(output_kind="final_only")
        if c.req.pooling is not None:  # an embedding request: its prefill's pooled hidden states
            params, pooling = None, PoolingParams(c.req.pooling)
        # (the leaver runs once this task waits inside generate(): without an adapter the stream exists by then;
        # with one, generate() first reads the adapter in a thread, and a cancel may land there: nothing queued)
        arrived.set()
        async for out in llm.generate(list(c.req.prompt), params, request_id=c.rid, lora_request=c.req.lora,
                                      pooling_params=pooling):
            seen[c.rid].append(out)
            if c.leave == "break" and llm.engine.num_steps >= c.leave_at and not out.finished:
                break

    async def leaver(c: Client, task: asyncio.Task, arrived: asyncio.Event) -> None:
        await arrived.wait()
        if c.req.lora is not None and not c.cancel_in_check:  # not while generate() reads the adapter
            while c.rid not in llm._streams and c.rid not in recorder.outputs and not task.done():
                await asyncio.sleep(POLL)
        await until_step(llm, c.leave_at)
        if c.leave == "abort":
            await llm.abort(c.rid)
        elif c.leave == "cancel":
            # inside generate(), not queued yet: no stream (a stream leaves _streams with its finished output, which
            # the recorder has seen by then: both happen in one stretch of the loop) and the engine never saw it
            if c.rid not in llm._streams and c.rid not in recorder.outputs and not task.done():
                unqueued.add(c.rid)
            task.cancel()

    async def bad_client(step: int, name: str) -> None:
        await until_step(llm, step)
        prompt, params = BAD_CALLS[name]()
        try:
            async for _ in llm.generate(prompt, params):
                raise AssertionError(f"generate() accepted {name} and produced an output")
        except (ValueError, TypeError) as err:
            assert str(err), f"{name}: {type(err).__name__} without a message"
        else:
            raise AssertionError(f"generate() accepted {name}")

    tasks = []
    for c in clients.values():
        arrived = asyncio.Event()
        task = asyncio.ensure_future(client(c, arrived))
        tasks.append(task)
        if c.leave in ("abort", "cancel"):
            tasks.append(asyncio.ensure_future(leaver(c, task, arrived)))
    async def trainer(step: int, sleep: bool) -> None:  # an RL loop's turn: the engine emptied, maybe asleep
        await until_step(llm, step)
        await llm.pause_generation("wait")
        assert not llm.engine.has_unfinished_requests()
        if sleep:
            await llm.sleep(1)
            await asyncio.sleep(0.005)
            await llm.wake_up()
        await llm.resume_generation()

    tasks += [asyncio.ensure_future(bad_client(step, name)) for step, name in bad]
    if pause is not None:
        tasks.append(asyncio.ensure_future(trainer(*pause)))
    await gather_clients(tasks)
    return seen


def check_clients(clients: dict[str, Client], seen: dict[str, list], recorder: EngineRecorder,
                  unqueued: set[str]) -> None:
    """What each client received against what the engine handed out for its request (nothing, for a client
    cancelled before its request was queued)."""
    for rid, c in clients.items():
        got, engine_outputs = seen[rid], recorder.outputs.get(rid, [])
        if rid in unqueued:
            assert not got and not engine_outputs, f"request {rid}: cancelled before it was queued, yet " \
                                                   f"{len(got)} outputs received, {len(engine_outputs)} made"
            continue
        assert engine_outputs, f"request {rid} never reached the engine"
        if c.leave in ("stay", "abort"):  # it read to the end: every output, in order, the last one finished
            assert got == engine_outputs, f"request {rid}: the client received {len(got)} outputs, the engine " \
                                          f"gave {len(engine_outputs)}"
            assert got[-1].finished
            assert not c.final_only or len(got) == 1, f"request {rid}: final_only, {len(got)} outputs"
        else:
            assert got == engine_outputs[:len(got)], f"request {rid}: outputs out of order or lost"
        if c.req.min_tokens == 0:  # (min_tokens holds a stop string back, so it may stand in the text)
            for out in got:
                if out.outputs[0].finish_reason != "error":
                    assert not any(s in out.outputs[0].text for s in c.req.stop), \
                        f"request {rid}: a stop string {c.req.stop} in {out.outputs[0].text!r}"


def run_seed(model_and_config, head_dirs, reference: Reference, seed: int,  # noqa: F811
             lora: bool | None = None) -> None:
    scenario = draw_scenario(seed, reference, lora)
    clients, bad, pause = draw_clients(seed, scenario, reference)
    engine = build_engine(model_and_config, head_dirs, scenario)
    llm = AsyncLLM(engine)
    recorder = EngineRecorder(llm)
    checks = EngineChecks(engine)
    checks.lora_ids = {c.req.lora.lora_int_id for c in clients.values() if c.req.lora is not None}
    collateral: set[str] = set()
    unqueued: set[str] = set()

    async def main():
        await llm.start()
        try:
            seen = await serve(llm, clients, bad, recorder, unqueued, pause)
            await settle(llm)
            after = [out async for out in llm.generate(list(AFTER.prompt), AFTER.params(), request_id="after")]
        finally:
            await llm.shutdown()
        return seen, after

    try:
        with checks.recording_collateral(collateral):
            seen, after = asyncio.run(main())
        assert not engine._requests and not engine.scheduler.has_unfinished()
        checks.at_end()
        recorder.check_all_ended()
        check_clients(clients, seen, recorder, unqueued)
        kv_dtype = scenario.options.get("kv_cache_dtype", "auto")
        requests = {rid: c.req for rid, c in clients.items() if rid not in unqueued}
        finished, outputs_of = {}, {}
        for rid in requests:
            final = recorder.final(rid)
            done = final.outputs[0]
            if done.finish_reason == "abort":
                check_partial(reference, rid, requests[rid], done.token_ids, kv_dtype, scenario.poison)
            else:
                finished[rid], outputs_of[rid] = (done.token_ids, done.finish_reason, done.text), final
        requests["after"], outputs_of["after"] = AFTER, after[-1]
        finished["after"] = (after[-1].outputs[0].token_ids, after[-1].outputs[0].finish_reason, after[-1].text)
        compare(scenario, reference, requests, finished, outputs_of, collateral)
    except AssertionError as err:
        where = f"seed {seed}" + ("" if lora is None else f" (lora={lora})")
        raise AssertionError(f"{where}: {err}\n{describe(scenario)}\nclients: {list(clients.values())}\n"
                             f"bad: {bad}, cancelled before queued: {sorted(unqueued)}") from err


@pytest.mark.parametrize("seed", range(FIRST, FIRST + NUM_SEEDS))
def test_async_clients_get_what_requests_run_alone_make(model_and_config, head_dirs, reference, seed):  # noqa: F811
    run_seed(model_and_config, head_dirs, reference, seed)


@pytest.mark.parametrize("seed", range(FIRST, FIRST + NUM_LORA_SEEDS))
def test_async_clients_with_lora_adapters(model_and_config, head_dirs, reference, seed):  # noqa: F811
    """The engine stress test's forced-LoRA scenario N (draw_scenario(lora=True)) served to clients."""
    run_seed(model_and_config, head_dirs, reference, seed, lora=True)
