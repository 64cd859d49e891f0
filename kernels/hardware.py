"""What the kernels' launch heuristics ask of the device: how many SMs share the work (chapters 4, 5, 8).

A heuristic that splits K (GEMV, INT4 GEMM) or the keys (flash-decoding) sizes its grid so that every SM gets
work; the count is read once per device and kept.
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
