"""Find, load and guard one implementation of an exercise.

An implementation is a folder laid out like `exercises/` (one module per chapter, e.g. `ch01_basics.py`):
`exercises` (the learner's), `solutions` (the reference answers) or any PATH (a submission; a copy of the
whole repository works too, its `exercises/` is used). `MINILLM_IMPL=solutions|exercises|PATH` chooses it;
unset, notebooks and `LLM(..., overrides=...)` use `exercises`, the learner's own code. The graded tests keep
their own default (tests/adapters.py: `solutions` where that folder exists, so `make test` proves the reference).

A function the learner has not attempted yet (its stub still raises "... is not attempted yet") falls back to the
reference, with a banner printed once per function, so that a notebook runs top to bottom from the first day:

    ch05.slot_mapping: not attempted yet, using the reference (write it in exercises/ch05_paged_kv.py)

`MINILLM_FALLBACK=0` (set by `minillm grade --notebooks`) turns the fallback off: a stub then raises.

Every call of a loaded function goes through `guarded` (minillm.course.guard): the library shortcuts the
exercise forbids are trapped, monkey-patching of torch and math is detected and undone. That is the in-process
guard for learning; grading runs the submission in a separate sandboxed process (minillm.course.sandbox).
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from minillm.course import guard as _guard
from minillm.course.guard import ForbiddenCallError, ImplementationError, TamperingError
from minillm.course.registry import EXERCISES, Exercise, get, repo_root
from minillm.course.sync import NOT_ATTEMPTED

__all__ = ["FORBIDDEN", "ForbiddenCallError", "ImplementationError", "TamperingError", "default_impl",
           "engine_module", "forbidden_calls", "guarded", "is_stub", "load_chapter_module", "load_function",
           "load_module", "load_reference", "module_file", "resolve_impl", "stub_in_source"]

NAMED_IMPLS = ("exercises", "solutions")

# Library shortcuts an exercise may not call, with the reason shown to the learner.
FORBIDDEN: dict[str, dict[str, str]] = {
    "ch01.rms_norm": {"torch.nn.functional.rms_norm": "write the normalisation yourself",
                      "torch.rms_norm": "write the normalisation yourself"},
    # kernels/ imports only as minillm.kernels: its references are listed here by their real names
    "ch03.online_softmax_update": {"torch.softmax": "the point is the rescaled running sum, not a full softmax",
                                   "torch.nn.functional.softmax": "the point is the rescaled running sum",
                                   "minillm.kernels.flash_attention.online_softmax_update": "the engine's reference"},
    "ch02.sliding_window_mask": {"minillm.kernels.sliding_window.sliding_window_mask": "the engine's reference"},
    "ch03.causal_block_range": {"minillm.kernels.flash_attention.causal_block_range": "the engine's reference"},
    "ch03.flash_attention_kernel": {
        "torch.nn.functional.scaled_dot_product_attention": "write the attention loop yourself",
        "minillm.kernels.flash_attention.attend_kv_range": "the engine's reference",
        "minillm.kernels.flash_attention.flash_attention": "the engine's kernel; write the inner loop yourself",
        "minillm.kernels.flash_attention.flash_attn_varlen": "the engine's kernel; write the inner loop yourself"},
    "ch04.merge_lse": {"minillm.kernels.decode_merge.merge_lse": "the engine's reference",
                       "minillm.kernels.decode_merge.merge_attention_states": "the engine's reference"},
    "ch04.rms_norm_kernel": {"torch.nn.functional.rms_norm": "write the normalisation in the kernel",
                             "torch.rms_norm": "write the normalisation in the kernel",
                             "minillm.kernels.fused.rms_norm": "the engine's kernel; write your own",
                             "minillm.kernels.fused.rms_norm_kernel": "the engine's reference"},
    # host reads of device values: each makes the host wait for the step in flight (async scheduling's point)
    "ch06.resolve_deferred_ids": {f"torch.Tensor.{m}": "a host read of device values: the host would wait for "
                                  "the step in flight; stay on the device (torch.where, indexing)"
                                  for m in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__index__",
                                            "__float__", "__complex__", "__array__", "__contains__", "__reduce_ex__",
                                            "__dlpack__", "equal", "allclose", "untyped_storage", "data_ptr")},
    # (printing a tensor stays allowed, for debugging: its text is a host read the traps let through)
    "ch07.quantize_per_group": {"torch.quantize_per_channel": "compute the grid yourself",
                                "torch.fake_quantize_per_channel_affine": "compute the grid yourself",
                                "minillm.quant.rtn.quantize": "the engine's RTN", "minillm.quant.rtn.compute_qparams":
                                "the engine's RTN"},
    "ch07.dequantize_per_group": {"minillm.quant.rtn.dequantize": "the engine's reference"},
    "ch07.fp8_scale": {"minillm.quant.fp8.quantize_fp8": "the engine's reference",
                       "minillm.quant.fp8.quantize_fp8_per_token": "the engine's reference"},
    "ch07.smoothquant_scale": {"minillm.quant.smoothquant.smoothing_factors": "the engine's reference"},
    "ch07.dequant_q4_1": {"gguf.quants.dequantize": "the gguf package's dequantizer; unpack the bytes yourself"},
    "ch07.dequant_q4_k": {"gguf.quants.dequantize": "the gguf package's dequantizer; unpack the bytes yourself"},
    "ch08.int4_unpack_kernel": {"torch._weight_int4pack_mm": "write the unpack in the kernel",
                                "minillm.kernels.int4_gemm.int4_gemm": "the engine's kernel",
                                "minillm.kernels.int4_layout.dequantize_int4": "the engine's reference dequantizer"},
}


def default_impl(root: Path | None = None) -> str:
    """What notebooks and overrides use when MINILLM_IMPL is unset: the learner's own exercises/."""
    return "exercises"


