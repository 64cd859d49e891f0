"""AsyncLLM: one background loop steps the engine while any number of coroutines stream from it (chapter 10).

A server handles hundreds of requests at once, each in its own coroutine, but the engine is one object with
one scheduler that is not thread-safe. vLLM's answer (AsyncLLMEngine) is kept here in its simplest form:

    coroutine A --add--> pending adds  \\                       / per-request queue --> coroutine A
    coroutine B --add--> pending adds   >  the engine loop ----<  per-request queue --> coroutine B
    coroutine C --abort-> pending aborts/   (one asyncio task)   \\ snapshot, step listeners (metrics, playground)

The engine loop is the only code that touches the engine. Between two steps, on the event-loop thread, it
applies the queued adds and aborts; then it runs `engine.step()` in one dedicated worker thread (so the event
loop keeps serving HTTP while the model computes) and, when the step returns, hands each RequestOutput to
its request's queue. Because adds, aborts and the snapshot of the scheduler all happen while no step is in
flight, no two threads ever touch the scheduler at once, and no lock is needed.

Cancellation: a coroutine that stops listening (its client disconnected, its task was cancelled, it broke out
of the `async for`) closes its generator; the generator's `finally` queues an abort, and the loop frees the
request's KV blocks before the next step, i.e. as soon as the step in flight (if any) ends.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from minillm.engine.prefix_cache import check_cache_salt
from minillm.engine.sleep_mode import EngineSleepingError
from minillm.outputs import RequestOutput
from minillm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop is not running (never started, shut down, or crashed)."""


@dataclass
class SeqView:
    """One sequence as the playground and /metrics see it (plain values, safe to read from any thread)."""

    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    blocks: list[int] = field(default_factory=list)  # its device block table (running sequences only)
    lora_name: str | None = None  # the LoRA adapter it runs with (None: the base model)


@dataclass
class EngineSnapshot:
    """The engine's state after a step, copied on the loop so that other code never reads the live scheduler."""

    step: int = 0
    time: float = 0.0
    running: list[SeqView] = field(default_factory=list)
    waiting: list[SeqView] = field(default_factory=list)
    swapped: list[SeqView] = field(default_factory=list)
    num_blocks: int = 0
    num_free_blocks: int = 0
    block_size: int = 0
    batch: list[dict[str, Any]] = field(default_factory=list)  # this step: request_id, num_tokens, prefill
    num_preemptions: int = 0
    prefix_cache_hits: int = 0  # prompt tokens served from the prefix cache
    prefix_cache_queries: int = 0  # prompt tokens looked up
    offload_hits: int = 0  # of prefix_cache_hits, tokens loaded back from the CPU tier (kv_offloading_size)
    offload_stores: int = 0  # blocks the CPU tier stored (copied out) / loaded (copied back) / evicted, since start
    offload_loads: int = 0
    offload_evictions: int = 0
    offload_used_blocks: int = 0  # host blocks holding a stored block now

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks


def take_snapshot(engine: Any, seq_to_request: dict[int, str] | None = None, stepped: bool = False) -> EngineSnapshot:
    """Copy what a viewer needs out of the engine's scheduler. Call only while no step is running."""
    scheduler = engine.scheduler
    bm = getattr(scheduler, "block_manager", None)  # None for the static scheduler's contiguous slots

    def views(queue: Any, with_blocks: bool) -> list[SeqView]:
        return [SeqView(s.request_id, s.num_prompt_tokens, s.num_output_tokens,
                        list(s.block_table) if with_blocks else [],
                        getattr(getattr(s, "lora_request", None), "lora_name", None)) for s in queue]

    snap = EngineSnapshot(step=engine.num_steps, time=time.time(),
                          running=views(getattr(scheduler, "running", []), bm is not None),
                          waiting=views(getattr(scheduler, "waiting", []), False),
                          swapped=views(getattr(scheduler, "swapped", []), False),
                          num_preemptions=getattr(scheduler, "num_preemptions", 0))
    if bm is not None:
        snap.num_blocks, snap.num_free_blocks, snap.block_size = bm.num_blocks, bm.num_free_blocks, bm.block_size
        snap.prefix_cache_hits, snap.prefix_cache_queries = bm.prefix_cache_hits, bm.prefix_cache_queries
        tier = getattr(bm, "offload", None)
        if tier is not None:
            snap.offload_hits, snap.offload_used_blocks = bm.offload_hits, tier.num_stored
            snap.offload_stores, snap.offload_loads, snap.offload_evictions = tier.stores, tier.loads, tier.evictions
    timeline = getattr(scheduler, "timeline", None)
    if stepped and timeline and seq_to_request is not None:
        record = timeline[-1]
        prefill = set(record.prefill_ids)
        snap.batch = [{"request_id": seq_to_request.get(seq_id, str(seq_id)), "num_tokens": n,
                       "prefill": seq_id in prefill} for seq_id, n in record.scheduled]
    return snap


