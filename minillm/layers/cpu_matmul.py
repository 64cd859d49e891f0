"""The CPU's dense matmul: the same y = x W^T, done in whichever memory layout this CPU's BLAS reads fastest
(chapter 4, beside the GPU's decode GEMV).

On a CPU a decode step is a handful of matrix-vector products, each bound by reading its weight from memory, and
how fast MKL/oneDNN reads it depends on the *layout* it is handed, not only on the bytes. On the 2-core AVX2
development machine (torch 2.13, 1-2 threads, loaded; minimum of interleaved repeats), for SmolLM2-135M's tied
LM head W [49152, 576]:

    1 row:   F.linear(x, W) 14-33 ms    x @ W_T with W_T stored contiguous  8-16 ms
    8 rows:  F.linear(x, W) 71-229 ms   mm(W, x^T)^T 38-62 ms   oneDNN with W prepacked into its blocks 33-45 ms

and the gate_up weight [3072, 576] at 8 rows: F.linear 1.2-1.4 ms, prepacked 0.4-0.5 ms. No layout wins
everywhere: it depends on the shape and the number of rows, so this module *measures*, like an autotuner
(Triton's, or the CUDA GEMV's choice in minillm.layers.gemv_dispatch): the first call of each (N, K, bias, row class)
times every candidate on the real input, interleaved round by round so that a burst of load from another
process hits all alike, keeps each one's fastest time, and caches the winner. The row classes are the decode
step's sizes: one row (batch 1), 2-16 rows (a decode batch or a speculative verify), more (a prefill).

The candidates (CPU_MATMUL_CANDIDATES) all compute in fp32; they differ only in the order of the summation
(the logits stay within the 1e-3 tolerance of tests/test_model.py against Hugging Face's):

- "linear":     F.linear(x, W), row-major W, which MKL reads transposed (the reference);
- "transposed": x @ W_T with W_T = W.t().contiguous() made once per weight, so the BLAS walks W_T's rows;
- "mm":         (W x^T)^T: the big matrix as the left operand, read in its stored order;
- "split":      F.linear on each half of W's rows (fused [gate; up] or [q; k; v]), the halves concatenated;
- "onednn":     oneDNN's inner product on W reordered once into its blocked layout (for ONEDNN_PACK_ROWS rows,
                one copy for all row classes: torch.ops.mkldnn._reorder_linear_weight, what torch.compile's
                CPU "freezing" does).

Memory: "transposed" and "onednn" keep a second copy of each weight that chose them, next to W (which the
embedding lookup, the loaders and every other row class still read): at most one more model's worth of fp32
per candidate kept. SmolLM2-135M (540 MB of fp32 weights) held 820-1030 MB of copies after decoding at batch 1
and 8, 226 MB of it the tied head's two (transposed for 1 row, prepacked for 2-16). A candidate must beat
F.linear by MIN_GAIN to be chosen, so a copy is never kept for a win inside the noise.
`cpu_matmul_extra_bytes()` reports what is held.

MINILLM_CPU_MATMUL (auto, or a candidate's name) forces one candidate wherever it applies; set_cpu_matmul_mode
changes it at run time and forgets the decisions and copies. The copies are tied to the weight tensor and
checked against its storage, its version counter and a sample of its values (writes through `.data`, as the
quantizers and pruners make after their calibration forwards, do not move the version counter); a hand edit of a
few values should be followed by clear_cpu_matmul_cache().
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["CPU_MATMUL_CANDIDATES", "CPU_MATMUL_MODES", "cpu_matmul_applies", "cpu_linear", "cpu_matmul_mode",
           "set_cpu_matmul_mode", "clear_cpu_matmul_cache", "cpu_matmul_decisions", "cpu_matmul_extra_bytes",
           "row_class"]

CPU_MATMUL_CANDIDATES = ("linear", "transposed", "mm", "split", "onednn")
CPU_MATMUL_MODES = ("auto",) + CPU_MATMUL_CANDIDATES
MIN_ELEMENTS = 1 << 16  # smaller weights fit in L2 and are overhead-bound: F.linear, untimed
MIN_GAIN = 0.05         # a candidate other than F.linear must be this much faster (5%) to be kept
_ROUNDS = 7             # timing rounds (each times every candidate once); 3 when one call takes > 20 ms
ONEDNN_PACK_ROWS = 8    # the batch size oneDNN chooses its weight blocking for (the decode batch of the benches)
FLUSH_BYTES = 48 << 20  # read before each timed call: more than the 32 MB L3 of the development CPU
FINGERPRINT_VALUES = 128  # sampled values that tell a weight rewritten through `.data` from the one copied

_DECISIONS: dict[tuple[int, int, bool, str], str] = {}  # (N, K, has bias, row class) -> candidate
_LAYOUTS: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # weight -> _WeightState
_mode: str | None = None  # None: read MINILLM_CPU_MATMUL on first use


def cpu_matmul_mode() -> str:
    """"auto" (default): per shape and row class, the fastest candidate, timed once; a candidate's name: that one
    wherever it applies (F.linear elsewhere). The environment variable MINILLM_CPU_MATMUL sets the start value."""
    global _mode
    if _mode is None:
        env = os.environ.get("MINILLM_CPU_MATMUL", "auto").strip().lower() or "auto"
        if env not in CPU_MATMUL_MODES:
            raise ValueError(f"MINILLM_CPU_MATMUL must be one of {', '.join(CPU_MATMUL_MODES)}, got {env!r}")
        _mode = env
    return _mode


def set_cpu_matmul_mode(mode: str) -> None:
    """Choose the CPU matmul policy (one of CPU_MATMUL_MODES) and forget earlier decisions and weight copies."""
    global _mode
    if mode not in CPU_MATMUL_MODES:
        raise ValueError(f"CPU matmul mode must be one of {CPU_MATMUL_MODES}, got {mode!r}")
    _mode = mode
    clear_cpu_matmul_cache()


def clear_cpu_matmul_cache() -> None:
    """Forget every timed decision and every re-laid-out weight copy (they are rebuilt on the next calls)."""
    _DECISIONS.clear()
    _LAYOUTS.clear()


def cpu_matmul_decisions() -> dict[tuple[int, int, bool, str], str]:
    """A copy of the decisions made so far: (N, K, has bias, row class) -> candidate."""
    return dict(_DECISIONS)


def cpu_matmul_extra_bytes() -> int:
    """Bytes held in weight copies (transposed or prepacked) beside the weights themselves."""
    return sum(t.numel() * t.element_size() for state in _LAYOUTS.values() for t in state.copies.values())


def row_class(rows: int) -> str:
    """The decode-step size class of a matmul with `rows` rows of x: "1", "2-16" or "17+"."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return "1" if rows == 1 else "2-16" if rows <= 16 else "17+"


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def cpu_matmul_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether cpu_linear may replace F.linear: fp32 on the CPU, a strided 2-D weight of at least MIN_ELEMENTS,
    rows to multiply, no autograd graph to record (the copies have no backward), not inside torch.compile."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and weight.layout == torch.strided and weight.device.type == "cpu"
            and weight.numel() >= MIN_ELEMENTS and x.dim() >= 1 and x.numel() > 0 and x.shape[-1] == weight.shape[1]
            and (bias is None or (bias.dtype == torch.float32 and bias.shape == weight.shape[:1]))
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad))))


