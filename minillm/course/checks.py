"""Comparisons for graded tests and notebooks: one tolerance table, one-line failure messages.

A graded test compares the learner's output with the solution's (`assert_close`, `assert_equal`) and
checks properties of its own. A failure is one line the grader can show as it is:

    output: max abs err 3.1e-01 (atol 1e-05), max rel err 4.2e-01 (rtol 1e-05), 12 of 60 bad,
    first bad index (0, 5): got 1.234, expected 0.9876
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch

# Graded inputs are drawn from one seed per release (minillm.course.config): the same submission scores the same on
# every run. The grader hands the seed to each test process as MINILLM_GRADE_SEED (`minillm grade --seed N`
# reproduces any run); hidden tests draw from MINILLM_GRADE_HIDDEN_SEED where the instructor set one.
GRADE_SEED: int | None = int(os.environ["MINILLM_GRADE_SEED"]) if os.environ.get("MINILLM_GRADE_SEED") else None
HIDDEN_SEED: int | None = (int(os.environ["MINILLM_GRADE_HIDDEN_SEED"]) if os.environ.get("MINILLM_GRADE_HIDDEN_SEED")
                           else None)


def _release_seed() -> int:
    from minillm.course.config import load
    return load().seed


def graded_seed(base: int) -> int:
    """The seed a graded test uses for its `base`: the release's seed (the hidden seed in tests/graded/hidden)."""
    global GRADE_SEED
    if HIDDEN_SEED is not None and f"{os.sep}hidden{os.sep}" in sys._getframe(1).f_code.co_filename:
        return base + HIDDEN_SEED
    if GRADE_SEED is None:
        GRADE_SEED = _release_seed()
    return base + GRADE_SEED


def kernel_device() -> torch.device:
    """Where the chapters' Triton kernels run: the GPU when Triton compiles for one, else the CPU (its interpreter).

    Graded kernel tests draw their inputs on the CPU from seeded generators (the same numbers on every machine),
    move them here, and compare on the CPU (`assert_close` moves both sides)."""
    from minillm.platform import triton_interpreted
    return torch.device("cuda" if torch.cuda.is_available() and not triton_interpreted() else "cpu")


def kernel_launcher(kernel: Any, exercise_id: str, launcher: str, given: tuple[str, ...] = ()) -> Any:
    """The launcher `launcher` of the module that defines the Triton `kernel` (the learner's, in the sandbox, or
    the reference's), guarded, for a graded test to run the kernel through: a @triton.jit function cannot be
    called from Python.

    The launcher and the `given` functions around the exercise (a kernel that calls the learner's @triton.jit
    helper, say) are the course's code, not the learner's: each must be defined once, as the reference defines
    it (compared as syntax trees: comments and layout may differ), and bound by nothing else, or the test fails
    saying so; and each must still be, when it runs, the function its def compiles to (guard.check_shipped: the
    text can be as shipped while the module rebinds the name through globals()). A launcher rewritten to compute
    in torch made a kernel whose body was `pass` score full marks (a learner simulation found it)."""
    from minillm.course import guard
    from minillm.course.impl import engine_module, guarded, reference_module
    from minillm.course.registry import get
    ex = get(exercise_id)
    jit = getattr(kernel, "__wrapped__", kernel)
    if not hasattr(jit, "fn"):
        raise AssertionError(f"{ex.function} must be a @triton.jit function, got {type(jit).__name__}")
    module = sys.modules[jit.fn.__module__]
    sandbox = getattr(module, "_sandbox", None)  # a stand-in for the submission's module (minillm.course.sandbox)
    path = sandbox.module_file if sandbox is not None else module.__file__
    mine, shipped = _definitions(_read(path)), _definitions(_read(reference_module(exercise_id).__file__))
    for name in (launcher, *given):
        if mine.get(name) != shipped.get(name):
            raise AssertionError(f"`{name}` is the course's code around {ex.id} and must run as shipped (restore it "
                                 f"from the stub); only `{ex.function}` is yours to write")
    if sandbox is not None:  # the module runs in the sandbox's process: it checks the names at every launch
        from minillm.course.sandbox import RemoteFunction
        return guarded(ex, RemoteFunction(sandbox, launcher, shipped=(launcher, *given)))
    if module is engine_module(ex):  # no solutions/ (a student release, the Gradescope archive): the reference is
        return getattr(module, launcher)  # the engine's kernel, and guarding it would trap that very kernel
    guard.check_shipped(module, (launcher, *given), path, ex.id)
    return guarded(ex, getattr(module, launcher))


