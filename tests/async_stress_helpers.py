"""The machinery of the stress tests of the asynchronous front end: tests/test_async_stress.py drives
AsyncLLM.generate, tests/test_openai_stress.py the OpenAI server over HTTP. Both serve the engine stress test's
engines (test_engine_stress.build_engine: prefix caching, chunked prefill, preemption, async scheduling,
speculation, an fp8 KV cache) and judge every request against the same request run alone
(stress_helpers.Reference and compare). What is new here is what lies between the engine and a client:

    EngineRecorder     a step listener on the AsyncLLM: the scheduler's invariants and the LoRA slots'
                       (stress_helpers.lora_problem) after every step (and after every batch of aborts), and every
                       RequestOutput the engine handed out, per request id:
                       each extends the one before it (tokens, text, log-probs: nothing shown is ever taken
                       back), none comes after the finished one
    until_step         a client's arrival or departure: wait until the engine has taken that many steps (sooner
                       when it has nothing in flight, so a lone client never waits for steps that never come)
    gather_clients     wait for every client task: a cancelled one (a client told to leave) is None, any other
                       error fails the test
    check_partial      a request that ended early (aborted, its client gone): what it made is where the run
                       alone went too
    settle             after the last client: the loop holds no stream, no add or abort is pending, the engine
                       has no request

Why wait for engine steps rather than seconds: the engine steps in its own thread, a step takes a millisecond
or two on the CPU, and the machine is shared: a client that arrives "at step 7" arrives among the same
neighbours on a slow machine as on a fast one (nearly: the loop and the clients still race by a step or so).
"""
from __future__ import annotations

import asyncio
import time

from minillm.engine.async_llm import AsyncLLM
from minillm.outputs import RequestOutput
from stress_helpers import FP8_TOL, TIE, Reference, Request, extension_problem, lora_problem

POLL = 0.001  # seconds between two looks at the engine's step counter


class EngineRecorder:
    """Installed as a step listener of `llm` (it runs on the event loop while no step is in flight, so it may
    read the scheduler). A listener that raises is logged and ignored by AsyncLLM (a broken viewer must not stop
    the engine), so problems are collected in `problems` for the test to assert on at the end."""

    def __init__(self, llm: AsyncLLM) -> None:
        self.engine = llm.engine
        self.outputs: dict[str, list[RequestOutput]] = {}
        self.problems: list[str] = []
        llm.add_step_listener(self)

    def __call__(self, outputs: list[RequestOutput], snapshot) -> None:
        try:
            self.engine.scheduler.check_invariants()
        except AssertionError as err:
            self.problems.append(f"after step {snapshot.step}: {err}")
        problem = lora_problem(self.engine)
        if problem:
            self.problems.append(f"after step {snapshot.step}: LoRA: {problem}")
        for out in outputs:
            seen = self.outputs.setdefault(out.request_id, [])
            problem = extension_problem(seen[-1] if seen else None, out)
            if problem:
                self.problems.append(f"request {out.request_id}, output {len(seen)}: {problem}")
            seen.append(out)

    def final(self, request_id: str) -> RequestOutput:
        """The request's finished output (every request the engine saw must have one by the end)."""
        seen = self.outputs.get(request_id)
        assert seen and seen[-1].finished, f"request {request_id} never finished ({len(seen or [])} outputs)"
        return seen[-1]

    def check_all_ended(self) -> None:
        assert not self.problems, "\n".join(self.problems[:10])
        for request_id in self.outputs:
            self.final(request_id)


async def until_step(llm: AsyncLLM, step: int) -> None:
    """Return once the engine has taken `step` steps, or at once when no request is in flight or queued (an idle
    engine takes no steps). Polls: the caller may live on another event loop than the engine's (HTTP clients)."""
    while llm.engine.num_steps < step and (llm.num_in_flight or llm._pending_adds):
        await asyncio.sleep(POLL)


async def gather_clients(tasks: list[asyncio.Future]) -> list:
    """Every task's result, None for a task that was cancelled (a client that was told to leave so); the first
    other exception is raised, once all tasks are done (none is left running behind the failure)."""
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
    return [None if isinstance(result, BaseException) else result for result in results]


def check_partial(reference: Reference, rid: str, req: Request, tokens: list[int], kv_dtype: str = "auto",
                  poison: str | None = None) -> None:
    """The tokens of a request that ended early (aborted, or its client left) are the start of its run alone,
    or part from it only at a greedy tie (Reference.parts_at_a_tie; FP8_TOL with an fp8 KV cache)."""
    expected = reference.run(req, kv_dtype, poison)[0]
    tie = TIE if kv_dtype == "auto" else FP8_TOL
    if tokens != expected[:len(tokens)] and not reference.parts_at_a_tie(req, tokens, expected, tie):
        raise AssertionError(f"request {rid} {req}: ended early with {tokens}, alone {expected}")


async def settle(llm: AsyncLLM, timeout: float = 60.0) -> None:
    """Wait until every stream is closed, every add and abort applied and the engine holds no request. The
    timeout only keeps a hang from hanging the test suite; it asserts nothing about speed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (llm.num_in_flight or llm._pending_adds or llm._pending_aborts
                or llm.engine.has_unfinished_requests()):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"still busy after {timeout} s: {llm.num_in_flight} streams, "
                         f"{len(llm._pending_adds)} adds and {len(llm._pending_aborts)} aborts pending, "
                         f"unfinished: {llm.engine.has_unfinished_requests()}")
