"""Which kernel a dense layer's matmul runs at decode, decided once per shape by timing (chapter 4).

At decode (a few tokens per step) a dense layer is a matrix-vector product bound by reading its weight. On the
H200 cuBLAS reads Llama-3-8B's big matrices at 89-100% of the copy bandwidth but the small ones (o_proj 63%,
qkv_proj 79%) well below it. `dense_linear` is the dense layers' (and the LM head's) matmul: `F.linear`,
except on a GPU for at most GEMV_MAX_M rows of fp16/bf16, where it runs minillm.kernels.gemv if that measured
faster for this (N, K, M) on its first call (see `gemv_mode`; both timed from CUDA-graph replays with cold
weights, as decode runs them). Where it runs, a Llama MLP's down projection can take [gate | up] itself
(`forward(x, swiglu=True)`, after `fuses_swiglu`): the GEMV computes silu(gate) * up as it loads x, kept where
that timed faster than the activation's own launch; likewise the qkv and gate_up projections can take the RMSNorm
before them (`forward_rms_norm`, after `fuses_rms_norm`): each program normalises x as it loads it. On the CPU
in fp32 the same idea picks a memory layout instead of a kernel: minillm.layers.cpu_matmul times F.linear against
a transposed copy of W, (W x^T)^T, W in two halves and oneDNN's prepacked blocks, per shape and row class (1,
2-16, more), and keeps the fastest.

The decisions are made on a shape's first call (the engine's warm-up, before CUDA-graph capture), never inside a
capture, and kept for the process: `set_gemv_mode` changes the policy and forgets them.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from minillm.kernels.hardware import SMALL_MATRIX  # torch only: no Triton at import
from minillm.layers.cpu_matmul import cpu_linear, cpu_matmul_applies

__all__ = ["GEMV_MAX_M", "GEMV_MODES", "gemv_mode", "set_gemv_mode", "dense_linear", "swiglu_gemv_choice",
           "norm_gemv_choice", "QUANT_GEMV_MAX_M", "SMALL_MATRIX", "w8a8_gemv_max_m",
           "quantized_gemv_applies"]

GEMV_MAX_M = 8  # rows of x up to which the decode GEMV is considered (the engine's decode buckets 1, 2, 4, 8)
GEMV_MODES = ("auto", "off", "on")
# The decode GEMV's choices, made once per (device, dtype, N, K, M): None = F.linear, else the GemvConfig to
# launch. Like Triton's autotuning cache, filled on the first call of each shape (the engine's warm-up before
# CUDA-graph capture) and read on every later call; set_gemv_mode clears it.
_GEMV_DECISIONS: dict[tuple, Any] = {}
# Under the same keys, two more decisions, each timed once (_decide_swiglu, _decide_norm): whether the down GEMV
# also computes SwiGLU in its loads, and whether a qkv / gate_up GEMV also takes the RMSNorm before it.
_SWIGLU_DECISIONS: dict[tuple, bool] = {}
_NORM_DECISIONS: dict[tuple, bool] = {}
_gemv_mode: str | None = None  # None: read MINILLM_GEMV on first use


def gemv_mode() -> str:
    """"auto" (default): per shape, the faster of the GEMV and F.linear, timed once; "off": always F.linear;
    "on": the GEMV wherever it applies. The environment variable MINILLM_GEMV (auto / 0 / 1) sets the start value."""
    global _gemv_mode
    if _gemv_mode is None:
        env = os.environ.get("MINILLM_GEMV", "auto").strip().lower()
        modes = {"auto": "auto", "": "auto", "0": "off", "off": "off", "1": "on", "on": "on"}
        if env not in modes:
            raise ValueError(f"MINILLM_GEMV must be one of auto, 0, 1 (or off, on), got {env!r}")
        _gemv_mode = modes[env]
    return _gemv_mode


def set_gemv_mode(mode: str) -> None:
    """Choose the decode GEMV policy (one of GEMV_MODES) and forget earlier choices. Takes effect for CUDA graphs
    captured afterwards (a captured graph keeps the kernels it recorded)."""
    global _gemv_mode
    if mode not in GEMV_MODES:
        raise ValueError(f"gemv mode must be one of {GEMV_MODES}, got {mode!r}")
    _gemv_mode = mode
    _GEMV_DECISIONS.clear()
    _SWIGLU_DECISIONS.clear()
    _NORM_DECISIONS.clear()


COLD_BYTES = 128 << 20  # weight copies a timing cycles through: > 2x the 50 MB L2 of an H100/H200
CALLS_PER_GRAPH = 16


def _cold_graph_us(fn, weights: list[torch.Tensor], reps: int = 5) -> float:
    """Median GPU time of one fn(w) in microseconds, replayed from a CUDA graph that calls it CALLS_PER_GRAPH
    times, cycling through `weights` (copies of one weight, >= COLD_BYTES in all) so that every call reads its
    weight from memory, not from L2, as in a decode step where the other layers' weights pass through L2 in
    between. A graph, not eager calls, because the engine replays graphs: the launch cost is not what we time."""
    for w in weights:
        fn(w)  # compile, and cuBLAS's heuristics, outside the recording
    torch.cuda.synchronize()
    from minillm.kernels.hardware import graph_us

    return graph_us(lambda i: fn(weights[i % len(weights)]), max(CALLS_PER_GRAPH, len(weights)), reps)


def _cold_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """weight and enough clones of it (COLD_BYTES in all) for _cold_graph_us to read it from memory each call."""
    num_copies = -(-COLD_BYTES // (weight.numel() * weight.element_size()))
    try:
        return [weight] + [weight.clone() for _ in range(num_copies - 1)]
    except torch.cuda.OutOfMemoryError:
        return [weight]  # too little memory to spare: warm weights, still a fair A/B


def _faster(first, second, weight: torch.Tensor) -> bool:
    """Whether first(w) takes less GPU time than second(w), both timed by _cold_graph_us on cold copies of weight."""
    weights = _cold_copies(weight)
    try:
        return _cold_graph_us(first, weights) < _cold_graph_us(second, weights)
    finally:
        del weights


def _decide_gemv(x2: torch.Tensor, weight: torch.Tensor, mode: str):
    """The GemvConfig to use for this (N, K, M), or None for F.linear; timed against F.linear in "auto" mode.

    The two often differ by only 3-5% (H200, Llama-3-8B shapes at M = 1), so the timing must be steadier than
    that: timing single eager calls after flushing L2 flipped between the two from one call to the next
    (2026-12-03: 3 of 7 decisions for qkv, 0 of 7 for o_proj where the GEMV was 13% faster), and a process's
    decode speed with them. Both are timed here as the engine runs them: replayed from a CUDA graph, with cold
    weights."""
    from minillm.kernels.gemv import gemv
    from minillm.kernels.gemv_config import tuned_config

    n, k = weight.shape
    cfg = tuned_config(x2.shape[0], n, k, x2.device)
    if mode == "on":
        return cfg
    return cfg if _faster(lambda w: gemv(x2, w, config=cfg), lambda w: F.linear(x2, w), weight) else None


def _decide_swiglu(gate_up2: torch.Tensor, weight: torch.Tensor, cfg) -> bool:
    """Whether silu(gate) * up computed in the GEMV's loads beats the two launches it replaces (the SiLU-and-mul
    kernel, then the same GEMV), timed as _decide_gemv times. Not a given: on the H200 the fused loads won at
    one row (CUDA cores), but with the tensor-core tiles of 3..8 rows they stall the tile pipeline, and
    SmolLM2's down projection took 7.9 us fused against 4.4 + ~1.5 us apart at 6 rows (20 us with one tile
    that was faster unfused); a verify step of 30 layers lost ~0.3 ms that way (2026-12-04)."""
    from minillm.kernels.fused import silu_and_mul
    from minillm.kernels.gemv import gemv

    return _faster(lambda w: gemv(gate_up2, w, config=cfg, swiglu=True),
                   lambda w: gemv(silu_and_mul(gate_up2), w, config=cfg), weight)


def _decide_norm(x2: torch.Tensor, weight: torch.Tensor, cfg) -> bool:
    """Whether the GEMV that normalises its own input (kernels/gemv.py, gemv_rms_norm: every program recomputes its
    rows' RMS over all of K from L2) beats the two launches it replaces, fused.rms_norm then the same GEMV, timed
    as _decide_gemv times (random residual and unit norm weight: the values do not change the time)."""
    from minillm.kernels.fused import rms_norm
    from minillm.kernels.gemv import gemv, gemv_rms_norm

    residual, norm_weight = torch.randn_like(x2), torch.ones(x2.shape[1], dtype=x2.dtype, device=x2.device)
    return _faster(lambda w: gemv_rms_norm(x2, residual, norm_weight, 1e-6, w, config=cfg),
                   lambda w: gemv(rms_norm(x2, norm_weight, 1e-6, residual)[0], w, config=cfg), weight)


def _fusion_choice(decisions: dict[tuple, bool], x2: torch.Tensor, weight: torch.Tensor, decide):
    """The plain GEMV's config for x2 [M, K] @ W^T where a fusion onto it should run, else None: in "on" mode
    wherever the GEMV runs, in "auto" mode where decide(cfg) timed the fused GEMV faster (once per shape, kept in
    `decisions`; never inside a capture, which then gets the two launches)."""
    cfg = _gemv_choice(x2, weight)
    if cfg is None or gemv_mode() == "on":
        return cfg
    return cfg if _decided(decisions, x2, weight, lambda: decide(cfg)) else None


def _decided(decisions: dict[tuple, Any], x2: torch.Tensor, weight: torch.Tensor, decide) -> Any:
    """decisions' entry for this (device, dtype, N, K, M), made by decide() on first use; None inside a CUDA-graph
    capture, where nothing may be timed (nor compiled): the caller then takes its unfused path this once."""
    key = (x2.device, x2.dtype, weight.shape[0], weight.shape[1], x2.shape[0])
    if key not in decisions:
        if torch.cuda.is_current_stream_capturing():
            return None
        decisions[key] = decide()
    return decisions[key]


def norm_gemv_choice(x: torch.Tensor, weight: torch.Tensor):
    """The GemvConfig with which RMSNorm(x (+ residual)) @ W^T runs as one GEMV that normalises its own loads
    (gemv_rms_norm), or None where the norm should run as its own kernel: dense_linear would not run the GEMV for
    this shape, or ("auto" mode) the fused GEMV timed slower than the two launches (_decide_norm)."""
    if x.device.type != "cuda" or not _gemv_may_apply(x, weight):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    return _fusion_choice(_NORM_DECISIONS, x2, weight, lambda cfg: _decide_norm(x2.contiguous(), weight, cfg))


QUANT_GEMV_MAX_M = 16  # rows the weight-only decode kernels serve (kernels.gemv.MAX_M, kernels.nf4_gemv.MAX_M)


def w8a8_gemv_max_m(weight: torch.Tensor) -> int:
    """Rows up to which a W8A8 layer (FP8, SmoothQuant / LLM.int8) leaves x unquantized and runs the GEMV on its
    codes (W8A16) instead of quantizing x (a launch of its own) and running its 8-bit GEMM. Measured on the H100
    (2026-12-05, bench_weight_only_decode.py): at M = 1 the GEMV took 0.59-1.0x the W8A8 path's time on
    Llama-3-8B's and SmolLM2's shapes; at M = 4 and 16 on Llama-3-8B's it was slower on most (up to 1.9x); on
    SmolLM2's matrices with gemv_config.code_config's 2-row tiles, the FP8 GEMV at M = 2 and 4 took 2.3-3.5 us
    (gate_up 5.2 / 6.6) against the W8A8 path's 5.4-11.6 (gate_up 5.8 / 7.9). So: 4 rows for matrices under
    SMALL_MATRIX weights, one row otherwise."""
    return 4 if weight.numel() < SMALL_MATRIX else 1


def quantized_gemv_applies(x: torch.Tensor, max_rows: int = QUANT_GEMV_MAX_M) -> bool:
    """Whether a quantized layer runs its decode kernel on x: CUDA, fp16/bf16, 1..max_rows rows (int8_rtn and NF4:
    QUANT_GEMV_MAX_M; FP8 and INT8 W8A8: w8a8_gemv_max_m), gemv_mode() not "off", not traced by torch.compile,
    no autograd.

    No timing decision here, unlike dense_linear: for int8_rtn and NF4 the alternative is dequantizing the whole
    weight every call (measured 8-14x slower than the int8 GEMV) for a product bound by reading the weight, which
    the kernels read at 1 byte (int8, FP8) or half a byte (NF4) per weight against bf16's 2."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dim() >= 1
            and 0 < x.numel() <= max_rows * x.shape[-1] and gemv_mode() != "off"
            and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x.requires_grad))


