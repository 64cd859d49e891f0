"""The override hook: how a learner's function runs inside the real engine, without the engine knowing the course.

Wherever the engine, a layer or a kernel wrapper calls a function that is also a course exercise, it asks

    norm_fn = dispatch("ch01.rms_norm", rms_norm)   # the active override, or the reference
    y = norm_fn(x, weight, eps)

and `overriding({"ch01.rms_norm": my_rms_norm})` makes `dispatch` return the learner's function for the
duration of a `with` block. This module is a leaf: it imports nothing from minillm, so kernels, layers and the
engine can all import it, and the course (which sits above the engine) validates and loads a learner's
functions once (minillm.course.overrides.use_overrides) and then hands the plain callables down through here.

The overrides live in a ContextVar, not a module-level dict: nested blocks restore the outer mapping on exit,
and one thread's (or one asyncio task's) overrides never leak into another's. `dispatch` is one dict lookup,
cheap enough for the hot path.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, Mapping

# The one piece of state: the overrides active in this context (an immutable-by-convention dict).
_ACTIVE: ContextVar[dict[str, Callable]] = ContextVar("minillm_active_overrides", default={})


def dispatch(name: str, default: Callable) -> Callable:
    """The active override of exercise `name`, else `default`."""
    return _ACTIVE.get().get(name, default)


@contextmanager
def overriding(functions: Mapping[str, Callable] | None) -> Iterator[None]:
    """Within the block, `dispatch(name, ...)` returns `functions[name]`. The callables are taken as they are:
    validating them (known exercise id, matching signature) is the caller's job, done once, not per step."""
    if not functions:
        yield
        return
    token = _ACTIVE.set({**_ACTIVE.get(), **functions})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_overrides() -> dict[str, Callable]:
    """A copy of the overrides in force here (for logging and tests)."""
    return dict(_ACTIVE.get())
