"""The operator backend: the one switch between the torch reference of an operator and its Triton kernel.

Every operator module (attention, RMSNorm, RoPE, SiLU*mul) subclasses `OperatorModule`, which holds a `backend`;
`set_operator_backend(model, backend)` switches every one of them under a model, so a new operator joins the
switch by subclassing, never by being added to a list somewhere else. The backends:

    "torch"      torch ops and SDPA (one padded SDPA call per layer for a decode step; the CPU path)
    "reference"  the plainest torch (matmul + fp32 softmax), for tests and for reading
    "triton"     the kernels of minillm.kernels (chapters 3-5; on a CPU through Triton's interpreter)
    "auto"       triton when the tensors live on a GPU, torch otherwise (decided per call by `use_triton`)
"""
from __future__ import annotations

import torch
from torch import nn

OPERATOR_BACKENDS = ("auto", "torch", "reference", "triton")


def check_backend(backend: str) -> str:
    if backend not in OPERATOR_BACKENDS:
        raise ValueError(f"operator backend {backend!r}; allowed: {', '.join(OPERATOR_BACKENDS)}")
    return backend


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """The one backend decision of every operator module: run the Triton kernel for this call?"""
    return backend == "triton" or (backend == "auto" and x.is_cuda)


class OperatorModule(nn.Module):
    """A module with a torch reference and a Triton kernel; `backend` picks one (see the module docstring)."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = check_backend(backend)


def set_operator_backend(model: nn.Module, backend: str) -> None:
    """Switch every operator module under `model` to `backend`."""
    check_backend(backend)
    for module in model.modules():
        if isinstance(module, OperatorModule):
            module.backend = backend
