"""What the kernels' launch heuristics ask of the device: how many SMs share the work, and how long a captured
CUDA graph takes to replay (chapters 4, 5, 8); and the one way this package captures a CUDA graph. Also where a
matrix counts as small (SMALL_MATRIX: its decode GEMV is launch cost more than bytes).

A heuristic that splits K (GEMV, INT4 GEMM) or the keys (flash-decoding) sizes its grid so that every SM gets
work; the count is read once per device and kept. A launch chosen by timing (the decode GEMV, the INT4
dispatcher) is timed as the engine runs it: replayed from a CUDA graph, without the host's launch cost.
"""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import torch

_NUM_SMS: dict[int, int] = {}


SMALL_MATRIX = 1 << 23  # weights; below this (SmolLM2's matrices) a decode GEMV is a few microseconds of launch


def num_sms(device: torch.device) -> int:
    """The device's SM count (4 off CUDA: the interpreter's grids stay small)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def graph_replay_us(graph, launches: int, trials: int = 5) -> float:
    """Median microseconds per launch of a captured CUDA graph that holds `launches` launches (timed with CUDA
    events over `trials` replays, after one untimed replay). Replaying from a graph takes Python and the launch
    path out of a kernel's time: what the engine's decode step sees."""
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    return sorted(times)[len(times) // 2]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused for the body (and resumed after, if it was on): wrap every CUDA
    graph capture in it.

    Why. While a stream captures, CUDA refuses calls that are not stream work, and in torch's default (global)
    capture mode such a call from anywhere invalidates the capture. Freeing a dead CUDA graph is one of them
    (cudaGraphDestroy; torch warns "operation not permitted when stream is capturing (function reset)"), and
    objects in reference cycles are freed whenever the collector happens to run, which can be in the middle of a
    capture: an engine dropped earlier in a notebook or a test run, still holding its graphs, takes the capture
    of the next engine's graph down with it. torch no longer collects before a capture (it is slow), so the
    collector waits here and whatever became garbage is freed after the capture, outside it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def graph_capture(graph, pool=None) -> Iterator[None]:
    """torch.cuda.graph(graph, pool=pool) inside paused_gc(): how this package records a CUDA graph."""
    with paused_gc(), torch.cuda.graph(graph, pool=pool):
        yield


def graph_us(step, calls: int, trials: int = 5) -> float:
    """Median GPU microseconds per call of step(i), i = 0 .. calls - 1, recorded into one CUDA graph (with
    graph_capture) and timed by graph_replay_us. step must have run once already (compiled, autotuned) and must
    not synchronize; i lets it cycle through copies of its operands (cold reads)."""
    graph = torch.cuda.CUDAGraph()
    with graph_capture(graph):
        for i in range(calls):
            step(i)
    return graph_replay_us(graph, calls, trials)
