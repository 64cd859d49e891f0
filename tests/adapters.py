"""Adapters: the only way a graded test reaches an implementation (the pattern of Stanford CS336's tests).

`MINILLM_IMPL` picks whose code runs: `exercises` (the learner's stubs), `solutions` (the reference
answers) or a PATH to a folder laid out like `exercises/` (a submission). Unset, it is `solutions` in the
instructor's repository and `exercises` in a student release (see minillm.course.impl).

`get_impl` returns the chosen implementation's function, guarded (library shortcuts trapped, monkey-patching
detected). `get_reference` returns the answer to compare with: always solutions/, never the learner's code.
"""
from __future__ import annotations

from typing import Callable

from minillm.course.impl import load_function, load_reference


def get_impl(exercise_id: str) -> Callable:
    """The implementation under test of `exercise_id` (e.g. "ch01.rms_norm")."""
    return load_function(exercise_id)


def get_reference(exercise_id: str) -> Callable:
    """The solution of `exercise_id`, to compare against."""
    return load_reference(exercise_id)
