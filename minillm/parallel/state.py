"""Parallel state: which tensor- and pipeline-parallel groups this process belongs to (chapter 11).

vLLM keeps one `parallel_state` module per process; so do we. A worker process calls `init_parallel_state` once,
after torch.distributed is up and before it builds its model; the layers then ask `get_tp_size()` /
`get_pp_rank()` while they are constructed (to take their shard) and call the collectives below in their forward.
With nothing initialised every size is 1 and every collective returns its input: the single-process engine pays
nothing for the parallel code paths.

Rank layout. The workers are the global ranks `first_rank .. first_rank + tp * pp - 1` (the mp executor's engine
is rank 0 and holds no model, so its workers start at 1; under torchrun rank 0 is engine and worker, so they start
at 0). Worker w = global rank - first_rank sits at pipeline stage `w // tp` and tensor rank `w % tp`, as vLLM lays
them out: the ranks of one TP group are neighbours (on a real machine, the GPUs joined by NVLink).

    tp=2, pp=2, first_rank=1:   stage 0: ranks 1 2   (TP group [1, 2])      PP groups [1, 3] and [2, 4]
                                stage 1: ranks 3 4   (TP group [3, 4])

Expert parallelism (EP, for MoE models) is a third kind of group: with expert_parallel_size N (and tp = pp = 1)
worker w is EP rank w, holds experts [w * E/N, (w + 1) * E/N) of every MoE layer and exchanges tokens with the
others by all-to-all (minillm.parallel.expert).

Every collective counts the bytes it hands to torch.distributed (`comm_stats`), per operation, so a test can
compare them with the analytic count: the payload each rank contributes, not what the wire algorithm (ring,
tree) then moves.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class ParallelState:
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    first_rank: int = 0  # global rank of worker 0
    tp_group: Any = None  # a torch.distributed ProcessGroup (None when tp_size == 1)
    device_group: Any = None  # every worker, for pipeline send/recv over NCCL (None: the default group)
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Any = None  # the expert-parallel ranks' group (None when ep_size == 1)

    def global_rank(self, pp_rank: int, tp_rank: int) -> int:
        return self.first_rank + pp_rank * self.tp_size + tp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        """The rank that samples and answers the engine: TP rank 0 of the last pipeline stage (EP rank 0)."""
        return self.is_last_stage and self.tp_rank == 0 and self.ep_rank == 0


_STATE = ParallelState()
comm_stats: Counter = Counter()  # operation name -> bytes this process handed to torch.distributed


def check_parallel_sizes(tensor_parallel_size: Any, pipeline_parallel_size: Any) -> None:
    for name, value in (("tensor_parallel_size", tensor_parallel_size),
                        ("pipeline_parallel_size", pipeline_parallel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def build_groups(tp_size: int, pp_size: int, first_rank: int, backend: str | None = None,
                 ep_size: int = 1) -> ParallelState:
    """Create every TP group (collective calls: every process of the default group must call this, in the same
    order, the engine's rank 0 included even though it belongs to none) and return this process's state.
    `backend`: the groups' backend when it differs from the default group's ("nccl" for the tensors of GPU
    workers whose engine talks to them over gloo); then the workers also get one group of them all for
    the pipeline's send/recv. `ep_size` > 1 (with tp = pp = 1): one expert-parallel group of all the workers."""
    check_parallel_sizes(tp_size, pp_size)
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or \
            (ep_size > 1 and tp_size * pp_size > 1):
        raise ValueError(f"expert_parallel_size must be an integer >= 1, and 1 with tensor/pipeline parallelism; "
                         f"got {ep_size!r} with tp={tp_size}, pp={pp_size}")
    rank = dist.get_rank()
    state = ParallelState(tp_size=tp_size, pp_size=pp_size, first_rank=first_rank)
    if ep_size > 1:
        workers = list(range(first_rank, first_rank + ep_size))
        group = dist.new_group(workers, backend=backend)
        if rank in workers:
            state.ep_size, state.ep_rank, state.ep_group = ep_size, workers.index(rank), group
        return state
    for stage in range(pp_size):
        ranks = [state.global_rank(stage, t) for t in range(tp_size)]
        group = dist.new_group(ranks, backend=backend) if tp_size > 1 else None
        if rank in ranks:
            state.pp_rank, state.tp_rank, state.tp_group = stage, ranks.index(rank), group
    if backend is not None:
        workers = list(range(first_rank, first_rank + tp_size * pp_size))
        group = dist.new_group(workers, backend=backend)
        state.device_group = group if rank in workers else None
    return state


def init_parallel_state(state: ParallelState) -> None:
    global _STATE
    _STATE = state


def get_parallel_state() -> ParallelState:
    return _STATE


def get_tp_size() -> int:
    return _STATE.tp_size


def get_tp_rank() -> int:
    return _STATE.tp_rank


def get_pp_size() -> int:
    return _STATE.pp_size


def get_pp_rank() -> int:
    return _STATE.pp_rank


# -- collectives (no-ops at size 1) ---------------------------------------------------------------------------
def tensor_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the TP group, in place (after a row-parallel linear, after the vocab-parallel embedding)."""
    if _STATE.tp_size == 1:
        return x
    comm_stats["all_reduce"] += x.numel() * x.element_size()
    dist.all_reduce(x, group=_STATE.tp_group)
    return x


def tensor_parallel_max(x: torch.Tensor) -> torch.Tensor:
    """The elementwise max of `x` over the TP group, in place: a weight's range when each rank holds a piece of it
    (load-time quantization's scales: minillm.quant.base.whole_weight_amax)."""
    if _STATE.tp_size == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=_STATE.tp_group)
    return x


def tensor_parallel_gather(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every TP rank's `x` along the last dimension on TP rank 0 (None on the others): the
    vocab-parallel LM head's logits, which only the sampling rank needs (vLLM gathers, it does not all-gather)."""
    if _STATE.tp_size == 1:
        return x
    x = x.contiguous()
    dst = _STATE.global_rank(_STATE.pp_rank, 0)
    if _STATE.tp_rank != 0:
        comm_stats["gather"] += x.numel() * x.element_size()
        dist.gather(x, None, dst=dst, group=_STATE.tp_group)
        return None
    parts = [torch.empty_like(x) for _ in range(_STATE.tp_size)]
    dist.gather(x, parts, dst=dst, group=_STATE.tp_group)
    return torch.cat(parts, dim=-1)


def pipeline_isend(tensors: list[torch.Tensor], tag: int = 0) -> list[Any]:
    """Send activations to the same TP rank of the next stage without waiting (the caller waits later); tensor i
    goes with tag `tag + i` so that the receiver matches each message to its micro-batch."""
    dst = _STATE.global_rank(_STATE.pp_rank + 1, _STATE.tp_rank)
    works = []
    for i, t in enumerate(tensors):
        t = t.contiguous()
        comm_stats["send"] += t.numel() * t.element_size()
        works.append((dist.isend(t, dst=dst, group=_STATE.device_group, tag=tag + i), t))  # keep `t` alive until the send is done
    return works


def pipeline_recv(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                  tag: int = 0) -> list[torch.Tensor]:
    """Receive activations of the given shapes (tags `tag`, `tag + 1`, ...) from the same TP rank of the
    previous stage."""
    src = _STATE.global_rank(_STATE.pp_rank - 1, _STATE.tp_rank)
    out = []
    for i, shape in enumerate(shapes):
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=src, group=_STATE.device_group, tag=tag + i)
        out.append(t)
    return out


def expert_all_to_all(x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int],
                      counter: str) -> torch.Tensor:
    """Rows x[sum(input_split_sizes[:d]) ...] go to EP rank d; returns what every rank sent here, in rank order.
    The whole send buffer is counted under comm_stats[counter], the chunk a rank keeps for itself included
    (all_to_all_single copies it locally), so the dispatch count does not depend on the routing."""
    x = x.contiguous()
    comm_stats[counter] += x.numel() * x.element_size()
    out = x.new_empty((sum(output_split_sizes), *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes, input_split_sizes, group=_STATE.ep_group)
    return out


def expert_all_gather(x: torch.Tensor, rows_per_rank: int, num_rows: int) -> torch.Tensor:
    """Concatenate every EP rank's rows (each padded to `rows_per_rank`, as all_gather needs equal sizes) and keep
    the first `num_rows`: after the MoE layer, every rank holds every token again."""
    padded = x.new_zeros((rows_per_rank, *x.shape[1:]))
    padded[:x.shape[0]] = x
    comm_stats["all_gather"] += padded.numel() * padded.element_size()
    parts = [torch.empty_like(padded) for _ in range(_STATE.ep_size)]
    dist.all_gather(parts, padded, group=_STATE.ep_group)
    return torch.cat(parts)[:num_rows]


@contextlib.contextmanager
def single_rank() -> Iterator[None]:
    """Build something as one process would (the whole model's shapes, e.g. on the meta device), then restore."""
    global _STATE
    previous, _STATE = _STATE, ParallelState()
    try:
        yield
    finally:
        _STATE = previous
