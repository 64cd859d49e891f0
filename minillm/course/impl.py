"""Find, load and guard one implementation of an exercise.

An implementation is a folder laid out like `exercises/` (one module per chapter, e.g. `ch01_basics.py`):
`exercises` (the learner's), `solutions` (the reference answers) or any PATH (a submission; a copy of the
whole repository works too, its `exercises/` is used). `MINILLM_IMPL` chooses it; unset, the default is
`solutions` where that folder exists (the instructor's repository, so `make test` proves the reference)
and `exercises` otherwise (a student's release).

Every call of a loaded function goes through `guarded`, which
  * traps the library shortcuts an exercise forbids (and the engine's own reference of the exercise),
    failing the call with one line that says what was called, even if the caller swallowed the error;
  * detects monkey-patching of torch, torch.nn.functional, torch.Tensor and math, restores the originals
    and fails the call (a learner's `torch.allclose = lambda *a: True` would otherwise fool the tests).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from minillm.course.registry import Exercise, get, repo_root

NAMED_IMPLS = ("exercises", "solutions")

# Library shortcuts an exercise may not call, with the reason shown to the learner.
FORBIDDEN: dict[str, dict[str, str]] = {
    "ch01.rms_norm": {"torch.nn.functional.rms_norm": "write the normalisation yourself",
                      "torch.rms_norm": "write the normalisation yourself"},
    # kernels/ imports only as minillm.kernels: its references are listed here by their real names
    "ch03.online_softmax_update": {"torch.softmax": "the point is the rescaled running sum, not a full softmax",
                                   "torch.nn.functional.softmax": "the point is the rescaled running sum",
                                   "minillm.kernels.flash_attention.online_softmax_update": "the engine's reference"},
    "ch03.causal_block_range": {"minillm.kernels.flash_attention.causal_block_range": "the engine's reference"},
    "ch03.flash_attention_kernel": {
        "torch.nn.functional.scaled_dot_product_attention": "write the attention loop yourself",
        "minillm.kernels.flash_attention.attend_kv_range": "the engine's reference",
        "minillm.kernels.flash_attention.flash_attention": "the engine's kernel; write the inner loop yourself",
        "minillm.kernels.flash_attention.flash_attn_varlen": "the engine's kernel; write the inner loop yourself"},
    "ch04.merge_lse": {"minillm.kernels.paged_attention.merge_lse": "the engine's reference",
                       "minillm.kernels.paged_attention.merge_attention_states": "the engine's reference"},
    "ch04.rms_norm_kernel": {"torch.nn.functional.rms_norm": "write the normalisation in the kernel",
                             "torch.rms_norm": "write the normalisation in the kernel",
                             "minillm.kernels.fused.rms_norm": "the engine's kernel; write your own",
                             "minillm.kernels.fused.rms_norm_kernel": "the engine's reference"},
}


class ImplementationError(Exception):
    """The implementation cannot be used: missing file, import failure, missing function."""


class ForbiddenCallError(AssertionError):
    """The exercise called a shortcut it must write itself."""


class TamperingError(AssertionError):
    """The exercise replaced a library function (the originals were restored)."""


def default_impl(root: Path | None = None) -> str:
    return "solutions" if (Path(root or repo_root()) / "solutions").is_dir() else "exercises"


def resolve_impl(impl: str | os.PathLike | None = None, root: Path | None = None) -> Path:
    """The folder of implementation `impl` (None: $MINILLM_IMPL, else the default)."""
    root = Path(root or repo_root())
    impl = impl or os.environ.get("MINILLM_IMPL") or default_impl(root)
    if str(impl) in NAMED_IMPLS:
        return root / str(impl)
    path = Path(impl).expanduser().resolve()
    if not path.is_dir():
        raise ImplementationError(f"MINILLM_IMPL={str(impl)!r} is neither 'exercises', 'solutions' nor a folder")
    return path / "exercises" if (path / "exercises").is_dir() else path


def module_file(ex: Exercise, folder: Path) -> Path:
    return Path(folder) / f"{ex.module}.py"


# ---- monkey-patch detection -------------------------------------------------------------------------

def _watched() -> list[tuple[str, Any]]:
    import torch
    import torch.nn.functional as F
    return [("torch", torch), ("torch.nn.functional", F), ("torch.Tensor", torch.Tensor),
            ("torch.testing", torch.testing), ("math", math)]


def snapshot() -> dict[str, dict[str, Any]]:
    return {name: dict(vars(obj)) for name, obj in _watched()}


def restore_changes(before: dict[str, dict[str, Any]]) -> list[str]:
    """Undo every change to the watched namespaces since `before`; returns the dotted names changed.

    Replaced attributes are put back; added ones are removed where they could shadow behaviour (any
    addition to torch.Tensor, e.g. an `__eq__` that hides the inherited one; public non-module additions
    elsewhere: torch imports its submodules lazily, which adds modules, never functions).
    """
    changed = []
    for name, obj in _watched():
        now = dict(vars(obj))
        for attr, value in before[name].items():
            if now.get(attr, _MISSING) is not value:
                changed.append(f"{name}.{attr}")
                try:
                    setattr(obj, attr, value)
                except (AttributeError, TypeError):  # a slot that cannot be set back: report it anyway
                    pass
        for attr in now.keys() - before[name].keys():
            if isinstance(obj, type) or not (attr.startswith("_") or isinstance(now[attr], ModuleType)):
                changed.append(f"{name}.{attr}")
                try:
                    delattr(obj, attr)
                except (AttributeError, TypeError):
                    pass
    return changed


_MISSING = object()


def _resolve(dotted: str) -> tuple[Any, str]:
    """('torch.nn.functional.rms_norm') -> (the torch.nn.functional module, 'rms_norm')."""
    mod_name, attr = dotted.rsplit(".", 1)
    return importlib.import_module(mod_name), attr


def forbidden_calls(ex: Exercise) -> dict[str, str]:
    """The shortcuts `ex` may not call: its registry entry plus the engine's own reference function."""
    reference = ex.source[:-3].replace("/", ".") + "." + ex.function
    return {**FORBIDDEN.get(ex.id, {}), reference: "that is the engine's reference; write your own"}