StepListener = Callable[[list[RequestOutput], EngineSnapshot], None]


class AsyncLLM:
    """Drive an LLMEngine from asyncio. Build it from an engine (or `AsyncLLM.from_llm(LLM(...))`), then inside
    a running event loop `await start()`, stream with `async for out in generate(...)`, `await shutdown()`."""

    def __init__(self, engine: Any) -> None:
        for name in ("add_request", "step", "abort", "has_unfinished_requests", "validate_prompt"):
            if not callable(getattr(engine, name, None)):
                raise TypeError(f"AsyncLLM needs an LLMEngine (with {name}()), got {type(engine).__name__}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending_adds: deque[tuple] = deque()
        self._pending_aborts: deque[str] = deque()
        self._pending_calls: deque[tuple[Callable[[], Any], asyncio.Future]] = deque()  # run between two steps
        self._listeners: list[StepListener] = []
        self._counter = itertools.count()
        self._snapshot = take_snapshot(engine)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._stopping = False
        self.accepting = False  # False before start() and once shutdown() began: new requests are refused
        self._paused = False  # pause_generation: new requests wait in _pending_adds until resume_generation
        self._drained: asyncio.Event | None = None  # set by the loop whenever the engine has nothing unfinished

    @classmethod
    def from_llm(cls, llm: Any) -> "AsyncLLM":
        return cls(llm.llm_engine)

    # -- life cycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the engine loop on the running event loop."""
        if self._task is not None:
            raise RuntimeError("AsyncLLM.start() was already called")
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="minillm-engine")
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run_loop(), name="minillm-engine-loop")
        self.accepting = True

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Refuse new requests; let the in-flight ones finish for up to `timeout` seconds; abort the rest (their
        blocks are freed and their streams end with finish_reason "abort"); stop the loop and its thread."""
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and self.is_running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for request_id in list(self._streams):
            self._queue_abort(request_id, notify=True)
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:  # already logged by the loop
                pass
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        self._task = None

    # -- requests -----------------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        """Requests some coroutine is still streaming."""
        return len(self._streams)

    def snapshot(self) -> EngineSnapshot:
        """The engine's state after the latest step (a copy: read it from anywhere)."""
        return self._snapshot

    def add_step_listener(self, listener: StepListener) -> None:
        """Call listener(outputs, snapshot) on the event loop after every step (and after aborts)."""
        self._listeners.append(listener)

    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, prompt_token_ids: list[int] | None = None,
                       arrival_time: float | None = None, lora_request: Any = None,
                       pooling_params: Any = None, cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queue one request and yield its cumulative RequestOutput after every step it took part in, the last
        one with `finished=True`. Leaving the `async for` early (or being cancelled) aborts the request.
        Bad prompts, bad sampling params (a value assigned after construction included) and a bad
        `lora_request` (a minillm.lora.LoRARequest: the adapter this request runs with; needs enable_lora=True)
        raise ValueError/TypeError here, before anything is queued. `pooling_params` (minillm.pooling.PoolingParams,
        instead of sampling_params): an embedding request, its one output's `embedding` the vector. `cache_salt`
        (a non-empty string): prefix-cache blocks shared only with requests of the same salt (vLLM's)."""
        if not self.accepting or not self.is_running:
            raise EngineDeadError("the engine is not accepting requests (not started, or shutting down)")
        if not self._paused:  # (paused, a request waits for resume_generation, by which time the engine woke)
            self.engine.check_awake()  # (and on the loop again: a sleep queued before this add is applied first)
        if pooling_params is not None:
            sampling_params = self.engine.embedding_sampling_params(pooling_params, sampling_params)
        if sampling_params is None:
            sampling_params = SamplingParams()
        elif not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        else:  # checked now (add_request checks it again on the loop, where an error could only end the stream)
            sampling_params = sampling_params.checked_copy()
        self.engine.check_sampling_params(sampling_params, pooling=pooling_params is not None)
        check_cache_salt(cache_salt)
        if prompt_token_ids is None:  # reads only the tokenizer and config: safe beside a running step
            text, prompt_token_ids = self.engine.validate_prompt(prompt, sampling_params.truncate_prompt_tokens)
            if not isinstance(prompt, torch.Tensor):  # (an embeddings prompt goes on as the tensor)
                prompt = text if text is not None else prompt_token_ids
        if lora_request is not None:
            # the first request naming an adapter reads it from disk (milliseconds to seconds): in a thread, so the
            # event loop keeps streaming every other request; later ones find it in the adapter cache. The engine
            # may be mid-step meanwhile: the check reads only the adapter cache (locked) and the model's shape
            await asyncio.to_thread(self.engine.check_lora_request, lora_request)
            if not self.accepting or not self.is_running:  # shut down while the adapter was read
                raise EngineDeadError("the engine is not accepting requests (not started, or shutting down)")
        request_id = f"async-{next(self._counter)}" if request_id is None else str(request_id)
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        arrival = time.perf_counter() if arrival_time is None else arrival_time
        self._pending_adds.append((request_id, prompt, sampling_params, arrival, list(prompt_token_ids),
                                   lora_request, pooling_params, cache_salt))
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer left early: free the request's blocks before the next step
                self._queue_abort(request_id, notify=False)

    async def abort(self, request_id: str) -> None:
        """Abort a request (its stream ends with finish_reason "abort")."""
        self._queue_abort(str(request_id), notify=True)

    def _queue_abort(self, request_id: str, notify: bool) -> None:
        queue = self._streams.get(request_id) if notify else self._streams.pop(request_id, None)
        if queue is None and notify:
            return
        self._pending_aborts.append(request_id)
        if self._wake is not None:
            self._wake.set()

    async def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prefix block (LLMEngine.reset_prefix_cache), between two steps."""
        return await self.between_steps(self.engine.reset_prefix_cache)

    async def collective_rpc(self, method: Any, args: tuple = (), kwargs: dict | None = None) -> list:
        """vLLM's: LLMEngine.collective_rpc on every worker, between two steps."""
        return await self.between_steps(lambda: self.engine.collective_rpc(method, args, kwargs))

    async def pause_generation(self, mode: str = "wait") -> None:
        """vLLM's, for RL loops: stop taking new requests into the engine and return once it is idle, so that
        sleep, update_weights or reload_weights can run. mode "wait" lets the requests in the engine finish;
        "abort" aborts them (their streams end with finish_reason "abort"). Requests sent while paused wait,
        unanswered but not refused, until resume_generation."""
        if mode not in ("wait", "abort"):
            raise ValueError(f"pause mode must be 'wait' (let running requests finish) or 'abort', got {mode!r}")
        if not self.is_running:
            raise EngineDeadError("the engine loop is not running: nothing to pause")
        self._paused = True
        if mode == "abort":
            queued = {add[0] for add in self._pending_adds}
            for request_id in [r for r in self._streams if r not in queued]:
                self._queue_abort(request_id, notify=True)
        while True:
            self._drained.clear()
            self._wake.set()
            await self._drained.wait()
            if not self.engine.has_unfinished_requests() and not self._pending_aborts:
                return

    async def resume_generation(self) -> None:
        """Take the requests that waited during the pause (and new ones) into the engine again."""
        self._paused = False
        if self._wake is not None:
            self._wake.set()

    @property
    def is_paused(self) -> bool:
        return self._paused

    async def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode (LLMEngine.sleep), between two steps; refused while requests run."""
        await self.between_steps(lambda: self.engine.sleep(level))

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self.between_steps(lambda: self.engine.wake_up(tags))

    async def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    async def update_weights(self, weights: Any) -> list[int]:
        """LLMEngine.update_weights between two steps (refused while requests run)."""
        return await self.between_steps(lambda: self.engine.update_weights(weights))

    async def reload_weights(self) -> list[int]:
        return await self.between_steps(self.engine.reload_weights)

    async def start_profile(self, profile_dir: str | None = None) -> None:
        """vLLM's: torch.profiler traces of the engine and its workers until stop_profile (engine/profiler.py)."""
        await self.between_steps(lambda: self.engine.start_profile(profile_dir))

    async def stop_profile(self) -> list[str]:
        """Write the traces (paths: this process's first); the writing runs between two steps."""
        return await self.between_steps(self.engine.stop_profile)

    async def between_steps(self, call: Callable[[], Any]) -> Any:
        """call() on the engine where no step is running (the loop runs it before its next step); its result."""
        if self._task is None or self._task.done():  # no loop: nothing steps the engine but the caller
            return call()
        future = asyncio.get_running_loop().create_future()
        self._pending_calls.append((call, future))
        self._wake.set()
        return await future

    # -- the loop -----------------------------------------------------------------------------------------
    async def _run_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            changed = self._apply_pending()
            if self._stopping:
                break
            if not self.engine.has_unfinished_requests():
                if changed:
                    self._publish([], take_snapshot(self.engine))
                self._drained.set()  # (pause_generation waits for it)
                await self._wake.wait()
                continue
            scheduler = self.engine.scheduler
            seq_to_request = {s.seq_id: s.request_id for q in (getattr(scheduler, "waiting", ()),
                              getattr(scheduler, "running", ()), getattr(scheduler, "swapped", ())) for s in q}
            steps_before = self.engine.num_steps
            try:
                outputs = await loop.run_in_executor(self._thread, self.engine.step)
            except Exception as err:  # the engine isolates bad requests itself; this is a bug: fail them all
                logger.exception("engine step raised; failing every in-flight request")
                for request_id, queue in list(self._streams.items()):
                    queue.put_nowait(RuntimeError(f"engine step failed: {type(err).__name__}: {err}"))
                    self._pending_aborts.append(request_id)
                    del self._streams[request_id]
                continue
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        del self._streams[out.request_id]
            self._publish(outputs, take_snapshot(self.engine, seq_to_request, self.engine.num_steps > steps_before))
            await asyncio.sleep(0)  # let the streams run before the next step
        self._apply_pending()

    def _apply_pending(self) -> bool:
        """Adds, aborts and calls queued since the last step; runs on the loop while no step is in flight."""
        while self._pending_calls:
            call, future = self._pending_calls.popleft()
            try:
                result = call()
            except Exception as err:  # the caller's error, not the loop's
                if not future.done():  # (a caller that gave up cancelled it)
                    future.set_exception(err)
            else:
                if not future.done():
                    future.set_result(result)
        changed = bool(self._pending_adds or self._pending_aborts)
        aborted = set(self._pending_aborts)
        outputs = []
        waiting = deque()  # paused: the adds that wait for resume_generation
        while self._pending_adds:
            # a request cancelled before it reached the engine is added and aborted below: one path for both
            if self._paused and self._pending_adds[0][0] not in aborted:
                waiting.append(self._pending_adds.popleft())
                continue
            request_id, prompt, params, arrival, token_ids, lora_request, pooling, salt = self._pending_adds.popleft()
            try:
                self.engine.add_request(request_id, prompt, None if pooling is not None else params,
                                        arrival_time=arrival, prompt_token_ids=token_ids if isinstance(prompt, str)
                                        else None, lora_request=lora_request, pooling_params=pooling,
                                        cache_salt=salt)
            except (ValueError, TypeError, EngineSleepingError) as err:
                self._finish_stream(request_id, err)
        self._pending_adds.extend(waiting)
        self._pending_aborts.clear()
        for request_id in aborted:
            out = self.engine.abort(request_id)
            if out is not None:
                outputs.append(out)
                self._finish_stream(request_id, out)
        if outputs:
            self._publish(outputs, take_snapshot(self.engine))
            changed = False
        return changed

    def _finish_stream(self, request_id: str, item: Any) -> None:
        queue = self._streams.pop(request_id, None)
        if queue is not None and item is not None:
            queue.put_nowait(item)

    def _publish(self, outputs: list[RequestOutput], snapshot: EngineSnapshot) -> None:
        self._snapshot = snapshot
        for listener in self._listeners:
            try:
                listener(outputs, snapshot)
            except Exception:  # a broken viewer must not stop the engine
                logger.exception("step listener %r failed", listener)
