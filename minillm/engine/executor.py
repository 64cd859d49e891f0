"""Executors: how the engine reaches its workers, in this process or in others (vLLM's executor idea).

    UniProcExecutor    one Worker in the engine's own process: a method call per step (the default)
    MultiProcExecutor  Workers in child processes, reached over torch.distributed: each step the engine
                       broadcasts (method, args) to every rank and gathers the results. gloo on a CPU, NCCL
                       for the tensors of tensor/pipeline parallelism later; the control messages here are
                       small pickled objects (a StepInput is plain lists), as vLLM's are.

Both offer the same four calls the engine makes (load happens at construction):
    determine_num_gpu_blocks() -> int      the smallest pool any worker can hold
    initialize_cache(cache_config)
    execute_model(step_input) -> StepOutput (rank 1's, the driver worker's)
    shutdown()

A worker's exception does not kill its process: it comes back as a WorkerError, which the engine turns into
"error" outputs for that step's requests (the same isolation as an exception in-process).
Learner overrides (minillm.hooks) are a ContextVar of the engine's process: a worker in another process runs
the reference code, so LLM(..., overrides=...) keeps the in-process executor.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import socket
import traceback
from typing import Any

import torch.distributed as dist

from minillm.engine.cache_config import CacheConfig
from minillm.engine.step_input import StepInput, StepOutput
from minillm.engine.worker import Worker

_TIMEOUT = datetime.timedelta(minutes=10)


class WorkerError(RuntimeError):
    """An exception raised inside a worker, with its message (and, for a remote worker, its traceback)."""


class UniProcExecutor:
    def __init__(self, worker: Worker) -> None:
        self.driver_worker = worker
        worker.load_model()

    def determine_num_gpu_blocks(self) -> int:
        return self.driver_worker.determine_num_gpu_blocks()

    def initialize_cache(self, cache_config: CacheConfig) -> None:
        self.driver_worker.initialize_cache(cache_config)

    def execute_model(self, step: StepInput) -> StepOutput:
        return self.driver_worker.execute_model(step)

    def shutdown(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, worker_kwargs: dict[str, Any]) -> None:
    """A child process: join the group, build the worker, then serve (method, args) messages until 'shutdown'."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=_TIMEOUT)
    worker = None
    try:
        worker = Worker(**worker_kwargs)
        result: Any = None
        try:
            worker.load_model()
        except Exception as err:  # reported at the first gather, so the engine fails with the cause
            result = WorkerError(f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
        dist.gather_object(result, None, dst=0)
        while True:
            message = [None]
            dist.broadcast_object_list(message, src=0)
            method, args = message[0]
            if method == "shutdown":
                return
            try:
                result = getattr(worker, method)(*args)
            except Exception as err:
                result = WorkerError(f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}")
            dist.gather_object(result, None, dst=0)
    finally:
        dist.destroy_process_group()


class MultiProcExecutor:
    """Workers in `num_workers` child processes (ranks 1..num_workers; the engine is rank 0 and holds no model).
    `worker_kwargs` are Worker's arguments and must be picklable (a CheckpointSource, not a PrebuiltModel)."""

    def __init__(self, worker_kwargs: dict[str, Any], num_workers: int = 1) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.world_size = num_workers + 1
        port = _free_port()
        context = mp.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
        self.processes = [context.Process(target=_worker_main, args=(rank, self.world_size, port, worker_kwargs),
                                          daemon=True) for rank in range(1, self.world_size)]
        for process in self.processes:
            process.start()
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=self.world_size, timeout=_TIMEOUT)
        self._closed = False
        self._gather()  # every worker has loaded its model (or failed: raised here)

    def _gather(self) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        dist.gather_object(None, results, dst=0)
        for result in results[1:]:
            if isinstance(result, WorkerError):
                raise result
        return results[1:]

    def _call(self, method: str, *args: Any) -> list[Any]:
        if self._closed:
            raise RuntimeError("this executor has been shut down")
        dist.broadcast_object_list([(method, args)], src=0)
        return self._gather()

    def determine_num_gpu_blocks(self) -> int:
        return min(self._call("determine_num_gpu_blocks"))

    def initialize_cache(self, cache_config: CacheConfig) -> None:
        self._call("initialize_cache", cache_config)

    def execute_model(self, step: StepInput) -> StepOutput:
        return self._call("execute_model", step)[0]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        dist.broadcast_object_list([("shutdown", ())], src=0)
        dist.destroy_process_group()
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
