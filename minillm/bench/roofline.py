"""The roofline model: is a kernel limited by arithmetic or by memory traffic? (chapter 1)

A processor does at most P FLOP/s and moves at most B bytes/s. A kernel that performs F FLOPs on M bytes has
arithmetic intensity I = F / M (FLOPs per byte), and can run no faster than min(P, I x B) FLOP/s. Below the
"ridge point" I* = P / B it is memory-bound (the roof slopes: more bandwidth would help, more FLOP/s would not);
above it, compute-bound. An H100 runs 722 TFLOP/s of bf16 GEMM over 3.0 TB/s: I* is about 240 FLOPs/byte.

An LLM is mostly matrix multiplies with its weights. Prefill multiplies a whole prompt (m = hundreds of tokens) by
each weight matrix, so the weights are reused m times: compute-bound. Decode multiplies ONE token (m = 1) per
sequence: every weight byte is read to do 2 FLOPs per 2 bytes, I ~ 1, so the GPU idles waiting for memory. Batching
many sequences raises m and climbs the roof: that is the whole reason for continuous batching (chapter 6).

This module measures this machine's peak matmul FLOP/s and copy bandwidth quickly, and plots the roofline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from minillm.kernels.hardware import graph_us  # noqa: F401  (benchmarks import it from here)

from minillm.hooks import dispatch


# >>> exercise ch01.arithmetic_intensity
def arithmetic_intensity(m: int, n: int, k: int, bytes_per_element: float) -> float:
    """Arithmetic intensity (FLOPs per byte moved) of the matmul C[m, n] = A[m, k] @ B[k, n].

    FLOPs: one multiply and one add for each of the k terms of each of the m*n outputs, 2*m*n*k.
    Bytes: A and B are read once and C is written once, each element bytes_per_element bytes:
    bytes_per_element * (m*k + k*n + m*n). Return their ratio as a float (no validation needed).
    Decode (m = 1) reads a whole weight matrix for 2 FLOPs per weight: that is why it is memory-bound.
    """
    # >>> solution
    flops = 2 * m * n * k  # one multiply and one add for each of the k terms of each of the m x n outputs
    bytes_moved = bytes_per_element * (m * k + k * n + m * n)  # read A, read B, write C: each exactly once
    return flops / bytes_moved
    # <<< solution
# <<< exercise


def intensity(m: int, n: int, k: int, bytes_per_element: float) -> float:
    """Validated entry point; calls the learner's `arithmetic_intensity` when the course adapter selects it."""
    for name, v in [("m", m), ("n", n), ("k", k)]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not bytes_per_element > 0:
        raise ValueError(f"bytes_per_element must be > 0 (e.g. 4 fp32, 2 bf16, 1 fp8, 0.5 int4), got {bytes_per_element!r}")
    return dispatch("ch01.arithmetic_intensity", arithmetic_intensity)(m, n, k, bytes_per_element)


@dataclass(frozen=True)
class MachinePeak:
    """A roof: peak FLOP/s for one dtype and the memory bandwidth (bytes read + written per second)."""

    name: str
    flops: float
    bandwidth: float

    @property
    def ridge_point(self) -> float:
        """The intensity (FLOPs/byte) where the sloped and the flat roof meet."""
        return self.flops / self.bandwidth

    def attainable(self, intensity: float) -> float:
        """The roofline: min(peak FLOP/s, intensity x bandwidth)."""
        return min(self.flops, intensity * self.bandwidth)


