"""Executors: how the engine reaches its workers, in this process or in others (vLLM's executor idea).

    UniProcExecutor    one Worker in the engine's own process: a method call per step (the default)
    MultiProcExecutor  Workers in child processes, reached over torch.distributed: each step the engine
                       broadcasts (method, args) to every rank and gathers the results. gloo on a CPU, NCCL
                       for the tensors of tensor/pipeline parallelism later; the control messages here are
                       small pickled objects (a StepInput is plain lists), as vLLM's are.

Both offer the same four calls the engine makes (load happens at construction):
    determine_num_gpu_blocks() -> int      the smallest pool any worker can hold
    initialize_cache(cache_config)
    execute_model(step_input) -> StepOutput (the driver worker's: rank 1, or the sampling rank of a parallel group)
    shutdown()
The in-process one also splits a step in two for async scheduling (minillm/engine/async_step.py):
launch_model(step_input) queues it on the device and returns, collect_model(launched) waits for its tokens. The
child-process executor has no such split: an engine with async_scheduling=True runs it step by step.

Tensor and pipeline parallelism (chapter 11): with EngineConfig.tensor_parallel_size * pipeline_parallel_size
= N > 1 the executor starts N workers and builds their TP groups (minillm.parallel.state) before they load their
shards; every rank gets every step, and only the sampling rank answers with tokens. EngineConfig.expert_parallel_size
= N > 1 (an MoE model) starts N workers the same way, each with its share of the experts (minillm.parallel.expert).
A worker process that dies (killed, out of memory) makes the engine's next call raise a RuntimeError naming its
rank, instead of waiting in a collective for a peer that will never come. So does a rank that fails alone where
its tensor-parallel peers do not (out of memory on one GPU, a fault on one device): over gloo the peers wait in
the layer's all-reduce for a partner that has left, over NCCL their queued collectives no longer pair up with the
failed rank's next ones. A failing worker writes its error to the rendezvous store at once; a watchdog thread of
the engine kills the group when the call has not come back PEER_FAILURE_GRACE_S later, and a forward that failed
on some ranks of a TP group but not on all of them ends the group too (WorkerError.in_forward).

A worker's exception does not kill its process: it comes back as a WorkerError, which the engine turns into
"error" outputs for that step's requests (the same isolation as an exception in-process) when every rank failed
alike (a bad token id fails every rank's embedding) or the failure was outside the collectives.
Learner overrides (minillm.hooks) are a ContextVar of the engine's process: a worker in another process runs
the reference code, so LLM(..., overrides=...) keeps the in-process executor.
"""
from __future__ import annotations

import datetime
import functools
import multiprocessing as mp
import os
import socket
import threading
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from minillm.engine.cache_config import CacheConfig
from minillm.engine.step_input import StepInput, StepOutput
from minillm.engine.worker import Worker
from minillm.parallel.expert import check_expert_parallel_config
from minillm.parallel.state import build_groups, init_parallel_state
from minillm.parallel.weights import check_parallel_config

_TIMEOUT = datetime.timedelta(minutes=10)
_JOINED = "minillm_workers_joined"  # a counter in the rendezvous store
_FAILED = "minillm_worker_failed"  # + "/<call number>": a worker's error, written the moment it happens
PEER_FAILURE_GRACE_S = 30.0  # a call still out this long after a rank reported its failure: its peers are stuck
_WATCH_INTERVAL_S = 0.25


class WorkerError(RuntimeError):
    """An exception raised inside a worker, with its message (and, for a remote worker, its traceback).
    `in_forward`: it was raised inside a parallel forward, between collectives (minillm.parallel.runner's
    ForwardFailed), so the rank's tensor-parallel peers are safe only if they failed there too."""

    def __init__(self, message: str, rank: int | None = None, in_forward: bool = False) -> None:
        super().__init__(message)
        self.rank, self.in_forward = rank, in_forward

    def __reduce__(self):  # pickled to rank 0 with its fields (an exception pickles only its args by default)
        return type(self), (str(self), self.rank, self.in_forward)


def worker_error(rank: int, err: BaseException) -> WorkerError:
    """The report of `err`, raised in rank `rank`'s worker, for the engine."""
    return WorkerError(f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}", rank,
                       in_forward=getattr(err, "in_forward", False))


def tp_group_ranks(tp: int, pp: int, first_rank: int) -> list[list[int]]:
    """The global ranks of each pipeline stage's tensor-parallel group, as build_groups lays them out (none
    without tensor parallelism: nothing to keep in step)."""
    return [[first_rank + stage * tp + t for t in range(tp)] for stage in range(pp)] if tp > 1 else []


