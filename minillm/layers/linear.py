"""Linear layers that load (chapter 1), quantize (chapters 7-8) and later shard (tensor parallelism) their weights.

A Llama block has seven projections, but the engine runs three matmuls for the first six: q, k and v are
packed into one `qkv_proj` and gate and up into one `gate_up_proj` (one launch, one read of the input,
a wider and more efficient GEMM). Checkpoints store them separately under Hugging Face's names, so each
packed layer carries a `weight_loader(param, loaded_weight, shard_id)` that copies one checkpoint tensor
into its slice of the packed parameter. That is vLLM's design, and it is also where tensor parallelism
(chapter 11) will take each rank's slice of the columns or rows.

How the weights are stored and the matmul done is delegated to `layer.quant_method`, a LinearMethod
(minillm.quant.base, chapter 7): it registers the parameters (create_weights), repacks or quantizes them once
the checkpoint is in (process_weights_after_loading) and computes y = x W^T + b (apply). The default,
`UnquantizedLinearMethod`, is a dense weight and `F.linear`; a `quant_config` picks another per layer, by
its name (`prefix`), without touching the model code. Whatever a method stores, each parameter carries this
layer's `weight_loader`, which slices along the parameter's `output_dim`, so q/k/v and gate/up shards load
the same way for every method.

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
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillm.layers.cpu_matmul import cpu_linear, cpu_matmul_applies
from minillm.quant.base import LinearMethod, QuantizationConfig, UnquantizedLinearMethod

__all__ = ["Linear", "QKVLinear", "MergedColumnLinear", "UnquantizedLinearMethod", "default_weight_loader",
           "dense_linear", "swiglu_gemv_choice", "norm_gemv_choice", "set_gemv_mode", "gemv_mode", "GEMV_MAX_M"]

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


def _decide_gemv(x2: torch.Tensor, weight: torch.Tensor, mode: str):
    """The GemvConfig to use for this (N, K, M), or None for F.linear; timed against F.linear in "auto" mode.

    The two often differ by only 3-5% (H200, Llama-3-8B shapes at M = 1), so the timing must be steadier than
    that: timing single eager calls after flushing L2 flipped between the two from one call to the next
    (2026-12-03: 3 of 7 decisions for qkv, 0 of 7 for o_proj where the GEMV was 13% faster), and a process's
    decode speed with them. Both are timed here as the engine runs them: replayed from a CUDA graph, with cold
    weights."""
    from minillm.kernels.gemv import gemv, tuned_config

    n, k = weight.shape
    cfg = tuned_config(x2.shape[0], n, k, x2.device)
    if mode == "on":
        return cfg
    weights = _cold_copies(weight)
    t_gemv = _cold_graph_us(lambda w: gemv(x2, w, config=cfg), weights)
    t_cublas = _cold_graph_us(lambda w: F.linear(x2, w), weights)
    del weights
    return cfg if t_gemv < t_cublas else None


def _decide_swiglu(gate_up2: torch.Tensor, weight: torch.Tensor, cfg) -> bool:
    """Whether silu(gate) * up computed in the GEMV's loads beats the two launches it replaces (the SiLU-and-mul
    kernel, then the same GEMV), timed as _decide_gemv times. Not a given: on the H200 the fused loads won at
    one row (CUDA cores), but with the tensor-core tiles of 3..8 rows they stall the tile pipeline, and
    SmolLM2's down projection took 7.9 us fused against 4.4 + ~1.5 us apart at 6 rows (20 us with one tile
    that was faster unfused); a verify step of 30 layers lost ~0.3 ms that way (2026-12-04)."""
    from minillm.kernels.fused import silu_and_mul
    from minillm.kernels.gemv import gemv

    weights = _cold_copies(weight)
    t_fused = _cold_graph_us(lambda w: gemv(gate_up2, w, config=cfg, swiglu=True), weights)
    t_apart = _cold_graph_us(lambda w: gemv(silu_and_mul(gate_up2), w, config=cfg), weights)
    del weights
    return t_fused < t_apart


def _decide_norm(x2: torch.Tensor, weight: torch.Tensor, cfg) -> bool:
    """Whether the GEMV that normalises its own input (kernels/gemv.py, gemv_rms_norm: every program recomputes its
    rows' RMS over all of K from L2) beats the two launches it replaces, fused.rms_norm then the same GEMV, timed
    as _decide_gemv times (random residual and unit norm weight: the values do not change the time)."""
    from minillm.kernels.fused import rms_norm
    from minillm.kernels.gemv import gemv, gemv_rms_norm

    residual, norm_weight = torch.randn_like(x2), torch.ones(x2.shape[1], dtype=x2.dtype, device=x2.device)
    weights = _cold_copies(weight)
    t_fused = _cold_graph_us(lambda w: gemv_rms_norm(x2, residual, norm_weight, 1e-6, w, config=cfg), weights)
    t_apart = _cold_graph_us(lambda w: gemv(rms_norm(x2, norm_weight, 1e-6, residual)[0], w, config=cfg), weights)
    del weights
    return t_fused < t_apart


def norm_gemv_choice(x: torch.Tensor, weight: torch.Tensor):
    """The GemvConfig with which RMSNorm(x (+ residual)) @ W^T runs as one GEMV that normalises its own loads
    (gemv_rms_norm), or None where the norm should run as its own kernel: dense_linear would not run the GEMV for
    this shape, or ("auto" mode) the fused GEMV timed slower than the two launches (_decide_norm)."""
    if x.device.type != "cuda" or not _gemv_may_apply(x, weight):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    cfg = _gemv_choice(x2, weight)
    if cfg is None or gemv_mode() == "on":
        return cfg
    key = (x.device, x.dtype, weight.shape[0], weight.shape[1], x2.shape[0])
    if key not in _NORM_DECISIONS:
        if torch.cuda.is_current_stream_capturing():
            return None  # no timing inside a capture: the two launches this time
        _NORM_DECISIONS[key] = _decide_norm(x2.contiguous(), weight, cfg)
    return cfg if _NORM_DECISIONS[key] else None


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
    key = (x2.device, x2.dtype, weight.shape[0], weight.shape[1], x2.shape[0])
    if key not in _GEMV_DECISIONS:
        if torch.cuda.is_current_stream_capturing():
            return None  # no timing (nor compiling) inside a capture: cuBLAS this time
        _GEMV_DECISIONS[key] = _decide_gemv(x2, weight, mode)
    return _GEMV_DECISIONS[key]


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
    cfg = _gemv_choice(gate.reshape(-1, k), weight)
    if cfg is None or gemv_mode() == "on":
        return cfg
    key = (gate.device, gate.dtype, weight.shape[0], k, gate.numel() // k)
    if key not in _SWIGLU_DECISIONS:
        if torch.cuda.is_current_stream_capturing():
            return None  # no timing inside a capture: the two launches this time
        _SWIGLU_DECISIONS[key] = _decide_swiglu(gate_up.reshape(-1, 2 * k).contiguous(), weight, cfg)
    return cfg if _SWIGLU_DECISIONS[key] else None


def _check_shape(param_name: str, got: torch.Size, expected: torch.Size | tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(f"weight shape mismatch for {param_name}: got {tuple(got)}, expected {tuple(expected)}")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """Copy a whole checkpoint tensor into a parameter that has no loader of its own (norm weights)."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not packed; got shard_id={shard_id!r}")
    _check_shape("parameter", loaded_weight.shape, param.shape)
    param.data.copy_(loaded_weight)