def _gemv_may_apply(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x W^T is a decode GEMV candidate: CUDA, fp16/bf16, at most GEMV_MAX_M rows, a row-major weight,
    not traced by torch.compile, no autograd (the GEMV has no backward)."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and x.dim() >= 1 and 0 < x.numel() <= GEMV_MAX_M * x.shape[-1]
            and weight.dim() == 2 and weight.stride(-1) == 1 and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _gemv_choice(x2: torch.Tensor, weight: torch.Tensor):
    """The GemvConfig dense_linear runs for x2 [M, K] W^T, or None for F.linear (decided on first use)."""
    mode = gemv_mode()
    if mode == "off":
        return None
    return _decided(_GEMV_DECISIONS, x2, weight, lambda: _decide_gemv(x2, weight, mode))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) for a dense weight [N, K]: F.linear, or the decode GEMV (module docstring) on CUDA when x
    has at most GEMV_MAX_M rows in fp16/bf16 and the GEMV won for this shape; on the CPU in fp32, the layout
    (transposed copy, oneDNN blocks, ...) timed fastest for this shape and row count (minillm.layers.cpu_matmul)."""
    if x.device.type == "cpu":
        return cpu_linear(x, weight, bias) if cpu_matmul_applies(x, weight, bias) else F.linear(x, weight, bias)
    if not _gemv_may_apply(x, weight):
        return F.linear(x, weight, bias)
    cfg = _gemv_choice(x.reshape(-1, x.shape[-1]), weight)
    if cfg is None:
        return F.linear(x, weight, bias)
    from minillm.kernels.gemv import gemv
    return gemv(x, weight, bias, config=cfg)


def swiglu_gemv_choice(gate_up: torch.Tensor, weight: torch.Tensor):
    """The GemvConfig with which silu(gate) * up @ W^T runs as one GEMV whose loads compute the activation
    (gate_up [..., 2K] = [gate | up], weight [N, K]), or None where the caller should apply the activation and
    the layer as two steps: dense_linear would not run the GEMV for that product, or ("auto" mode) the fused
    loads timed slower than the two launches (_decide_swiglu)."""
    k = weight.shape[-1] if weight.dim() == 2 else -1
    if gate_up.dim() < 1 or gate_up.shape[-1] != 2 * k:
        return None
    gate = gate_up[..., :k]  # the product's rows and dtype; the GEMV's config is the plain GEMV's for this shape
    if gate.device.type != "cuda" or not _gemv_may_apply(gate, weight):
        return None
    return _fusion_choice(_SWIGLU_DECISIONS, gate.reshape(-1, k), weight,
                          lambda cfg: _decide_swiglu(gate_up.reshape(-1, 2 * k).contiguous(), weight, cfg))