def _read(path: Any) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


@functools.lru_cache(maxsize=32)  # a test launches through the same two files many times
def _definitions(text: str) -> dict[str, list[str]]:
    """Each name a module's top level binds -> how: the syntax tree of each def or class (decorators included,
    positions and comments not), "bound" for any other binding (an assignment, an import, a loop variable)."""
    import ast
    found: dict[str, list[str]] = {}
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return found
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.setdefault(node.name, []).append(ast.dump(node))
            continue
        for sub in ast.walk(node):
            names: list[str] = []
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
                names = [sub.id]
            elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                names = [(alias.asname or alias.name).split(".")[0] for alias in sub.names]
            for name in names:
                found.setdefault(name, []).append("bound")
    return found


# tl.dot rounds fp32 operands to TF32 (10 bits of mantissa) on a GPU unless told otherwise; the interpreter
# multiplies in full fp32. Graded runs ask Triton for IEEE fp32 everywhere (tests/graded/conftest.py and the
# sandbox's workers), so one fp32 tolerance holds on both and a learner's kernel needs no GPU-only argument.
GRADED_TRITON_ENV = {"TRITON_F32_DEFAULT": "ieee"}


# (atol, rtol) per dtype: the only tolerances graded tests use. fp32 leaves room for a different but
# sound order of operations; bf16 has 8 bits of mantissa (one rounding = 2**-8 relative).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {', '.join(map(str, TOLERANCES))}")
    return TOLERANCES[dtype]


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))


def assert_tensor(x: Any, what: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None) -> None:
    """`x` is a tensor of the given shape and dtype."""
    if not isinstance(x, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise AssertionError(f"{what}: shape {tuple(x.shape)}, expected {tuple(shape)}")
    if dtype is not None and x.dtype != dtype:
        raise AssertionError(f"{what}: dtype {x.dtype}, expected {dtype}")


def assert_close(actual: Any, expected: torch.Tensor, what: str = "output",
                 atol: float | None = None, rtol: float | None = None) -> None:
    """Same shape, dtype and non-finite pattern as `expected`; finite values within the dtype's tolerance."""
    assert_tensor(actual, what, tuple(expected.shape), expected.dtype)
    d_atol, d_rtol = tolerance(expected.dtype) if expected.is_floating_point() else (0.0, 0.0)
    atol, rtol = (d_atol if atol is None else atol), (d_rtol if rtol is None else rtol)
    a = actual.detach().to("cpu", torch.float64).reshape(-1)
    e = expected.detach().to("cpu", torch.float64).reshape(-1)
    if a.numel() == 0:
        return
    both_finite = torch.isfinite(a) & torch.isfinite(e)
    # -inf where the solution has -inf (masked logits), nan where it has nan: the pattern must match exactly
    same_special = (a == e) | (torch.isnan(a) & torch.isnan(e))
    abs_err = torch.where(both_finite, (a - e).abs(), torch.zeros_like(a))
    rel_err = abs_err / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
    bad = torch.where(both_finite, abs_err > atol + rtol * e.abs(), ~same_special)
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    where = (f"first bad index {_index(first, tuple(expected.shape))}: "
             f"got {float(a[first]):.6g}, expected {float(e[first]):.6g}")
    n_value = int((bad & both_finite).sum())
    n_special = int(bad.sum()) - n_value
    parts = []
    if n_value:
        parts.append(f"max abs err {float(abs_err.max()):.2g} (atol {atol:g}), "
                     f"max rel err {float(rel_err[both_finite].max()):.2g} (rtol {rtol:g}), {n_value} of {a.numel()} bad")
    if n_special:
        parts.append(f"{n_special} of {a.numel()} differ in where they are -inf/inf/nan")
    raise AssertionError(f"{what}: {', '.join(parts)}, {where}")


def assert_equal(actual: Any, expected: torch.Tensor, what: str = "output") -> None:
    """Exact equality (masks, indices, token ids), with the first mismatch in the message."""
    assert_tensor(actual, what, tuple(expected.shape), expected.dtype)
    bad = (actual.detach().cpu() != expected.detach().cpu()).reshape(-1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} entries differ, first bad index "
            f"{_index(first, tuple(expected.shape))}: got {actual.reshape(-1)[first].item()}, "
            f"expected {expected.reshape(-1)[first].item()}")