def resolve_impl(impl: str | os.PathLike | None = None, root: Path | None = None) -> Path:
    """The folder of implementation `impl` (None: $MINILLM_IMPL, else the default). A PATH must be a folder
    holding at least one of exercises/' modules (a submission may hold only its assignment's chapters): a typo,
    or the wrong folder, would otherwise be graded as a blank submission, every exercise 0. The modules may lie
    at its top level, under its exercises/, or in one folder further down (see _nested_folder)."""
    root = Path(root or repo_root())
    impl = impl or os.environ.get("MINILLM_IMPL") or default_impl(root)
    if str(impl) in NAMED_IMPLS:
        return root / str(impl)
    name = f"implementation {str(impl)!r} (--impl or MINILLM_IMPL)"
    path = Path(impl).expanduser().resolve()
    if not path.is_dir():
        raise ImplementationError(f"{name} is neither 'exercises', 'solutions' nor a folder")
    inner = path / "exercises"
    if inner.is_symlink():  # a submission's own folder, never another one it points to (the solutions, say)
        raise ImplementationError(f"{inner} is a symbolic link (to {os.readlink(inner)}); submit the folder itself")
    folder = inner if inner.is_dir() else path
    modules = sorted({f"{ex.module}.py" for ex in EXERCISES.values()})
    if not any((folder / module).is_file() for module in modules):
        folder = _nested_folder(path, modules, name)
    return folder


NESTED_DEPTH = 3  # how far below a submission's top the modules are looked for (zip of lab1/, of the repository)