def desynchronised(errors: dict[int, WorkerError], tp_groups: list[list[int]]) -> str | None:
    """Why a group whose ranks answered with `errors` ({rank: error}) cannot run another step, or None: a rank
    that failed inside the forward while a tensor-parallel peer of its did not (the peer went through collectives
    the failed rank never joined). Pipeline stages keep in step past a failed micro-batch by themselves."""
    for ranks in tp_groups:
        failed = [r for r in ranks if r in errors and errors[r].in_forward]
        went_on = [r for r in ranks if r not in errors or not errors[r].in_forward]
        if failed and went_on:
            return (f"rank {failed[0]} failed inside the forward while rank {went_on[0]} of its tensor-parallel "
                    f"group did not (their collectives no longer pair up): {errors[failed[0]]}")
    return None


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

    @property
    def can_launch(self) -> bool:
        """launch_model / collect_model work (async scheduling): the in-process worker's plain runner."""
        return self.driver_worker.can_launch

    def launch_model(self, step: StepInput):
        """Queue a step on the worker's device and return at once (async scheduling, engine/async_step.py)."""
        return self.driver_worker.launch_model(step)

    def collect_model(self, launched) -> StepOutput:
        """Wait for a launched step's tokens: its StepOutput."""
        return self.driver_worker.collect_model(launched)

    def shutdown(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parallel_sizes(worker_kwargs: dict[str, Any]) -> tuple[int, int]:
    config = worker_kwargs.get("engine_config")
    return getattr(config, "tensor_parallel_size", 1), getattr(config, "pipeline_parallel_size", 1)


def _expert_parallel_size(worker_kwargs: dict[str, Any]) -> int:
    return getattr(worker_kwargs.get("engine_config"), "expert_parallel_size", 1)


def _tensor_backend(worker_kwargs: dict[str, Any]) -> str | None:
    """NCCL for the activations of GPU workers (the control messages stay on the default gloo group)."""
    tp, pp = _parallel_sizes(worker_kwargs)
    ranks = tp * pp * _expert_parallel_size(worker_kwargs)
    return "nccl" if ranks > 1 and torch.device(worker_kwargs["device"]).type == "cuda" else None


def _worker_main(rank: int, world_size: int, port: int, worker_kwargs: dict[str, Any]) -> None:
    """A child process: join the group, build the worker, then serve (method, args) messages until 'shutdown'."""
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=_TIMEOUT)
    store.add(_JOINED, 1)  # the engine counts these while it watches for a worker that died on the way
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=_TIMEOUT)
    tp, pp = _parallel_sizes(worker_kwargs)
    ep = _expert_parallel_size(worker_kwargs)
    backend = _tensor_backend(worker_kwargs)
    if backend == "nccl":  # one GPU per rank
        device = torch.device("cuda", (rank - 1) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        worker_kwargs = {**worker_kwargs, "device": device}
    if tp * pp * ep > 1:  # before the model is built: its layers take their shard from this state
        init_parallel_state(build_groups(tp, pp, first_rank=1, backend=backend, ep_size=ep))
    if torch.device(worker_kwargs["device"]).type == "cpu":  # share the cores: oversubscribed ranks stall each
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (world_size - 1)))  # other's collectives
    try:
        serve_worker(rank, worker_kwargs, report_failure=lambda call, text: store.set(f"{_FAILED}/{call}", text))
    finally:
        dist.destroy_process_group()


def call_worker(worker: Any, method: str | Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """worker.method(*args, **kwargs), or method(worker, *args, **kwargs) for a function: what collective_rpc
    runs on each worker (a module-level function, so that it pickles to worker processes)."""
    call = getattr(worker, method) if isinstance(method, str) else functools.partial(method, worker)
    return call(*args, **kwargs)


def serve_worker(rank: int, worker_kwargs: dict[str, Any], group: Any = None,
                 report_failure: Callable[[int, str], None] | None = None) -> None:
    """Build and load a Worker, report to rank 0, then run the (method, args) it broadcasts until 'shutdown':
    `method` names a Worker method, or is a picklable function called as method(worker, *args). The process
    group (and any parallel state) must be up; the torchrun entry runs this too, with `group` a gloo group for
    these control messages (its default group is NCCL, where every object collective goes through GPU memory and
    synchronises). `report_failure(call_number, message)` is told of a failure before this rank waits in the
    gather (where its peers may never arrive: the engine's watchdog reads it)."""
    worker = Worker(**worker_kwargs)
    result: Any = None
    try:
        worker.load_model()
    except Exception as err:  # reported at the first gather, so the engine fails with the cause
        result = worker_error(rank, err)
    dist.gather_object(result, None, dst=0, group=group)
    call_number = 0
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=group)
        method, args = message[0]
        if method == "shutdown":
            return
        call_number += 1
        try:
            result = method(worker, *args) if callable(method) else getattr(worker, method)(*args)
        except Exception as err:
            result = worker_error(rank, err)
            if report_failure is not None:
                report_failure(call_number, str(result).split("\n")[0])
        dist.gather_object(result, None, dst=0, group=group)


