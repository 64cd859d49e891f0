"""Prefill/decode disaggregation, the worker half: a prefill worker and a decode worker in their own processes,
and the KV channel between them (chapter 11; DistServe, Splitwise and vLLM's disaggregated prefill).

Why split them? A prefill is one long compute-bound forward; a decode step is short and bound by memory
bandwidth. In one engine they share every step: a long prompt admitted next to running decodes stretches that
step, and every decoding request feels it as one slow token (TPOT spikes), while chunked prefill trades the
spike for a longer time to first token. Run on different devices, neither waits for the other: the prefill
worker computes prompts back to back, the decode worker steps its batch at its own pace, and what passes
between them is each request's KV cache, once.

    router (engine process: scheduling, tokens, text)        minillm.engine.disagg_engine
       |  pipe: ("step", StepInput, sends, recvs)      |  pipe
    prefill worker (rank 0) ==== packed KV blocks ====> decode worker (rank 1)
                         torch.distributed isend / recv (NCCL between two GPUs, gloo otherwise)

Each worker is an ordinary Worker (minillm.engine.worker) with its own paged KV pool, driven over a
multiprocessing pipe rather than a collective: the router talks to each side on its own, so the two run
asynchronously (a collective would lock them into the same steps, which is what disaggregation removes). The
router learns of a dead worker from its process sentinel, so a killed worker fails the engine at once.

A transfer, tagged with an id the router picks:
  1. the prefill step that finishes a prompt samples the first token; the router decides the request goes on
  2. once the decode side has free blocks for it (back-pressure: until then the request waits, holding its
     prefill blocks), the next message to the prefill worker carries KVSend(tag, prefill block table): the
     worker packs the blocks (minillm.parallel.kv_transfer), posts an isend, answers "posted" at once, then
     runs its step
  3. the decode side admits it (allocates its blocks) and the decode worker's next step carries KVRecv(tag,
     decode block table): it receives the packed tensor, scatters it into its own blocks, and decodes the
     request in that same step
  4. when that step returns, the data has arrived: the router frees the prefill blocks. The prefill worker
     retires the finished send (and its packed buffer) by itself, also while idle.
gloo matches messages by tag; NCCL ignores tags and matches in order, which the router keeps: sends are posted
and receives admitted in one FIFO order. Two processes on one GPU cannot share an NCCL communicator, so there
the KV goes over gloo through CPU memory (correct, but it measures nothing about a real interconnect).
An fp8 KV cache travels as its bytes (a quarter of fp32's), and at start-up the decode worker adopts the
prefill worker's fp8 scales, with which those bytes were written.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist

from minillm.engine.executor import WorkerError, _free_port
from minillm.engine.worker import Worker
from minillm.parallel.kv_transfer import as_bytes, pack_kv_blocks, packed_kv_shape, unpack_kv_blocks
from minillm.parallel.state import comm_stats

_TIMEOUT = datetime.timedelta(minutes=10)
ROLES = ("prefill", "decode")  # rank 0 and rank 1 of the KV channel's process group


@dataclass(frozen=True)
class KVSend:
    """Prefill side: pack these blocks (the request's block table there) and send them with this tag."""

    tag: int
    block_ids: list[int]
    request_id: str


@dataclass(frozen=True)
class KVRecv:
    """Decode side: receive `num_blocks` packed blocks with this tag into `block_ids` (None: receive and drop,
    for a request aborted after its send was posted: the send must still complete). `generator_state`: the
    prefill side's random generator of a seeded request, which the decode side continues."""

    tag: int
    num_blocks: int
    block_ids: list[int] | None
    request_id: str
    generator_state: torch.Tensor | None = None


class WorkerDied(RuntimeError):
    """A prefill or decode worker process is gone; the disaggregated engine cannot continue."""


def kv_channel(prefill_device: torch.device, decode_device: torch.device) -> tuple[str, bool]:
    """(torch.distributed backend, staged through CPU memory?) for the KV channel between the two devices."""
    on_cuda = prefill_device.type == "cuda", decode_device.type == "cuda"
    if all(on_cuda) and prefill_device.index != decode_device.index:
        return "nccl", False  # GPU to GPU (NVLink on an HGX machine)
    return "gloo", any(on_cuda)  # CPU workers, or two processes on one GPU (NCCL refuses a shared device)


class KVLink:
    """A worker's end of the KV channel: posts sends and keeps them (and their buffers) until they complete, or
    receives into its pool. Bytes go into comm_stats as "kv_send" / "kv_recv"."""

    def __init__(self, rank: int, staged: bool) -> None:
        self.peer = 1 - rank
        self.staged = staged
        self.pending: dict[int, tuple[Any, torch.Tensor]] = {}  # tag -> (isend work, packed buffer)

    def send(self, pool: torch.Tensor, transfer: KVSend) -> int:
        packed = pack_kv_blocks(pool, transfer.block_ids)
        if self.staged:
            packed = packed.cpu()
        self.pending[transfer.tag] = (dist.isend(as_bytes(packed), dst=self.peer, tag=transfer.tag), packed)
        nbytes = packed.numel() * packed.element_size()
        comm_stats["kv_send"] += nbytes
        return nbytes

    def retire(self, wait_all: bool = False) -> None:
        """Drop the sends that have completed (all of them, waiting, with wait_all)."""
        for tag, (work, _) in list(self.pending.items()):
            if wait_all or work.is_completed():
                work.wait()  # raises if the send failed (the peer died)
                del self.pending[tag]

    def recv(self, pool: torch.Tensor, transfer: KVRecv) -> None:
        device = "cpu" if self.staged else pool.device
        packed = torch.empty(packed_kv_shape(pool, transfer.num_blocks), dtype=pool.dtype, device=device)
        dist.recv(as_bytes(packed), src=self.peer, tag=transfer.tag)
        comm_stats["kv_recv"] += packed.numel() * packed.element_size()
        if transfer.block_ids is not None:
            unpack_kv_blocks(pool, transfer.block_ids, packed)


def run_step(worker: Worker, link: KVLink, conn: Connection, step: Any, sends: list[KVSend],
             recvs: list[KVRecv]) -> Any:
    """One message of the router: post the sends (answering "posted" before the forward, so the decode side can
    admit those requests while this side computes), receive into this pool, then run the step.

    A seeded request's sampler generator travels with its KV (a few bytes of state, with the "posted" answer):
    the decode side draws the numbers one engine would have drawn next, so seeded sampling gives the same
    tokens as one engine. (The runner keeps those generators in `_generators`, keyed by request id.)"""
    runner = worker.runner
    pool = runner.kv_cache.storage
    posted: list[tuple[int, int, torch.Tensor | None]] = []
    try:
        for transfer in sends:
            nbytes = link.send(pool, transfer)
            generator = runner._generators.pop(transfer.request_id, None)  # its sampling continues there
            posted.append((transfer.tag, nbytes, None if generator is None else generator.get_state()))
    finally:  # report every send that is up, even if a later one failed: the decode side must drain it
        if posted:
            conn.send(("posted", posted))
    for transfer in recvs:
        link.recv(pool, transfer)
        if transfer.generator_state is not None and transfer.block_ids is not None:
            generator = runner._generators[transfer.request_id] = torch.Generator(device=runner.device)
            generator.set_state(transfer.generator_state)
    output = worker.execute_model(step)
    link.retire()
    return output


def kv_scales(worker: Worker, scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """An fp8 KV cache's scales ([2, layers, kv_heads], None for other caches), on the CPU; given `scales`,
    copy them in first. The decode side adopts the prefill side's: the bytes it receives were scaled by those.
    (Copied in place: the attention layers and captured CUDA graphs hold views of this tensor.)"""
    own = worker.runner.kv_cache.scales
    if own is not None and scales is not None:
        own.copy_(scales.to(own.device))
    return None if own is None else own.cpu()


def _serve(role: str, rank: int, conn: Connection, worker_kwargs: dict[str, Any], staged: bool) -> None:
    worker = Worker(**worker_kwargs)
    link = KVLink(rank, staged)
    loaded = None
    try:
        worker.load_model()
    except Exception as err:  # reported, then this process waits for "shutdown" like any other
        loaded = WorkerError(f"{role} worker: {type(err).__name__}: {err}\n{traceback.format_exc()}")
    conn.send(("done", loaded))
    while True:
        if link.pending and not conn.poll(0.005):
            link.retire()  # idle, with sends in flight: free their buffers as they complete
            continue
        method, args = conn.recv()
        if method == "shutdown":
            return
        try:
            if method == "step":
                result = run_step(worker, link, conn, *args)
            elif method == "kv_scales":
                result = kv_scales(worker, *args)
            else:  # determine_num_gpu_blocks, initialize_cache, get_comm_stats
                result = method(worker, *args) if callable(method) else getattr(worker, method)(*args)
        except Exception as err:  # the router fails this step's requests; the worker keeps serving
            result = WorkerError(f"{role} worker: {type(err).__name__}: {err}\n{traceback.format_exc()}")
        conn.send(("done", result))


def _worker_main(role: str, port: int, conn: Connection, worker_kwargs: dict[str, Any], backend: str,
                 staged: bool) -> None:
    """A child process: join the two-rank KV group, then serve the router's messages until 'shutdown'."""
    rank = ROLES.index(role)
    device = torch.device(worker_kwargs["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # two workers share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=2, timeout=_TIMEOUT)
    # one small message now: NCCL builds the pair's communicator at the first send, which blocks until the peer
    # joins; here both are starting anyway, later the first real send would wait for a busy decode worker
    probe = torch.zeros(1, device=device if backend == "nccl" else "cpu")
    if rank == 0:
        dist.send(probe, dst=1)
    else:
        dist.recv(probe, src=0)
    try:
        _serve(role, rank, conn, worker_kwargs, staged)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter's teardown of torch (seconds on a busy machine): nothing is left to save


class WorkerProcess:
    """The router's handle on one worker: its process, its pipe, and whether a message is outstanding."""

    def __init__(self, role: str, process: Any, conn: Connection) -> None:
        self.role, self.process, self.conn = role, process, conn
        self.busy = False

    def submit(self, method: Any, *args: Any) -> None:
        self.check_alive()
        try:
            self.conn.send((method, args))
        except OSError:  # killed a moment ago: is_alive() has not caught up yet
            self.process.join(timeout=5)
            self.check_alive()
            raise
        self.busy = True

    def check_alive(self) -> None:
        if not self.process.is_alive():
            raise WorkerDied(f"the {self.role} worker (pid {self.process.pid}) died with exit code "
                             f"{self.process.exitcode}; the disaggregated engine cannot continue (start a new one)")


class DisaggWorkers:
    """Start the prefill and the decode worker (spawned, as the mp executor's), wait until both have loaded
    their model, and carry the router's messages. `kwargs` maps each role to its Worker arguments (picklable:
    a CheckpointSource or RandomWeights, and the role's device)."""

    def __init__(self, kwargs: dict[str, dict[str, Any]]) -> None:
        if sorted(kwargs) != sorted(ROLES):
            raise ValueError(f"need Worker arguments for exactly the roles {ROLES}, got {sorted(kwargs)}")
        devices = [torch.device(kwargs[role]["device"]) for role in ROLES]
        self.backend, self.staged = kv_channel(*devices)
        port = _free_port()
        self._store = dist.TCPStore("127.0.0.1", port, 3, is_master=True, timeout=_TIMEOUT, wait_for_workers=False)
        context = mp.get_context("spawn")
        self.workers: dict[str, WorkerProcess] = {}
        self._closed = False
        for role in ROLES:
            parent, child = context.Pipe()
            process = context.Process(target=_worker_main, daemon=True,
                                      args=(role, port, child, kwargs[role], self.backend, self.staged))
            process.start()
            child.close()
            self.workers[role] = WorkerProcess(role, process, parent)
        try:
            for worker in self.workers.values():
                worker.busy = True  # until its "loaded" report (a WorkerError if loading failed)
            self._results()
        except BaseException:
            self.shutdown()
            raise

    def wait(self) -> list[tuple[WorkerProcess, str, Any]]:
        """Block until a busy worker answers (or any worker dies: WorkerDied). Returns (worker, kind, payload)
        messages; kind "posted" (payload: [(tag, bytes, generator state)]) or "done" (the result; the worker is
        idle again)."""
        busy = [w for w in self.workers.values() if w.busy]
        if not busy:
            raise RuntimeError("no worker is busy: nothing to wait for")
        sentinels = {w.process.sentinel: w for w in self.workers.values()}
        ready = wait([w.conn for w in busy] + list(sentinels))
        messages, broken = [], []
        for worker in busy:
            if worker.conn not in ready:
                continue
            try:
                while worker.conn.poll():
                    kind, payload = worker.conn.recv()
                    messages.append((worker, kind, payload))
                    if kind == "done":
                        worker.busy = False
                        break
            except (EOFError, OSError):  # the pipe closed under us: the process is going
                broken.append(worker)
        for worker in self.workers.values():
            if worker.process.sentinel in ready or worker in broken:
                worker.process.join(timeout=5)
                worker.check_alive()
                raise WorkerDied(f"the {worker.role} worker (pid {worker.process.pid}) closed its pipe; the "
                                 f"disaggregated engine cannot continue (start a new one)")
        return messages

    def result_of(self, role: str) -> Any:
        """Block until the `role` worker answers the message it is busy with (its "done" payload), leaving the
        other worker's messages in that worker's pipe for the next wait(); WorkerDied if it dies."""
        worker = self.workers[role]
        try:
            while wait([worker.conn, worker.process.sentinel]) and worker.conn.poll():
                kind, payload = worker.conn.recv()
                if kind == "done":
                    worker.busy = False
                    return payload
        except (EOFError, OSError):  # the pipe closed under us: the process is going
            pass
        worker.process.join(timeout=5)
        worker.check_alive()
        raise WorkerDied(f"the {role} worker (pid {worker.process.pid}) closed its pipe; the disaggregated engine "
                         f"cannot continue (start a new one)")

    def call(self, role: str, method: Any, *args: Any) -> Any:
        """Call a Worker method (its name, or a picklable function method(worker, *args)) between steps (setup,
        statistics, collective_rpc); raises the worker's WorkerError."""
        if any(w.busy for w in self.workers.values()):
            raise RuntimeError(f"a worker is busy with a step; call {method} between steps")
        self.workers[role].submit(method, *args)
        return self._results()[role]

    def _results(self) -> dict[str, Any]:
        """Wait until every busy worker is done; their results by role (raises the first WorkerError)."""
        results = {}
        while any(w.busy for w in self.workers.values()):
            results.update((who.role, payload) for who, kind, payload in self.wait() if kind == "done")
        for role in ROLES:  # the prefill worker's error first, whichever answered first
            if isinstance(results.get(role), WorkerError):
                raise results[role]
        return results

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self.workers.values():
            try:
                while worker.busy and worker.process.is_alive() and worker.conn.poll(30):  # let a step finish
                    worker.busy = worker.conn.recv()[0] != "done"
                if worker.process.is_alive() and not worker.busy:
                    worker.conn.send(("shutdown", ()))
            except (OSError, ValueError, EOFError):
                pass
        for worker in self.workers.values():
            worker.process.join(timeout=10)
            if worker.process.is_alive():  # blocked on a peer that died, or in a step: it is ours to end
                worker.process.kill()
                worker.process.join(timeout=10)
            worker.conn.close()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass
