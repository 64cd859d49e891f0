"""Guards around a learner's function: shortcut traps, tamper detection and a provenance check.

This module imports nothing from minillm (only the standard library, and torch when a guard runs): the grader's
sandbox worker (minillm/course/sandbox_worker.py), which may not import minillm at all, loads it as a plain file.
The in-process path (notebooks, `LLM(..., overrides=...)`) uses the same functions through minillm.course.impl.

* Traps: each library shortcut an exercise forbids (`torch.nn.functional.rms_norm` for ch01.rms_norm, ...) is
  replaced by a function that records the call and raises. In the sandbox the traps go in before the learner's
  module is imported and stay, so a shortcut bound at import time (`from torch import rms_norm as mine`) is the
  trap too. A learner's try/except cannot hide a hit: hits are checked after the call returns.
* Tamper detection: torch, torch.nn.functional, torch.Tensor, torch.testing and math are snapshotted; a call
  (or an import) that replaced or added attributes fails, and the originals are put back.
* Provenance: every Python function the exercise's function can reach (closure cells, defaults, functools
  wrappers and partials, the globals its code names, a @triton.jit kernel's `.fn`) must come from the
  submission's own file or from an installed library: code built with exec/compile or copied in from
  elsewhere is refused, with the name of the function that came from elsewhere.
"""
from __future__ import annotations

import functools
import importlib
import math
import os
import sys
import types
from typing import Any, Callable

_MISSING = object()
_THIS_FILE = os.path.realpath(__file__)
_GRADER_FILES = {"guard.py", "sandbox_worker.py", "sandbox_template.py"}  # the sandbox worker's own files
_CACHES = {"__slotnames__"}  # attributes the standard library caches on classes (copyreg, when pickling)


class ImplementationError(Exception):
    """The implementation cannot be used: missing file, import failure, missing function, foreign code."""


class ForbiddenCallError(AssertionError):
    """The exercise called a shortcut it must write itself."""


class TamperingError(AssertionError):
    """The exercise replaced a library function (the originals were restored)."""


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
        for attr in now.keys() - before[name].keys() - _CACHES:
            if isinstance(obj, type) or not (attr.startswith("_") or isinstance(now[attr], types.ModuleType)):
                changed.append(f"{name}.{attr}")
                try:
                    delattr(obj, attr)
                except (AttributeError, TypeError):
                    pass
    return changed


# ---- shortcut traps ---------------------------------------------------------------------------------

def _resolve(dotted: str) -> tuple[Any, str]:
    """('torch.nn.functional.rms_norm') -> (the torch.nn.functional module, 'rms_norm'); a class's method too:
    ('torch.Tensor.tolist') -> (torch.Tensor, 'tolist')."""
    mod_name, attr = dotted.rsplit(".", 1)
    try:
        return importlib.import_module(mod_name), attr
    except ImportError:
        if "." not in mod_name:
            raise
        parent, cls = mod_name.rsplit(".", 1)
        owner = getattr(importlib.import_module(parent), cls, None)
        if not isinstance(owner, type):
            raise
        return owner, attr


def install_traps(exercise_id: str, forbidden: dict[str, str], hits: list[str]) -> list[Callable[[], None]]:
    """Replace each forbidden dotted name by a trap that appends to `hits` and raises, and trap the forbidden torch
    operations whatever their spelling (see OperatorTrap); returns what undoes it, one callable per trap.
    Names whose module cannot be imported (the engine's, inside the sandbox) are skipped: nothing can call them."""
    undo: list[Callable[[], None]] = []
    operators: dict[str, tuple[str, str, bool]] = {}  # a torch operation's name -> (forbidden name, why, a method)
    for dotted, why in forbidden.items():
        try:
            owner, attr = _resolve(dotted)
        except ImportError:
            continue
        original = getattr(owner, attr, _MISSING)
        if original is _MISSING:
            continue
        method = isinstance(owner, type)
        if method and attr not in vars(owner):
            original = _MISSING  # inherited: removing the trap must not leave a copy on the class
        if dotted.startswith("torch."):
            operators.setdefault(attr, (dotted, why, method))

        def trap(*a: Any, _d: str = dotted, _why: str = why, _original: Any = getattr(owner, attr),
                 _method: bool = method, **k: Any) -> Any:
            if _method and _trusted_caller(sys._getframe(1)):  # torch itself, or the grader's own machinery
                return _original(*a, **k)
            hits.append(f"{_d} ({_why})")
            raise ForbiddenCallError(f"{exercise_id} must not call {_d}: {_why}")

        # torch hands a trapped method's class attribute to the operator trap, which knows it by these names
        trap.__name__, trap.__qualname__ = attr, f"{owner.__name__}.{attr}" if method else attr
        trap.__module__ = owner.__module__ if method else owner.__name__
        setattr(owner, attr, trap)
        undo.append(functools.partial(_put_back, owner, attr, original))
    if operators:
        mode = operator_trap(exercise_id, operators, hits)
        mode.__enter__()
        undo.append(lambda: mode.__exit__(None, None, None))
    return undo