class _WeightState:
    """What is kept per weight: its re-laid-out copies, a sample of its values when they were made, and, per
    (row class, bias), the call chosen for it."""

    __slots__ = ("stamp", "sample", "view", "copies", "calls")

    def __init__(self, stamp: tuple[int, int], view: torch.Tensor) -> None:
        # `view` looks at the sampled values where they live (made once: three view ops fewer per call), `sample`
        # is their copy from when the state was made
        self.stamp, self.view, self.sample = stamp, view, view.clone()
        self.copies: dict[str, torch.Tensor] = {}
        self.calls: dict[tuple[str, int], tuple[torch.Tensor | None, Callable]] = {}


def _sample(weight: torch.Tensor) -> torch.Tensor:
    """FINGERPRINT_VALUES of the weight's values, spread evenly over it (a strided view: no copy)."""
    flat = weight.reshape(-1)
    return flat[::max(1, flat.numel() // FINGERPRINT_VALUES)][:FINGERPRINT_VALUES]


def _state(weight: torch.Tensor) -> _WeightState:
    """This weight's state, started afresh if its storage, its version or its values changed since it was made.

    The version counter sees in-place updates made under torch.no_grad, but not writes through `.data`
    (`w.data.copy_(...)`, `w.data.mul_(mask)`), which is how GPTQ, AWQ, SmoothQuant and pruning update a layer
    after running calibration batches through it. A copy laid out before such a write would keep serving the old
    weight, so while copies exist every call also compares a sample of the values (a few microseconds against a
    matmul of milliseconds). A write that changes none of the sampled values (one weight edited by hand) can go
    unseen: call clear_cpu_matmul_cache() after it."""
    try:
        stamp = (weight.data_ptr(), weight._version)
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
        stamp = (weight.data_ptr(), -1)
    state = _LAYOUTS.get(weight)
    if state is None or state.stamp != stamp or (state.copies and not torch.equal(state.view, state.sample)):
        state = _LAYOUTS[weight] = _WeightState(stamp, _sample(weight))
    return state


def _layout(weight: torch.Tensor, name: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    copies = _state(weight).copies
    if name not in copies:
        with torch.no_grad():
            copies[name] = make()
    return copies[name]


def _candidate(name: str, weight: torch.Tensor, bias: torch.Tensor | None):
    """fn(x2 [M, K]) -> [M, N] contiguous for candidate `name`, or None where it does not apply."""
    n = weight.shape[0]
    if name == "linear":
        return lambda x2: F.linear(x2, weight, bias)
    if name == "transposed":
        w_t = _layout(weight, "transposed", lambda: weight.t().contiguous())
        return (lambda x2: torch.mm(x2, w_t)) if bias is None else (lambda x2: torch.addmm(bias, x2, w_t))
    if name == "mm":
        if bias is None:
            return lambda x2: torch.mm(weight, x2.t()).t().contiguous()
        bias_col = bias.unsqueeze(1)
        return lambda x2: torch.addmm(bias_col, weight, x2.t()).t().contiguous()
    if name == "split":
        if n % 2 or n < 2:
            return None
        halves, biases = weight.split(n // 2), (None, None) if bias is None else bias.split(n // 2)
        return lambda x2: torch.cat([F.linear(x2, w, b) for w, b in zip(halves, biases)], dim=-1)
    if name == "onednn":
        if not _onednn_available():
            return None
        # one packing for every row class (blocked for batch ONEDNN_PACK_ROWS): a copy per class would cost a
        # model's worth of memory each, for no gain measured at 1 to 32 rows
        packed = _layout(weight, "onednn",
                         lambda: torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), ONEDNN_PACK_ROWS))
        return lambda x2: torch.ops.mkldnn._linear_pointwise(x2.contiguous(), packed, bias, "none", [], "")
    raise ValueError(f"CPU matmul candidate must be one of {CPU_MATMUL_CANDIDATES}, got {name!r}")


def _decide(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows_class: str) -> str:
    """Time every applicable candidate on this input (interleaved rounds, the median call of each) and return the
    winner; drop the copies the losers made. Anything but F.linear must win by MIN_GAIN.

    Each timed call starts with the caches emptied (a FLUSH_BYTES buffer read first): in the model the other
    layers' weights pass through the caches between two calls of this one, so the weight comes from memory,
    and a 1.3 MB o_proj timed hot in L2/L3 would rank the candidates by the wrong cost."""
    made_before = set(_state(weight).copies)
    fns = {c: f for c in CPU_MATMUL_CANDIDATES if (f := _candidate(c, weight, bias)) is not None}
    times: dict[str, list[float]] = {name: [] for name in fns}
    flush = torch.zeros(FLUSH_BYTES // 4, dtype=torch.float32)
    rounds = _ROUNDS
    for r in range(rounds + 1):  # round 0 warms up (oneDNN builds its primitive on the first call)
        for name, fn in fns.items():
            flush.sum()  # read, not written: no dirty lines left to be written back inside the timed call
            start = time.perf_counter()
            fn(x2)
            elapsed = time.perf_counter() - start
            if r:
                times[name].append(elapsed)
            elif elapsed > 0.02:
                rounds = 3
        if r >= rounds:
            break
    best = {name: sorted(t)[len(t) // 2] for name, t in times.items()}  # the median round: typical, not lucky
    winner = min(best, key=best.get)
    if best[winner] > (1.0 - MIN_GAIN) * best["linear"]:
        winner = "linear"
    copies = _state(weight).copies
    for key in [k for k in copies if k not in made_before and k != winner]:
        del copies[key]  # made for a loser of this timing
    return winner


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b) like F.linear, in the layout chosen for this (N, K, bias, row class); the caller checks
    cpu_matmul_applies first (dense_linear does)."""
    n, k = weight.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # (a decode step's x is 2-D already: no reshape op to dispatch)
    rows_class = row_class(x2.shape[0])
    state = _state(weight)
    call = state.calls.get((rows_class, id(bias)))
    if call is None or call[0] is not bias:
        call = state.calls[(rows_class, id(bias))] = (bias, _choose(x2, weight, bias, rows_class))
    fn = call[1]
    return fn(x2) if x2 is x else fn(x2).reshape(*x.shape[:-1], n)


def _choose(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows_class: str) -> Callable:
    """The call for this weight and row class: the mode's candidate, or the timed decision for its shape."""
    mode = cpu_matmul_mode()
    if mode == "auto":
        key = (weight.shape[0], weight.shape[1], bias is not None, rows_class)
        choice = _DECISIONS.get(key)
        if choice is None:
            choice = _DECISIONS[key] = _decide(x2, weight, bias, rows_class)
    else:
        choice = mode
    fn = _candidate(choice, weight, bias)
    # a forced candidate that does not apply here (an odd N to split, no oneDNN): F.linear
    return fn if fn is not None else _candidate("linear", weight, bias)
