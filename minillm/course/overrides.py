"""Run a learner's function inside the real engine.

Wherever the engine calls an exercise's function it goes through `dispatch`:

    norm_fn = dispatch("ch01.rms_norm", rms_norm)   # the active override, or the reference
    y = norm_fn(x, weight, eps)

and `use_overrides({"ch01.rms_norm": my_rms_norm})` (what `LLM(..., overrides=...)` wraps around each step)
makes `dispatch` return the learner's function for the duration of a `with` block. Overrides live in a
ContextVar, not a module-level dict: nested blocks restore the outer mapping on exit, and one thread's
overrides never leak into another's.

A value may be a callable, the name of an implementation ("exercises", "solutions" or a submission folder),
which loads that implementation's function, or None: the default implementation, MINILLM_IMPL or else the
learner's exercises/ (see minillm.course.impl). A function loaded by name that is not attempted yet falls back
to the reference with a banner naming it (`MINILLM_FALLBACK=0` turns that off).
"""
from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

from minillm.course.registry import EXERCISES, get
from minillm.hooks import active_overrides, dispatch, overriding

__all__ = ["OverrideError", "active_overrides", "dispatch", "resolve_overrides", "use_overrides",
           "validate_override"]


class OverrideError(TypeError):
    """An override names an unknown exercise or has the wrong signature."""


def validate_override(name: str, fn: Callable) -> None:
    """Raise OverrideError unless `name` is registered and `fn` takes the reference's parameters, in order."""
    if name not in EXERCISES:
        raise OverrideError(f"override {name!r} is not a registered exercise; registered: {', '.join(EXERCISES)}")
    ex = get(name)
    if not callable(fn):
        raise OverrideError(f"override for {name} must be callable, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as e:
        raise OverrideError(f"override for {name}: cannot read the signature of {fn!r} ({e})") from None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        names = tuple(str(p) for p in params)
        raise OverrideError(f"override for {name} takes {names}; spell out the parameters {ex.param_names} "
                            f"(reference: def {ex.signature})")
    names = tuple(p.name for p in params)
    if names != ex.param_names:
        raise OverrideError(f"override for {name} has parameters {names}, expected {ex.param_names} "
                            f"(reference: def {ex.signature})")


def _as_callable(name: str, value: Callable | str | os.PathLike | None) -> Callable:
    if value is None or isinstance(value, (str, os.PathLike)):
        from minillm.course.impl import load_function  # lazy: it imports torch
        return load_function(name, value)
    return value


def resolve_overrides(mapping: Mapping[str, Callable | str | os.PathLike | None] | None) -> dict[str, Callable]:
    """Validate every entry (registered id, loadable, matching signature) and return plain callables, ready for
    `minillm.hooks.overriding`. Done once (LLM(..., overrides=...) calls it at construction), not per step."""
    for name in mapping or {}:
        if name not in EXERCISES:
            raise OverrideError(f"override {name!r} is not a registered exercise; registered: {', '.join(EXERCISES)}")
    resolved = {name: _as_callable(name, fn) for name, fn in (mapping or {}).items()}
    for name, fn in resolved.items():
        validate_override(name, fn)
    return resolved


@contextmanager
def use_overrides(mapping: Mapping[str, Callable | str | os.PathLike | None] | None) -> Iterator[dict[str, Callable]]:
    """Within the block, `dispatch(name, ...)` returns `mapping[name]`; every entry is validated first."""
    resolved = resolve_overrides(mapping)
    with overriding(resolved):
        yield resolved