def assert_scalar_close(actual: Any, expected: float, what: str = "value", rtol: float = 1e-9) -> None:
    """A Python number within `rtol` of `expected`."""
    if isinstance(actual, torch.Tensor) and actual.numel() == 1:
        actual = actual.item()
    if isinstance(actual, bool) or not isinstance(actual, (int, float)):
        raise AssertionError(f"{what}: expected a number, got {type(actual).__name__}")
    err = abs(actual - expected)
    if not err <= rtol * abs(expected) + 1e-12:
        raise AssertionError(f"{what}: got {actual:.10g}, expected {expected:.10g} "
                             f"(abs err {err:.2g}, rel err {err / max(abs(expected), 1e-300):.2g}, rtol {rtol:g})")


def _short(args: tuple) -> str:
    """An argument tuple for a one-line message: tensors by their shape."""
    return "(" + ", ".join(f"tensor{list(a.shape)}" if isinstance(a, torch.Tensor) else repr(a) for a in args) + ")"


def _assert_same(actual: Any, expected: Any, what: str, rtol: float) -> None:
    """The reference's answer, whatever its kind: tensors within their dtype's tolerance, numbers within rtol,
    sequences element by element, anything else equal."""
    if isinstance(expected, torch.Tensor):
        assert_close(actual, expected, what)
    elif isinstance(expected, float):
        assert_scalar_close(actual, expected, what, rtol)
    elif isinstance(expected, (tuple, list)) and any(isinstance(e, (torch.Tensor, float)) for e in expected):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            raise AssertionError(f"{what}: expected {type(expected).__name__} of {len(expected)}, got {actual!r:.80}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same(a, e, f"{what}[{i}]", rtol)
    elif actual != expected:
        raise AssertionError(f"{what}: got {actual!r:.80}, expected {expected!r:.80}")


def assert_rejects(impl: Any, valid: tuple, expected: Any, invalid: list[tuple], name: str,
                   rtol: float = 1e-6) -> None:
    """The error-handling part of an exercise's grade: every argument tuple in `invalid` must raise ValueError.
    A function that raises for *every* input would pass that alone and earn points for nothing, so the `valid`
    call must first return `expected` (the reference's answer): refusing is right only where the input is wrong."""
    _assert_same(impl(*valid), expected, f"{name}{_short(valid)}, a valid call", rtol)
    for args in invalid:
        try:
            impl(*args)
        except ValueError:
            continue
        raise AssertionError(f"{name}{_short(args)} must raise ValueError")


def near_the_top_p_cut(logits: torch.Tensor, top_p: torch.Tensor, band: float = 2e-4) -> torch.Tensor:
    """bool [B, V]: the tokens a top-p filter may keep or drop by fp32 rounding alone, where the probability mass
    before them (fp64, most likely first) is within `band` of their row's top_p < 1. The order of the fp32 sums
    (softmax then sort, or sort then softmax) moves them across the cut; a comparison leaves them out."""
    probs, order = torch.softmax(logits.double(), dim=-1).sort(dim=-1, descending=True)
    before = probs.cumsum(dim=-1) - probs
    near = ((before - top_p.double()[:, None]).abs() < band) & (top_p[:, None] < 1)
    return torch.zeros_like(near).scatter(-1, order, near)