def _put_back(owner: Any, attr: str, original: Any) -> None:
    if original is _MISSING:
        delattr(owner, attr)
    else:
        setattr(owner, attr, original)


def _operator_name(func: Any) -> str:
    """The name of the torch operation `func` runs, however it was reached: torch.rms_norm and its C binding
    torch._C._VariableFunctions.rms_norm, torch.ops.aten.rms_norm (an operator packet or overload), x.softmax."""
    schema = getattr(func, "_schema", None)
    qualified = schema.name if schema is not None else getattr(func, "_qualified_op_name", None)
    return str(qualified).split("::")[-1] if qualified else str(getattr(func, "__name__", ""))


def _spelling(func: Any, name: str) -> str:
    if hasattr(func, "_schema") or hasattr(func, "_qualified_op_name"):
        return f"torch.ops.{func}"  # an operator overload or packet prints as aten.rms_norm(.default)
    return f"{getattr(func, '__module__', None) or 'torch'}.{getattr(func, '__qualname__', name)}"


_OPERATOR_TRAPS: list[Any] = []  # the operator traps in force, checked after every call (check_after_call)


def operator_trap(exercise_id: str, operators: dict[str, tuple[str, str, bool]], hits: list[str]) -> Any:
    """A TorchFunctionMode that sees every call of torch's API (functions, Tensor methods, torch.ops) and traps the
    forbidden operations by their name: a trap on the name `torch.rms_norm` alone misses its C binding, its
    torch.ops spelling and the original the trap itself keeps; one on `torch.Tensor.tolist` misses
    `torch._C.TensorBase.tolist`. A forbidden method stays open to the grader's own code (see _served_grader).
    (Code that turns torch function modes off escapes it: check_after_call notices a trap taken off the stack, not
    one stepped around within a call.)"""
    from torch.overrides import TorchFunctionMode

    class OperatorTrap(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            name = _operator_name(func)
            if name in operators and not (operators[name][2] and _served_grader(sys._getframe(1))):
                dotted, why, _ = operators[name]
                spelling = _spelling(func, name)
                hits.append(f"{dotted} ({why}" + ("" if spelling == dotted else f"; reached as {spelling}") + ")")
                raise ForbiddenCallError(f"{exercise_id} must not call {dotted}: {why}")
            return func(*args, **(kwargs or {}))

        def __enter__(self) -> Any:
            _OPERATOR_TRAPS.append(self)
            return super().__enter__()

        def __exit__(self, *exc: Any) -> Any:
            _OPERATOR_TRAPS.remove(self)
            return super().__exit__(*exc)

    return OperatorTrap()


def _trusted_caller(frame: Any) -> bool:
    """A trapped *method* (a class attribute such as torch.Tensor.tolist) is forbidden to the learner's code only:
    torch's own Python code and the grader's may call it (in the sandbox the traps stay in for the worker's whole
    life, and the worker encodes results with .numpy()). The grader's files are copied to temporary folders, so
    they are known by name; a submission cannot pose as one (its module file is named by the grader, and code
    compiled under another file name fails the provenance check)."""
    import torch
    path = os.path.realpath(frame.f_code.co_filename)
    return path.startswith(os.path.dirname(os.path.realpath(torch.__file__)) + os.sep) or \
        os.path.basename(path) in _GRADER_FILES


def _served_grader(frame: Any) -> bool:
    """The first caller outside torch's own Python code is one of the grader's files (see _trusted_caller): torch's
    Python methods (Tensor.__array__, Tensor.__repr__) reach the operator trap through torch.overrides, so the frame
    that matters is the one that called torch."""
    import torch
    here = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
    while frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(here):
        frame = frame.f_back
    return frame is not None and os.path.basename(frame.f_code.co_filename) in _GRADER_FILES


def remove_traps(undo: list[Callable[[], None]]) -> None:
    """Put back what install_traps replaced (an inherited method: delete the trap from the class)."""
    for restore in reversed(undo):
        restore()


def _operator_traps_removed() -> bool:
    """Put back an operator trap the call took off torch's mode stack; True if there was one."""
    if not _OPERATOR_TRAPS:
        return False
    from torch.overrides import _get_current_function_mode_stack
    stack = _get_current_function_mode_stack()
    missing = [m for m in _OPERATOR_TRAPS if all(m is not s for s in stack)]
    for mode in missing:
        _OPERATOR_TRAPS.remove(mode)
        mode.__enter__()
    return bool(missing)


def check_after_call(exercise_id: str, hits: list[str], before: dict[str, dict[str, Any]]) -> None:
    """Raise for a trapped shortcut or a patched library (restoring it), whatever the call did with errors."""
    changed = restore_changes(before) + (["torch's function mode stack"] if _operator_traps_removed() else [])
    if hits:
        first = hits[0]
        hits.clear()
        raise ForbiddenCallError(f"{exercise_id} must not call {first}")
    if changed:
        raise TamperingError(f"{exercise_id} replaced {', '.join(changed[:3])} (restored); do not monkey-patch libraries")


def guarded(exercise_id: str, fn: Callable, forbidden: dict[str, str]) -> Callable:
    """`fn` with shortcut traps set for the duration of each call, and tamper detection around it
    (the in-process form, for notebooks; the sandbox keeps its traps for the worker's whole life)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        before = snapshot()  # before the traps go in, so that removing them is not mistaken for tampering
        hits: list[str] = []
        undo = install_traps(exercise_id, forbidden, hits)
        try:
            result = fn(*args, **kwargs)
        finally:
            remove_traps(undo)
            check_after_call(exercise_id, hits, before)
        return result

    return call


# ---- provenance -------------------------------------------------------------------------------------



def _library_dirs() -> tuple[str, ...]:
    """Where installed code lives (the standard library and site-packages): calls into it are allowed."""
    dirs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix) if p}
    return tuple(d.rstrip(os.sep) + os.sep for d in dirs)


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def check_shipped(module: Any, names: tuple[str, ...] | list[str], own_file: str, exercise_id: str) -> None:
    """Refuse when one of `names` (the course's code around an exercise: a Triton kernel's launcher, a kernel
    it calls) is not, as the module holds it now, the function the file's top-level `def` of that name compiles
    to. The file's text is checked against the reference elsewhere (minillm.course.checks.kernel_launcher); this
    catches a module that keeps that text but rebinds the name while it runs (through globals(), setattr or
    __code__), so that another function would run. A @triton.jit object is compared by its Python function."""
    if not names:
        return
    compiled = _top_level_code(os.path.realpath(own_file))
    for name in names:
        fn = getattr(module, name, None)
        while type(fn) in _triton_kernel_types():  # @triton.autotune over @triton.jit over the def: .fn twice
            fn = getattr(fn, "fn", None)
        if getattr(fn, "__code__", None) != compiled.get(name):
            raise TamperingError(f"`{name}` is the course's code around {exercise_id} and must run as shipped: the "
                                 f"module rebinds it to another function while it runs; only the exercise is yours")


def _triton_kernel_types() -> tuple[type, ...]:
    """Triton's own kernel classes (compiled, interpreted, autotuned, heuristics), matched by identity: a subclass
    the submission defines could hold the shipped def as .fn and run something else when launched."""
    places = (("triton.runtime.jit", "JITFunction"), ("triton.runtime.interpreter", "InterpretedFunction"),
              ("triton.runtime.autotuner", "Autotuner"), ("triton.runtime.autotuner", "Heuristics"))
    return tuple(t for module, name in places if isinstance(t := getattr(sys.modules.get(module), name, None), type))


@functools.lru_cache(maxsize=16)
def _top_level_code(path: str) -> dict[str, types.CodeType]:
    """Each top-level def of the module file at `path` -> its code object, compiled as its import compiled it (no
    compiler flags inherited from this file): code objects are equal only when their bytecode, constants, names
    and line table agree. Read and compiled once per file and process, not at every launch."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    try:
        module = compile(text, "<checked>", "exec", dont_inherit=True)
    except SyntaxError:
        return {}
    return {c.co_name: c for c in module.co_consts if isinstance(c, types.CodeType)}


def check_provenance(exercise_id: str, fn: Any, own_file: str, name: str | None = None,
                     max_objects: int = 2000) -> None:
    """Refuse `fn` (the module's attribute `name`) unless every Python function it reaches is defined in
    `own_file` or in an installed library."""
    own = os.path.realpath(own_file)
    libraries = _library_dirs()
    seen: set[int] = set()
    todo: list[tuple[Any, str]] = [(fn, name or getattr(fn, "__name__", repr(fn)))]
    while todo and len(seen) < max_objects:
        obj, label = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, functools.partial):
            todo += [(obj.func, f"{label} (a functools.partial of it)")]
            todo += [(a, label) for a in (*obj.args, *obj.keywords.values())]
            continue
        if isinstance(obj, types.MethodType):
            todo.append((obj.__func__, label))
            continue
        if hasattr(obj, "fn") and type(obj).__module__.startswith("triton"):  # a @triton.jit function
            todo.append((obj.fn, label))
            continue
        if not isinstance(obj, types.FunctionType):
            continue
        code_file = os.path.realpath(obj.__code__.co_filename)
        if code_file.startswith(libraries) or code_file == _THIS_FILE:
            continue  # torch, triton, the standard library or a trap: a forbidden shortcut is the traps' job
        if code_file != own:
            where = obj.__code__.co_filename
            how = "exec/compile" if where.startswith("<") else where
            raise ImplementationError(f"{exercise_id}: {label} is code from {how}, not from {os.path.basename(own)}: "
                                      "write the answer in your file")
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None:
            todo.append((wrapped, label))
        for cell in obj.__closure__ or ():
            try:
                todo.append((cell.cell_contents, label))
            except ValueError:  # an empty cell
                pass
        todo += [(d, label) for d in (obj.__defaults__ or ())]
        todo += [(d, label) for d in (obj.__kwdefaults__ or {}).values()]
        for code in _code_objects(obj.__code__):
            for name in code.co_names:
                value = obj.__globals__.get(name, _MISSING)
                if value is not _MISSING and not isinstance(value, types.ModuleType):
                    todo.append((value, f"{label} -> {name}"))
