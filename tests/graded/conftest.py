"""Graded tests' process settings: Triton's fp32 dots in IEEE fp32 on a GPU, as under the interpreter
(see minillm.course.checks.GRADED_TRITON_ENV; the sandbox's workers get the same)."""
import os

from minillm.course.checks import GRADED_TRITON_ENV

os.environ.update(GRADED_TRITON_ENV)
