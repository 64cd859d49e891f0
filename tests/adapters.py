"""Adapters: the only way a graded test reaches an implementation (the pattern of Stanford CS336's tests).

`MINILLM_IMPL` picks whose code runs: `exercises` (the learner's stubs), `solutions` (the reference answers) or a
PATH to a folder laid out like `exercises/` (a submission). Unset, the tests' default is `solutions` where that
folder exists (the instructor's repository: `make test` proves the reference) and `exercises` otherwise (a
student release). Notebooks and `LLM(..., overrides=...)` default to `exercises` instead (minillm.course.impl).
The tests never fall back to the reference for a stub: a stub is "not attempted".

Under `minillm grade` (MINILLM_SANDBOX=1) `get_impl` returns the submission's function running in a sandboxed
worker process (minillm.course.sandbox), which holds no answers; otherwise the function itself, guarded
(library shortcuts trapped, monkey-patching detected). `get_reference` returns the answer to compare with:
solutions/, or the engine's own function where there is no solutions/; never the learner's code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from minillm.course.impl import forbidden_calls, load_function, load_reference, resolve_impl
from minillm.course.registry import get, repo_root


def tests_default_impl() -> str:
    return os.environ.get("MINILLM_IMPL") or ("solutions" if (Path(repo_root()) / "solutions").is_dir()
                                              else "exercises")


def get_impl(exercise_id: str, submission: str | None = None) -> Callable:
    """The implementation under test of `exercise_id` (e.g. "ch01.rms_norm"); `submission`: the key of one
    submission of the grader's plan (minillm.course.pytest_plugin), graded in its own sandbox worker."""
    if os.environ.get("MINILLM_SANDBOX") == "1":
        from minillm.course.sandbox import SUBMISSIONS, remote_function
        folder = SUBMISSIONS[submission] if submission else resolve_impl(tests_default_impl())
        return remote_function(exercise_id, folder, forbidden_calls(get(exercise_id)), key=submission)
    return load_function(exercise_id, tests_default_impl(), fallback=False)


def get_reference(exercise_id: str) -> Callable:
    """The solution of `exercise_id`, to compare against."""
    return load_reference(exercise_id)