class Linear(nn.Module):
    """y = x W^T (+ b), W: [output_size, input_size]; storage and matmul belong to `self.quant_method`.

    `quant_config` (one per model) chooses the method for this layer from its `prefix`, its module name in the
    model; `quant_method` passes one directly (tests, the course). Neither: dense.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", quant_method: LinearMethod | None = None) -> None:
        super().__init__()
        if input_size < 1 or output_size < 1:
            raise ValueError(f"Linear sizes must be >= 1, got input_size={input_size}, output_size={output_size}")
        self.input_size = input_size
        self.output_size = output_size
        self.prefix = prefix
        if quant_method is None and quant_config is not None:
            quant_method = quant_config.get_quant_method(self, prefix)
        self.quant_method = quant_method if quant_method is not None else UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, output_size, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy a whole checkpoint tensor into `param` (an unpacked layer has no shards)."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not packed; got shard_id={shard_id!r}")
        _check_shape(type(self).__name__, loaded_weight.shape, param.shape)
        param.data.copy_(loaded_weight)

    def fuses_swiglu(self, gate_up: torch.Tensor) -> bool:
        """Whether forward(gate_up, swiglu=True) can take SwiGLU's silu(gate) * up inside this layer's decode
        GEMV (a dense weight, a GEMV-sized batch where the GEMV beat cuBLAS): one launch fewer per MLP."""
        return type(self.quant_method) is UnquantizedLinearMethod and \
            swiglu_gemv_choice(gate_up, self.weight) is not None

    def fuses_rms_norm(self, x: torch.Tensor) -> bool:
        """Whether forward_rms_norm can take the RMSNorm before this layer inside its decode GEMV (a dense weight,
        no hooks on the layer, no all-reduce after it, a GEMV-sized batch where the fused GEMV timed faster): one
        launch fewer."""
        return type(self.quant_method) is UnquantizedLinearMethod and not self._forward_hooks and \
            not self._forward_pre_hooks and not getattr(self, "reduce_output", False) and \
            norm_gemv_choice(x, self.weight) is not None

    def forward_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                         norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x, residual)[0]), the new residual) in one GEMV (only where fuses_rms_norm(x)): `norm` is the
        RMSNorm before this layer (its weight and eps); the residual returned is x + residual (x without one)."""
        cfg = norm_gemv_choice(x, self.weight) if type(self.quant_method) is UnquantizedLinearMethod else None
        if cfg is None:
            raise ValueError(f"forward_rms_norm needs a dense layer at a GEMV-sized batch on a GPU where the fused "
                             f"GEMV won (check fuses_rms_norm first); got x {tuple(x.shape)} on {x.device}, "
                             f"{type(self.quant_method).__name__}")
        from minillm.kernels.gemv import gemv_rms_norm
        return gemv_rms_norm(x, residual, norm.weight, norm.eps, self.weight, self.bias, config=cfg)

    def forward(self, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        """y = x W^T (+ b). swiglu=True (only where fuses_swiglu(x)): x is [..., 2 * input_size] = [gate | up]
        and the layer's input is silu(gate) * up, computed by the GEMV as it loads x."""
        if swiglu:
            cfg = swiglu_gemv_choice(x, self.weight) if type(self.quant_method) is UnquantizedLinearMethod else None
            if cfg is None:
                raise ValueError(f"swiglu=True needs a dense layer at a GEMV-sized batch on a GPU (check "
                                 f"fuses_swiglu first); got x {tuple(x.shape)} on {x.device}, "
                                 f"{type(self.quant_method).__name__}")
            from minillm.kernels.gemv import gemv
            return gemv(x, self.weight, self.bias, config=cfg, swiglu=True)
        if type(self.quant_method) is UnquantizedLinearMethod:  # dense: F.linear, or the decode GEMV
            return dense_linear(x, self.weight, self.bias)
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        method = type(self.quant_method).__name__
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, quant_method={method}"


class _PackedLinear(Linear):
    """A Linear whose output rows are the concatenation of several checkpoint tensors (shards)."""

    shard_ids: tuple[Any, ...] = ()

    def shard_slice(self, shard_id: Any) -> tuple[int, int]:
        """(offset, size) of a shard along the output dimension."""
        raise NotImplementedError

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id not in self.shard_ids:
            raise ValueError(f"{type(self).__name__} shard_id must be one of {self.shard_ids}, got {shard_id!r}")
        offset, size = self.shard_slice(shard_id)
        dim = getattr(param, "output_dim", 0)
        if dim is None:  # e.g. one per-tensor scale: it cannot hold a slice per shard
            raise ValueError(f"{type(self).__name__}: parameter of shape {tuple(param.shape)} has no output "
                             f"dimension to load shard {shard_id!r} into")
        # rows of this shard (a bias, a per-channel scale narrow the same way; a transposed weight on dim 1)
        target = param.data.narrow(dim, offset, size)
        _check_shape(f"{type(self).__name__} shard {shard_id!r}", loaded_weight.shape, target.shape)
        target.copy_(loaded_weight)


class QKVLinear(_PackedLinear):
    """q, k and v projections in one matmul: output = [q (H*D) | k (KVH*D) | v (KVH*D)]."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 quant_method: LinearMethod | None = None) -> None:
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias=bias, dtype=dtype,
                         quant_config=quant_config, prefix=prefix, quant_method=quant_method)

    def shard_slice(self, shard_id: str) -> tuple[int, int]:
        return {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                "v": (self.q_size + self.kv_size, self.kv_size)}[shard_id]

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (H+2KVH)*D] -> q [T, H*D], k [T, KVH*D], v [T, KVH*D]."""
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class MergedColumnLinear(_PackedLinear):
    """Several projections of the same input side by side (gate_up_proj = [gate | up]); shard ids 0, 1, ..."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", quant_method: LinearMethod | None = None) -> None:
        if not output_sizes or any(s < 1 for s in output_sizes):
            raise ValueError(f"MergedColumnLinear output_sizes must be positive, got {output_sizes}")
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype, quant_config=quant_config,
                         prefix=prefix, quant_method=quant_method)

    def shard_slice(self, shard_id: int) -> tuple[int, int]:
        return sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id]
