"""Device and dtype choice, and the Triton interpreter switch.

On a machine without CUDA, Triton kernels run through its interpreter, which must be requested with
TRITON_INTERPRET=1 *before* triton is first imported. `minillm/__init__.py` imports this module first
for that reason. CPU work is fp32 (bf16 matmuls are several times slower on a CPU, and the interpreter
mis-handles bf16 `tl.dot` operands); GPU work defaults to bf16.
"""
from __future__ import annotations

import os
import sys

if "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch as _torch

        if not _torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:  # torch missing: let the real import error surface later
        pass

import torch

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def has_cuda() -> bool:
    return torch.cuda.is_available()


def host_memory_bytes() -> int | None:
    """This machine's physical memory (None where the OS does not say: not Linux or macOS)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def triton_interpreted() -> bool:
    """True when Triton kernels run through the (slow, CPU) interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_device() -> torch.device:
    return torch.device("cuda" if has_cuda() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None -> cuda if present else cpu; validates an explicit choice."""
    if device is None or device == "auto":
        return default_device()
    allowed = "allowed: 'auto', 'cpu', 'cuda' or 'cuda:N' (a str or a torch.device)"
    if not isinstance(device, (str, torch.device)):  # torch.device(3) would mean "accelerator 3"
        raise ValueError(f"device={device!r} ({type(device).__name__}) is not a device; {allowed}")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists every backend it was built with
        raise ValueError(f"device={device!r} is not a device; {allowed}") from None
    if dev.type == "cuda" and not has_cuda():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; {allowed}")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto'/None -> bf16 on CUDA, fp32 on CPU."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype={dtype} is not supported; allowed: float32, bfloat16, float16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: 'auto', {', '.join(map(repr, _DTYPES))}")
    return _DTYPES[dtype]