def guarded(ex: Exercise, fn: Callable) -> Callable:
    """`fn` with shortcut traps and tamper detection around every call."""
    forbidden = forbidden_calls(ex)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        before = snapshot()  # before the traps go in, so that removing them is not mistaken for tampering
        hits: list[str] = []
        traps = []
        for dotted, why in forbidden.items():
            try:
                owner, attr = _resolve(dotted)
            except ImportError:
                continue
            original = getattr(owner, attr, _MISSING)
            if original is _MISSING:
                continue

            def trap(*a: Any, _d: str = dotted, _why: str = why, **k: Any) -> Any:
                hits.append(f"{_d} ({_why})")
                raise ForbiddenCallError(f"{ex.id} must not call {_d}: {_why}")

            setattr(owner, attr, trap)
            traps.append((owner, attr, original))
        try:
            result = fn(*args, **kwargs)
        finally:
            for owner, attr, original in reversed(traps):
                setattr(owner, attr, original)
            changed = restore_changes(before)
        # a learner's try/except cannot hide these: they are checked after the call returns
        if hits:
            raise ForbiddenCallError(f"{ex.id} must not call {hits[0]}")
        if changed:
            raise TamperingError(f"{ex.id} replaced {', '.join(changed[:3])} (restored); do not monkey-patch libraries")
        return result

    return call


# ---- loading ----------------------------------------------------------------------------------------

_MODULES: dict[Path, ModuleType] = {}
_IMPORTS_ANSWERS = re.compile(r"^\s*(from|import)\s+solutions\b|import_module\(\s*['\"]solutions", re.MULTILINE)


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
    before = snapshot()
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ImplementationError(f"{path.name} failed to import: {type(e).__name__}: {e}") from e
    finally:
        changed = restore_changes(before)
    if changed:
        raise ImplementationError(f"{path.name} replaced {', '.join(changed[:3])} at import (restored); "
                                  "do not monkey-patch libraries")
    _MODULES[path] = module
    return module


def load_function(exercise_id: str, impl: str | os.PathLike | None = None, root: Path | None = None,
                  guard: bool = True) -> Callable:
    """The function of exercise `exercise_id` from implementation `impl` (see module docstring)."""
    ex = get(exercise_id)
    module = load_module(module_file(ex, resolve_impl(impl, root)))
    fn = getattr(module, ex.function, None)
    if not callable(fn):
        raise ImplementationError(f"{module.__file__}: no function {ex.function!r} (exercise {ex.id})")
    code_file = getattr(getattr(fn, "__code__", None), "co_filename", module.__file__)
    if Path(code_file).resolve() != Path(module.__file__).resolve():
        raise ImplementationError(f"{ex.id}: {ex.function} must be defined in {Path(module.__file__).name}, "
                                  f"not imported from {code_file}")
    if _IMPORTS_ANSWERS.search(Path(module.__file__).read_text(encoding="utf-8", errors="replace")):
        raise ImplementationError(f"{Path(module.__file__).name} imports solutions/: write your own answers")
    return guarded(ex, fn) if guard else fn


def load_reference(exercise_id: str, root: Path | None = None) -> Callable:
    """The answer to compare against: solutions/ when present, else the engine's own function."""
    ex = get(exercise_id)
    root = Path(root or repo_root())
    if module_file(ex, root / "solutions").is_file():
        return load_function(exercise_id, "solutions", root)
    module = importlib.import_module(ex.source[:-3].replace("/", "."))
    return getattr(module, ex.function)
