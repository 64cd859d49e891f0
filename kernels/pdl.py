"""Programmatic dependent launch (PDL): let the next kernel start while this one drains (sm_90+; chapter 4).

A decode step of a small or 4-bit model is a chain of ~300 short kernels, and even inside a CUDA graph each
boundary costs about a microsecond: the GPU waits for the last program of kernel N to finish and its writes to
be flushed, and only then launches kernel N+1, whose programs must still be scheduled onto the SMs and run their
prologues. On the H200 that gap was ~0.28 ms of a 2.54 ms INT4 step of the Llama-3-8B shape (the wall time minus
the sum of kernel times; benchmarks/RESULTS.md, twentieth session).

Hopper lets a kernel be launched with the attribute "programmatic stream serialization" (Triton:
`kernel[grid](..., launch_pdl=True)`): it may start *before* its predecessor in the stream has finished, as soon
as every program of the predecessor has executed `griddepcontrol.launch_dependents` (or exited). Its programs
then run whatever does not depend on the predecessor and block in `griddepcontrol.wait` until the predecessor has
completed and its memory is visible. TensorRT-LLM launches its kernels this way; CUDA graphs keep the attribute as
a programmatic edge between the two kernel nodes.

Every kernel here that takes part follows one rule, `grid_dependency_sync(PDL)` before it reads anything another
kernel wrote (its first statement; the INT4 GEMV first asks for its first tile of weights, which no kernel writes):
wait for the predecessor, then allow the successor to launch. The chain stays ordered (kernel N+1 cannot complete
before its wait, so N+2's wait on N+1 covers N too). Waiting before releasing bounds the overlap to two kernels (N+2
cannot launch while N still runs), and since a successor launches only once every program of this kernel has
started, its waiting programs never take an SM from one of this kernel's. (gemv.py's own PDL path releases its
successor before its wait, after loading its first weight tile: also ordered, with one more kernel in flight.)
A kernel launched without the attribute waits for its predecessor as always, so kernels with and without PDL mix
freely (cuBLAS, torch ops, a learner's exercise kernel).
RMSNorm, the ch04 exercise kernel, stays out on purpose: launched with PDL, a learner's kernel that forgot the
wait would read its input before the previous kernel had written it, a race that only shows on Hopper.

Measured on the H200 (bench_int4_decode.py --pdl ab): the 4-bit Llama-3-8B step went from 2.42 to 2.34 ms
(~0.3 us saved per boundary); the bf16 step, 4.5 ms of weight reads with cuBLAS between, did not move.

`launch_options(device)` is what a launcher passes: {"PDL": True, "launch_pdl": True} on a GPU of compute
capability 9.0 or newer with a Triton that has the instructions, else {} (the CPU interpreter, older GPUs).
`set_enabled(False)` (or MINILLM_PDL=0 in the environment) turns it off, for A/B measurements.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from minillm.platform import triton_interpreted

try:  # triton >= 3.3 (sm_90 griddepcontrol)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

_SWITCH = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}


def _from_environment() -> bool:
    """MINILLM_PDL: unset (on), or one of _SWITCH's spellings; anything else is an error naming them."""
    value = os.environ.get("MINILLM_PDL", "1").strip().lower()
    if value not in _SWITCH:
        raise ValueError(f"MINILLM_PDL={os.environ['MINILLM_PDL']!r}: use one of {', '.join(_SWITCH)}")
    return _SWITCH[value]


_ENABLED = _from_environment()


@triton.jit
def grid_dependency_sync(PDL: tl.constexpr):
    """First statement of a PDL kernel: wait for the previous kernel in the stream to complete (its writes
    visible), then let the next one launch. Compiles to nothing when PDL is False."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def set_enabled(enabled: bool) -> None:
    """Turn PDL on or off for launches from now on (kernels already captured in CUDA graphs keep theirs)."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _ENABLED = enabled


def is_enabled() -> bool:
    """Whether launches from now on may use PDL (set_enabled, or MINILLM_PDL at import)."""
    return _ENABLED


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    if triton_interpreted() or gdc_wait is None:
        return False
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def launch_options(device: torch.device) -> dict:
    """Keyword arguments for a PDL-aware kernel launch on `device`: PDL on where the hardware and Triton have it
    and it is enabled, else nothing (the kernel's PDL parameter defaults to False)."""
    if not _ENABLED or device.type != "cuda":
        return {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"PDL": True, "launch_pdl": True} if _supported(index) else {}
