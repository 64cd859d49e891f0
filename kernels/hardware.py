"""What the kernels' launch heuristics ask of the device: how many SMs share the work, and how long a captured
CUDA graph takes to replay (chapters 4, 5, 8).

A heuristic that splits K (GEMV, INT4 GEMM) or the keys (flash-decoding) sizes its grid so that every SM gets
work; the count is read once per device and kept. A launch chosen by timing (the decode GEMV, the INT4
dispatcher) is timed as the engine runs it: replayed from a CUDA graph, without the host's launch cost.
"""
from __future__ import annotations

import torch

_NUM_SMS: dict[int, int] = {}


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