class MultiProcExecutor:
    """Workers in `num_workers` child processes (ranks 1..num_workers; the engine is rank 0 and holds no model).
    `worker_kwargs` are Worker's arguments and must be picklable (a CheckpointSource, not a PrebuiltModel)."""

    def __init__(self, worker_kwargs: dict[str, Any], num_workers: int | None = None) -> None:
        tp, pp = _parallel_sizes(worker_kwargs)
        ep = _expert_parallel_size(worker_kwargs)  # expert parallelism (MoE): tp = pp = 1 (EngineConfig checks)
        if num_workers is None:
            num_workers = tp * pp * ep
        if num_workers < 1 or (tp * pp * ep > 1 and num_workers != tp * pp * ep):
            raise ValueError(f"num_workers must be >= 1 and equal tensor_parallel_size * pipeline_parallel_size * "
                             f"expert_parallel_size ({tp} * {pp} * {ep}) when any is > 1, got {num_workers}")
        if tp * pp > 1:  # a split the model cannot take fails here, not in N freshly started processes
            check_parallel_config(worker_kwargs["model_config"], tp, pp)
        check_expert_parallel_config(worker_kwargs["model_config"], ep)
        self._owns_group = False
        # the workers' tensor-parallel groups, as build_groups lays them out from rank 1 (desynchronised())
        self._tp_groups = tp_group_ranks(tp, pp, first_rank=1)  # for desynchronised()
        if dist.is_initialized():  # one default process group per process: a second would break the first engine's
            raise RuntimeError("another multi-process engine (or torch.distributed process group) is running in this "
                               "process; shut it down first (llm.llm_engine.shutdown()), or run this LLM in another "
                               "process")
        self.world_size = num_workers + 1
        port = _free_port()
        context = mp.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
        self.processes = [context.Process(target=_worker_main, args=(rank, self.world_size, port, worker_kwargs),
                                          daemon=True) for rank in range(1, self.world_size)]
        store = dist.TCPStore("127.0.0.1", port, self.world_size, is_master=True, timeout=_TIMEOUT,
                              wait_for_workers=False)
        for process in self.processes:
            process.start()
        self._closed = False
        self._broken: str | None = None
        self._calls = 0  # the workers number their calls alike: the watchdog reads _FAILED/<number>
        self._in_call = False
        self._stuck: str | None = None  # set by the watchdog when it ended the group
        while store.add(_JOINED, 0) < num_workers:  # a child that dies at start (an import error, no
            dead = self._dead_workers()  # `if __name__ == "__main__":` guard) must not leave us waiting
            if dead:
                self._closed = True
                for process in self.processes:
                    process.kill()
                raise RuntimeError(f"worker process died before joining the group: {dead}")
            time.sleep(0.05)
        try:
            dist.init_process_group("gloo", store=store, rank=0, world_size=self.world_size, timeout=_TIMEOUT)
            self._owns_group = True
            if tp * pp * ep > 1:
                # new_group is collective: rank 0 joins in, belonging to none
                build_groups(tp, pp, first_rank=1, backend=_tensor_backend(worker_kwargs), ep_size=ep)
            self._guarded(self._gather)  # every worker has loaded its model (or failed: raised here)
            threading.Thread(target=self._watch, args=(port,), daemon=True, name="minillm-watchdog").start()
        except BaseException as err:
            # nobody will hold this executor to shut it down: end the workers and leave no process group
            # behind, or the next engine of this process could not start its own
            self._broken = self._broken or f"start-up failed: {type(err).__name__}"
            self.shutdown()
            raise

    def _gather(self) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        dist.gather_object(None, results, dst=0)
        self._raise_worker_errors(results)
        return results[1:]

    def _raise_worker_errors(self, results: list[Any]) -> None:
        """Raise the first WorkerError among the ranks' `results`, or, when the failure left a tensor-parallel
        group out of step (desynchronised), a RuntimeError that ends the executor: nothing may rerun on it."""
        errors = {rank: r for rank, r in enumerate(results) if isinstance(r, WorkerError)}
        if not errors:
            return
        self._broken = desynchronised(errors, self._tp_groups)
        if self._broken is not None:
            raise RuntimeError(f"{self._broken}; the engine cannot continue (start a new one)")
        raise next(iter(errors.values()))

    def _watch(self, port: int) -> None:
        """The watchdog (a daemon thread, its own store connection): when a worker has reported a failure in the
        call out now and the call is still out PEER_FAILURE_GRACE_S later, the failed rank's peers are waiting
        in a collective it will never join. Kill the workers: the engine's gather then fails at once and the
        executor refuses further calls, naming the failure (instead of gloo's ten-minute timeout)."""
        try:
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=_TIMEOUT)
        except Exception:  # the engine is going away
            return
        seen: tuple[int, float] | None = None  # (call number, when its failure was first seen)
        while not self._closed:
            time.sleep(_WATCH_INTERVAL_S)
            call, key = self._calls, f"{_FAILED}/{self._calls}"
            try:
                if not self._in_call or not store.check([key]):
                    continue
                if seen is None or seen[0] != call:
                    seen = (call, time.monotonic())
                elif time.monotonic() - seen[1] > PEER_FAILURE_GRACE_S and self._in_call and self._calls == call:
                    self._stuck = (f"{store.get(key).decode()}, and the call was still waiting for its peers "
                                   f"{PEER_FAILURE_GRACE_S:g} s later (a collective it never joined)")
                    for process in self.processes:
                        process.kill()
                    return
            except Exception:  # the store went away with the engine
                return

    def _dead_workers(self) -> str | None:
        dead = [f"rank {rank} (pid {p.pid}, exit code {p.exitcode})"
                for rank, p in enumerate(self.processes, start=1) if not p.is_alive()]
        return ", ".join(dead) or None

    def _guarded(self, collective):
        """Run a collective with the workers, failing fast with the rank's name if a worker process is gone.
        gloo notices a closed connection at once, so a peer that dies mid-step ends the collective with an
        error rather than a hang; it is turned into this RuntimeError, and the executor refuses further calls."""
        dead = None if self._broken is not None else self._dead_workers()
        if dead:
            self._broken = f"worker process died: {dead}"
        if self._broken is not None:
            raise RuntimeError(f"{self._broken}; the engine cannot continue (start a new one)")
        try:
            return collective()
        except WorkerError:
            raise
        except Exception as err:
            if self._broken is not None:  # _gather found the group desynchronised
                raise
            if self._stuck is not None:  # the watchdog ended a group stuck behind a failed rank
                self._broken = self._stuck
            else:
                for _ in range(50):  # a peer's death reaches gloo a moment before is_alive() says so
                    dead = self._dead_workers()
                    if dead:
                        break
                    time.sleep(0.1)
                self._broken = f"worker process died: {dead}" if dead else f"a collective failed: {err}"
            raise RuntimeError(f"{self._broken}; the engine cannot continue (start a new one)") from err

    def _call(self, method: str | Callable[..., Any], *args: Any) -> list[Any]:
        if self._closed:
            raise RuntimeError("this executor has been shut down")

        def collective() -> list[Any]:
            self._calls += 1  # the workers count the same broadcasts
            self._in_call = True
            try:
                dist.broadcast_object_list([(method, args)], src=0)
                return self._gather()
            finally:
                self._in_call = False
        return self._guarded(collective)

    def collective_rpc(self, method: str | Callable[..., Any], *args: Any) -> list[Any]:
        """Call a Worker method (a name, or a picklable function called as method(worker, *args)) on every
        worker; their results in rank order (vLLM's collective_rpc)."""
        return self._call(method, *args)

    def determine_num_gpu_blocks(self) -> int:
        return min(self._call("determine_num_gpu_blocks"))

    def initialize_cache(self, cache_config: CacheConfig) -> None:
        self._call("initialize_cache", cache_config)

    def execute_model(self, step: StepInput) -> StepOutput:
        # the driver's answer: the only one that is not None in a parallel group, rank 1's otherwise
        return next(r for r in self._call("execute_model", step) if r is not None)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._broken is None:
            dist.broadcast_object_list([("shutdown", ())], src=0)
        else:  # the survivors wait in a collective that will never complete: end them (they are ours)
            for process in self.processes:
                if process.is_alive():
                    process.kill()
        if self._owns_group and dist.is_initialized():  # never another engine's group
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