def _nested_folder(path: Path, modules: list[str], name: str) -> Path:
    """The one folder below `path` that holds exercise modules, for a submission uploaded as a zip of its parent
    folder (`lab1/ch01_basics.py`, `minillm-course/exercises/ch01_basics.py`): Gradescope unpacks the zip as it
    is, and grading the top as a blank submission would cost the learner every point for a packing detail.

    The shallowest such folder wins, at most NESTED_DEPTH levels down; folders whose name starts with '.' or '__'
    (`__MACOSX` of a Mac zip, `__pycache__`, `.git`) are skipped, and so are symbolic links (os.walk does not
    follow them, so a link to the solutions is never graded). Two folders at that depth (an old copy beside
    the new one) are refused by name: guessing could grade the wrong one."""
    found: dict[int, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        depth = len(here.relative_to(path).parts)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__"))) if depth < NESTED_DEPTH else []
        if depth and any(module in filenames and (here / module).is_file() for module in modules):
            found.setdefault(depth, []).append(here)
    if not found:
        raise ImplementationError(f"{name}: {path} holds none of the exercise modules (a folder laid out like "
                                  f"exercises/: {', '.join(modules)}; looked at its top level, under exercises/ "
                                  f"and up to {NESTED_DEPTH} folders down)")
    shallowest = found[min(found)]
    inner = [f for f in shallowest if f.name == "exercises"]  # a whole repository's copy: its exercises/
    if len(shallowest) > 1 and len(inner) != 1:
        raise ImplementationError(f"{name}: exercise modules in several folders "
                                  f"({', '.join(str(f.relative_to(path)) for f in shallowest)}); submit one")
    return (inner or shallowest)[0]


def module_file(ex: Exercise, folder: Path) -> Path:
    return Path(folder) / f"{ex.module}.py"


def forbidden_calls(ex: Exercise) -> dict[str, str]:
    """The shortcuts `ex` may not call: its registry entry plus the engine's own reference function."""
    reference = ex.source[:-3].replace("/", ".") + "." + ex.function
    if reference.startswith("kernels."):  # kernels/ imports only as minillm.kernels
        reference = "minillm." + reference
    return {**FORBIDDEN.get(ex.id, {}), reference: "that is the engine's reference; write your own"}


def guarded(ex: Exercise, fn: Callable) -> Callable:
    """`fn` with shortcut traps and tamper detection around every call (see minillm.course.guard)."""
    return _guard.guarded(ex.id, fn, forbidden_calls(ex))


# ---- loading ----------------------------------------------------------------------------------------

_MODULES: dict[Path, ModuleType] = {}
_BANNERS: set[str] = set()  # exercises whose fallback banner was printed (once per process)


def load_module(path: Path) -> ModuleType:
    """Import the file at `path` under a private name (never twice in one process)."""
    path = Path(path).resolve()
    if path in _MODULES:
        return _MODULES[path]
    if not path.is_file():
        raise ImplementationError(f"{path} does not exist (expected one module per chapter, e.g. ch01_basics.py)")
    name = f"_minillm_impl_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    before = _guard.snapshot()
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ImplementationError(f"{path.name} failed to import: {type(e).__name__}: {e}") from e
    finally:
        changed = _guard.restore_changes(before)
    if changed:
        raise ImplementationError(f"{path.name} replaced {', '.join(changed[:3])} at import (restored); "
                                  "do not monkey-patch libraries")
    _MODULES[path] = module
    return module


def is_stub(ex: Exercise, fn: Any) -> bool:
    """`fn` (a function or a @triton.jit kernel) still holds its stub line: the learner has not attempted it."""
    try:
        source = inspect.getsource(getattr(fn, "fn", fn))
    except (OSError, TypeError):
        return False
    return f'"{ex.id} is {NOT_ATTEMPTED}' in source


STUB_SOURCE_CAP = 4 << 20  # bytes of a module read to tell whether a function is still its stub


# The grader checks sources from several threads (grader.py's shards). CPython 3.11's ast.parse keeps the depth of the
# tree it is converting in interpreter-wide state, so two threads converting at once can fail with "SystemError: AST
# constructor recursion depth mismatch" (seen in this repository's test run, 2026-12-06): one parse at a time.
_AST_LOCK = threading.Lock()


def stub_in_source(ex: Exercise, path: Path) -> bool:
    """The module file at `path` still holds `ex`'s stub: the learner never wrote the function. Read, never
    imported, so it answers for a module that fails to import too (the grader then shows the nudge, not the hint):

    * a module that parses: the last top-level binding of the function's name must be a def whose body still
      holds the stub line (a def appended later, an assignment or an import replaces the stub);
    * a module with a syntax error: the stub line is still in the file (each names its exercise's id, so the
      other functions of the chapter cannot answer for it).

    A missing or unreadable file, or one over STUB_SOURCE_CAP bytes, is no stub (False)."""
    stub = f'"{ex.id} is {NOT_ATTEMPTED}'
    try:
        if Path(path).is_symlink() or Path(path).stat().st_size > STUB_SOURCE_CAP:
            return False
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    try:
        with _AST_LOCK:
            body = ast.parse(text).body
    except SyntaxError:
        return stub in text
    except (ValueError, RecursionError, MemoryError):  # a null byte, nesting too deep to parse
        return False
    last = None
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound = {node.name}
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = getattr(node, "targets", None) or [node.target]
            bound = {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound = {(a.asname or a.name).split(".")[0] for a in node.names}
        else:
            bound = set()
        if ex.function in bound:
            last = node
    return isinstance(last, ast.FunctionDef) and stub in (ast.get_source_segment(text, last) or "")


def _fallback_wanted(fallback: bool | None) -> bool:
    return fallback if fallback is not None else os.environ.get("MINILLM_FALLBACK", "1") != "0"


def _banner(ex: Exercise, path: Path, root: Path | None) -> None:
    """Say once that `ex` runs the reference, and where the learner's own version goes: exercises/chNN_*.py, or
    the file under the folder MINILLM_IMPL names (a stub there is not in exercises/)."""
    if ex.id not in _BANNERS:
        _BANNERS.add(ex.id)
        own = Path(root or repo_root()) / "exercises" / f"{ex.module}.py"
        where = f"exercises/{ex.module}.py" if Path(path) == own else str(path)
        print(f"{ex.id}: not attempted yet, using the reference (write it in {where}; "
              "MINILLM_IMPL=solutions|exercises|PATH chooses whose code runs)", file=sys.stderr, flush=True)


def load_function(exercise_id: str, impl: str | os.PathLike | None = None, root: Path | None = None,
                  guard: bool = True, fallback: bool | None = None) -> Callable:
    """The function of exercise `exercise_id` from implementation `impl` (see module docstring).

    `fallback` (default: on unless MINILLM_FALLBACK=0): a function not attempted yet is replaced by the
    reference, with a banner naming it."""
    ex = get(exercise_id)
    path = module_file(ex, resolve_impl(impl, root))
    module = load_module(path)
    fn = getattr(module, ex.function, None)
    if not callable(fn):
        raise ImplementationError(f"{module.__file__}: no function {ex.function!r} (exercise {ex.id})")
    _guard.check_provenance(ex.id, fn, module.__file__, ex.function)
    if _fallback_wanted(fallback) and is_stub(ex, fn):
        _banner(ex, path, root)
        return load_reference(exercise_id, root)
    return guarded(ex, fn) if guard else fn


def load_chapter_module(exercise_id: str, impl: str | os.PathLike | None = None, root: Path | None = None,
                        fallback: bool | None = None) -> ModuleType:
    """The chapter module holding `exercise_id` (a Triton kernel is launched through its module's launcher),
    or, when that kernel is not attempted yet and the fallback is on, the reference's module, with the banner."""
    ex = get(exercise_id)
    path = module_file(ex, resolve_impl(impl, root))
    module = load_module(path)
    fn = getattr(module, ex.function, None)
    if fn is not None and _fallback_wanted(fallback) and is_stub(ex, fn):
        _banner(ex, path, root)
        return _reference_module(ex, root)
    return module


def reference_module(exercise_id: str, root: Path | None = None) -> ModuleType:
    """The module that holds `exercise_id`'s reference answer and the code shipped around it."""
    return _reference_module(get(exercise_id), root)


def _reference_module(ex: Exercise, root: Path | None = None) -> ModuleType:
    """solutions/'s chapter module when present, else the engine module whose marked region is the answer."""
    root = Path(root or repo_root())
    if module_file(ex, root / "solutions").is_file():
        return load_module(module_file(ex, root / "solutions"))
    return engine_module(ex)


def engine_module(ex: Exercise) -> ModuleType:
    """The engine module whose marked region is `ex`'s answer (kernels/ imports only as minillm.kernels)."""
    name = ex.source[:-3].replace("/", ".")
    return importlib.import_module("minillm." + name if name.startswith("kernels.") else name)


def load_reference(exercise_id: str, root: Path | None = None) -> Callable:
    """The answer to compare against: solutions/ when present, else the engine's own function."""
    ex = get(exercise_id)
    root = Path(root or repo_root())
    if module_file(ex, root / "solutions").is_file():
        return load_function(exercise_id, "solutions", root, fallback=False)
    return getattr(_reference_module(ex, root), ex.function)