# Measured on the project's H100 80GB HBM3 (triton.testing.do_bench medians; see shared/GPU.md).
H100_BF16 = MachinePeak("H100 bf16 GEMM", 722e12, 3.0e12)
H100_FP8 = MachinePeak("H100 fp8 GEMM", 1254e12, 3.0e12)
# Measured on the project's H200 (shared/GPU.md, 2026-12-02): cuBLAS bf16 GEMM 672-722 TFLOP/s (we take 700), fp8
# 1285 TFLOP/s, copy 4.24 TB/s. The datasheet's dense bf16 peak (989 TFLOP/s, H100 and H200 alike) is not reached.
H200_BF16 = MachinePeak("H200 bf16 GEMM", 700e12, 4.24e12)
H200_FP8 = MachinePeak("H200 fp8 GEMM", 1285e12, 4.24e12)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Any, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _resolve(device: str | torch.device | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev, dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def time_matmul(m: int, n: int, k: int, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                repeats: int = 5, warmup: int = 2, seed: int = 0) -> float:
    """Median seconds of one A[m,k] @ B[k,n] on fresh random data (never time zeros)."""
    dev, dt = _resolve(device, dtype)
    g = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(dev, dt)
    b = torch.randn(k, n, generator=g).to(dev, dt)
    return _median_seconds(lambda: a @ b, dev, repeats, warmup)


def measure_matmul_flops(size: int = 1024, dtype: torch.dtype | None = None,
                         device: str | torch.device | None = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of a square size^3 matmul: a quick stand-in for the peak (bigger sizes get closer)."""
    return 2 * size**3 / time_matmul(size, size, size, dtype, device, repeats)


def measure_copy_bandwidth(num_bytes: int = 64 * 2**20, device: str | torch.device | None = None,
                           repeats: int = 5) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    if num_bytes < 4:
        raise ValueError(f"num_bytes must be >= 4, got {num_bytes!r}")
    dev, _ = _resolve(device, None)
    src = torch.rand(num_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_seconds(lambda: dst.copy_(src), dev, repeats, warmup=2)


def measure_machine(size: int = 1024, num_bytes: int = 64 * 2**20, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> MachinePeak:
    """This machine's roof, measured in well under a second on a CPU."""
    dev, dt = _resolve(device, dtype)
    flops = measure_matmul_flops(size, dt, dev)
    bw = measure_copy_bandwidth(num_bytes, dev)
    label = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"this CPU ({torch.get_num_threads()} threads)"
    return MachinePeak(f"{label} {str(dt).replace('torch.', '')}", flops, bw)


def linear_intensities(tokens: Sequence[int], d_in: int, d_out: int, bytes_per_element: float) -> dict[int, float]:
    """Intensity of x[tokens, d_in] @ W[d_in, d_out] for each token count: the weights' reuse grows with tokens."""
    return {t: intensity(t, d_out, d_in, bytes_per_element) for t in tokens}


def _si(x: float) -> str:
    """1.25e15 -> '1.25 P' (the unit follows)."""
    for scale, prefix in [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]:
        if x >= scale:
            return f"{x / scale:.3g} {prefix}"
    return f"{x:.3g} "


def plot_roofline(peaks: Sequence[MachinePeak], points: Sequence[tuple[str, float]] = (),
                  measured: Sequence[tuple[str, float, float]] = (), ax: Any = None, title: str | None = None) -> Any:
    """Log-log roofline for each peak; `points` are (label, intensity) drawn as vertical guides, `measured` are
    (label, intensity, achieved FLOP/s) drawn as dots. Returns the matplotlib Figure."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: nothing global, works headless and in notebooks

    if ax is None:
        ax = Figure(figsize=(8, 5), layout="constrained").add_subplot()
    lo = min([0.1] + [i for _, i in points] + [i for _, i, _ in measured])
    hi = max([1e4] + [p.ridge_point * 4 for p in peaks] + [i for _, i in points])
    xs = np.logspace(np.log10(lo / 2), np.log10(hi * 2), 200)
    for idx, p in enumerate(peaks):  # a line style each: roofs of one machine share their memory slope
        ax.plot(xs, [p.attainable(x) for x in xs], lw=2, ls=("-", "--", "-.")[idx % 3],
                label=f"{p.name}: {_si(p.flops)}FLOP/s, {_si(p.bandwidth)}B/s, ridge {p.ridge_point:.3g} FLOPs/B")
        ax.axvline(p.ridge_point, color=ax.lines[-1].get_color(), ls=":", lw=1)
    for label, i in points:
        ax.axvline(i, color="grey", ls="--", lw=0.8)
        ax.text(i, 0.97, label, transform=ax.get_xaxis_transform(), rotation=90, fontsize=8, va="top", ha="right")
    for label, i, f in measured:
        ax.scatter([i], [f], color="black", marker="D", zorder=5)
        ax.annotate(label, (i, f), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs / byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.set_title(title or "Roofline: decode sits on the memory slope, prefill under the flat roof")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return ax.figure

