"""What vLLM's engine offers besides serving requests, a mixin of LLMEngine: run code on every worker
(collective_rpc, which LLM.update_weights uses to hand new weights to every rank), forget the prefix cache, and
record profiler traces of the engine and its workers (minillm/engine/profiler.py).

The workers are in this process (UniProcExecutor: `executor.driver_worker`) or in processes of their own (tensor,
pipeline and expert parallelism: `executor.collective_rpc`; the disaggregated engine overrides _on_workers for its
prefill and decode workers). Each call runs between steps: the caller owns the engine loop (AsyncLLM runs them
through between_steps). No chapter builds these; chapter 10's server mounts reset_prefix_cache and the profiler.
"""
from __future__ import annotations

from typing import Any, Callable

from minillm.engine.executor import call_worker
from minillm.engine.profiler import TraceRecorder, profiler_dir
from minillm.engine.worker import Worker


class EngineTools:
    """LLMEngine's collective_rpc, reset_prefix_cache and start_profile / stop_profile (a mixin: it reads the
    engine's executor and scheduler)."""

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
