"""What vLLM's engine offers besides serving requests, a mixin of LLMEngine: run code on every worker
(collective_rpc), hand new weights to every rank (update_weights, reload_weights), give the device's memory back
between bursts of work (sleep / wake_up: minillm/engine/sleep_mode.py), forget the prefix cache, and record
profiler traces of the engine and its workers (minillm/engine/profiler.py).

The workers are in this process (UniProcExecutor: `executor.driver_worker`) or in processes of their own (tensor,
pipeline and expert parallelism: `executor.collective_rpc`; the disaggregated engine overrides _on_workers for its
prefill and decode workers). Each call runs between steps: the caller owns the engine loop (AsyncLLM runs them
through between_steps). Chapter 10 shows sleep mode in a cell; its server mounts reset_prefix_cache, sleep mode and
the profiler.
"""
from __future__ import annotations

from typing import Any, Callable

from minillm.engine.executor import call_worker
from minillm.engine.profiler import TraceRecorder, profiler_dir
from minillm.engine.sleep_mode import (SLEEP_TAGS, EngineSleepingError, SleepingTensors, SleepReport,
                                       check_sleep_level, check_wake_tags, give_back_device_memory, proposer_state)
from minillm.engine.worker import Worker


class EngineTools:
    """LLMEngine's collective_rpc, update_weights / reload_weights, sleep / wake_up, reset_prefix_cache and
    start_profile / stop_profile (a mixin: it reads the engine's executor and scheduler)."""

    _asleep: frozenset = frozenset()  # the tags (SLEEP_TAGS) whose memory sleep gave back and no wake_up took again
    _weights_discarded = False  # sleep(level=2): no step until update_weights or reload_weights loads them all
    _proposer_sleep: SleepingTensors | None = None  # the speculative proposer's state while it sleeps
    _recapture: tuple = ()  # a draft model's runner whose CUDA graphs sleep dropped: captured at the last wake_up
    _sleep_level = 0  # the level of the sleep not yet fully woken from (0: awake)

    def reset_prefix_cache(self) -> bool:
        """vLLM's: forget every cached prefix block, so that no later request reuses K/V computed before (new
        weights loaded in place, or a benchmark's cold start). Requests in flight keep their blocks. False when
        this engine caches no prefixes (enable_prefix_caching=False, static batching)."""
        block_manager = getattr(self.scheduler, "block_manager", None)
        return block_manager is not None and block_manager.reset_prefix_cache()

    def collective_rpc(self, method: str | Callable[..., Any], args: tuple = (), kwargs: dict | None = None) -> list:
        """vLLM's: call a Worker method (its name) or a function method(worker, *args, **kwargs) on every worker,
        in-process or in worker processes (there it must pickle: a module-level function); results in rank
        order. Runs between steps: the caller owns the engine loop."""
        if isinstance(method, str) and not callable(getattr(Worker, method, None)):
            raise ValueError(f"collective_rpc: Worker has no method {method!r}")
        return self._on_workers(call_worker, method, tuple(args), dict(kwargs or {}))

    def _on_workers(self, method: Callable[..., Any], *args) -> list:
        """method(worker, *args) on every worker, in rank order."""
        if self._workers_elsewhere:
            return list(self.executor.collective_rpc(method, *args))
        return [method(self.executor.driver_worker, *args)]

    @property
    def _workers_elsewhere(self) -> bool:
        """Whether the workers run in processes of their own (tensor / pipeline / expert parallelism)."""
        return hasattr(self.executor, "collective_rpc")

    # -- new weights -------------------------------------------------------------------------------------------
    def update_weights(self, weights) -> list[int]:
        """New values for the model's weights, in place, as an RL trainer sends a policy update: HF-named full
        tensors, any subset of them (all of them after sleep(level=2)), each rank keeping its shard
        (Worker.update_weights); then reset_prefix_cache, since every cached K/V came from the old weights.
        Between requests, on dense weights, without an fp8 KV cache. How many tensors each worker loaded (a
        pipeline stage only its own layers'), in rank order."""
        weights = [(name, tensor.detach()) for name, tensor in weights]  # (sent whole to worker processes)
        return self._new_weights("update_weights", (weights,))

    def reload_weights(self) -> list[int]:
        """vLLM's: every worker loads the weights again from the model's checkpoint (Worker.reload_weights), e.g.
        after sleep(level=2); then reset_prefix_cache. How many tensors each worker copied, in rank order."""
        return self._new_weights("reload_weights", ())

    def _new_weights(self, method: str, args: tuple) -> list[int]:
        self._check_idle(method)
        loaded = self._on_workers(call_worker, method, args, {})
        self._weights_discarded = False
        self.reset_prefix_cache()
        return loaded

    def _check_idle(self, what: str) -> None:
        if self.has_unfinished_requests():
            raise RuntimeError(f"{what} while {self.get_num_unfinished_requests()} request(s) run would change "
                               f"their model (or memory) under them: call it between requests")

    # -- sleep mode ---------------------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> list[SleepReport]:
        """vLLM's: give the device's memory back between bursts of work (minillm/engine/sleep_mode.py). Level 1
        keeps the weights in host memory and drops the KV pool; level 2 drops both (reload them after wake_up).
        The prefix cache is reset (its blocks go with the pool), but not its CPU tier (kv_offloading_size):
        after wake_up, prompts find their prefixes there, until new weights reset it. Between requests only;
        requests are refused (EngineSleepingError) until wake_up. What each worker freed, in rank order."""
        check_sleep_level(level)
        if self._asleep:
            raise RuntimeError(f"the engine sleeps already ({', '.join(sorted(self._asleep))}): wake_up() first")
        self._check_idle("sleep")
        block_manager = getattr(self.scheduler, "block_manager", None)
        if block_manager is not None:  # the pool's blocks go; the CPU tier's host copies stay valid (same weights:
            block_manager.reset_prefix_cache(keep_offloaded=True)  # new ones reset it, update/reload_weights)
        else:
            self.reset_prefix_cache()
        self._asleep = frozenset(SLEEP_TAGS)
        try:
            reports = self._on_workers(call_worker, "sleep", (level,), {})
            if getattr(self, "speculative", None) is not None:  # after the workers: see proposer_state
                reports[0] = self._sleep_proposer(reports[0])
        except BaseException:
            self.wake_up()  # whatever slept wakes again: the engine stays usable
            raise
        self._weights_discarded = self._weights_discarded or level == 2
        self._sleep_level = level
        return reports

    def _sleep_proposer(self, report: SleepReport) -> SleepReport:
        """Put the speculative proposer's own state to sleep in this process (a draft model and its KV pool, the
        heads; kept in host memory at both levels, since reload_weights reloads the target only); its graphs
        dropped first. Counted in the first worker's report."""
        for holder in proposer_state(self.speculative, self.device).graph_holders:
            if holder.release_graphs() and callable(getattr(holder, "configure", None)):
                self._recapture = (*self._recapture, holder)  # a draft runner: at wake_up
        state = proposer_state(self.speculative, self.device)  # (without the graphs' static buffers now)
        self._proposer_sleep = SleepingTensors()
        weights = self._proposer_sleep.put_to_sleep("weights", state.tensors)
        pools = self._proposer_sleep.put_to_sleep("kv_cache", (), drop=state.kv_pools)
        give_back_device_memory(self.device)
        return SleepReport(report.freed_bytes + weights.freed_bytes + pools.freed_bytes,
                           report.host_bytes + weights.host_bytes)

    def wake_up(self, tags=None) -> None:
        """vLLM's: take the memory of `tags` ("weights", "kv_cache"; None: both) again. An RL loop wakes the
        weights, loads the new ones (update_weights), then wakes the KV cache, so the two never peak together.
        The CUDA graphs are captured again when the last tag wakes."""
        tags = check_wake_tags(tags)
        self._on_workers(call_worker, "wake_up", (tags,), {})
        proposer = self._proposer_sleep
        for tag in tags if proposer is not None else ():
            proposer.wake(tag)
        self._asleep = self._asleep - set(tags)
        if not self._asleep:
            for runner in self._recapture:  # a draft model's runner: its graphs again
                runner.configure(runner.engine_config)
            self._recapture, self._proposer_sleep, self._sleep_level = (), None, 0

    def is_sleeping(self) -> bool:
        """Whether any of the engine's memory sleeps (vLLM's is_sleeping)."""
        return bool(self._asleep)

    @property
    def sleep_state(self) -> str:
        """vLLM's metric label: "awake", "weights_offloaded" (level 1) or "discard_all" (level 2), the latter
        two until every tag is awake again."""
        return ("awake", "weights_offloaded", "discard_all")[self._sleep_level]

    def check_awake(self) -> None:
        """Raise EngineSleepingError unless a request can run now: nothing sleeps, and weights dropped by
        sleep(level=2) were loaded again."""
        if self._asleep:
            raise EngineSleepingError(f"the engine is asleep ({', '.join(sorted(self._asleep))}): wake_up() "
                                      f"before sending requests")
        if self._weights_discarded:
            raise EngineSleepingError("sleep(level=2) dropped the weights: load them with update_weights (all of "
                                      "them) or reload_weights before sending requests")

    def start_profile(self, profile_dir: str | None = None) -> None:
        """vLLM's: record a torch.profiler trace of this process and of every worker process until stop_profile
        (minillm/engine/profiler.py; profile_dir, else MINILLM_TORCH_PROFILER_DIR / VLLM_TORCH_PROFILER_DIR)."""
        directory = profiler_dir(profile_dir)
        if getattr(self, "_tracer", None) is None:
            self._tracer = TraceRecorder("engine")
        self._tracer.start(directory)
        try:
            self._worker_profiles("start_profile", directory)
        except BaseException:
            self._tracer.stop()
            raise

    def stop_profile(self) -> list[str]:
        """Write the traces start_profile began; their paths (this process's first)."""
        if getattr(self, "_tracer", None) is None:
            raise RuntimeError("no profile is being recorded: start_profile() first")
        paths = [self._tracer.stop()]
        return paths + [p for p in self._worker_profiles("stop_profile") if p]

    def _worker_profiles(self, method: str, *args) -> list:
        """`method` on every worker process (an in-process worker is inside this process's own trace)."""
        return self._on_workers(call_worker, method, args, {}) if self._workers_elsewhere else []
