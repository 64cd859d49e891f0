"""The two records of the course: a Chapter and an Exercise (one graded function).

Kept apart from the registry so that each later chapter can list its exercises in its own file,
`minillm/course/catalog/chNN.py`, which the registry collects. No torch here: the registry is imported by
every layer that dispatches.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cached_property

EXERCISE_ID = re.compile(r"^ch(\d\d)\.([a-z_][a-z0-9_]*)$")


@dataclass(frozen=True)
class Chapter:
    number: int
    module: str  # file stem under exercises/ and solutions/, e.g. "ch01_basics"
    title: str


@dataclass(frozen=True)
class Exercise:
    """One graded function. `signature` is the contract: sync fails when the reference's def differs."""

    id: str  # "chNN.name"
    function: str  # the def's name in the reference and in the generated modules
    source: str  # reference file holding the marked region, relative to the repository root
    points: int
    hint: str  # one line, shown by the grader next to a failure
    signature: str  # "rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor"
    called_from: str  # where the engine calls it (through dispatch)
    # the first of two hint levels: shown before any attempt ("not attempted"); `hint`, stronger, after a failure
    nudge: str = ""
    # the arguments the function writes in place (its outputs: a kernel's OUT, the ref counts free_blocks
    # decrements); under `minillm grade` a write into any other argument fails the call (minillm.course.replies)
    writes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not EXERCISE_ID.match(self.id):
            raise ValueError(f"exercise id {self.id!r} must look like 'ch01.rms_norm' (chNN.lower_snake)")
        if self.points < 1:
            raise ValueError(f"exercise {self.id}: points must be >= 1, got {self.points}")
        if self.param_names is None:
            raise ValueError(f"exercise {self.id}: signature {self.signature!r} is not a valid Python def header")
        unknown = [w for w in self.writes if w not in self.param_names]
        if unknown:
            raise ValueError(f"exercise {self.id}: writes {unknown} are not arguments of {self.signature!r}")

    @property
    def chapter(self) -> int:
        return int(EXERCISE_ID.match(self.id).group(1))

    @property
    def module(self) -> str:
        from minillm.course.registry import CHAPTERS

        return CHAPTERS[self.chapter].module

    @cached_property
    def param_names(self) -> tuple[str, ...] | None:
        """Parameter names of the signature, parsed without importing anything."""
        try:
            tree = ast.parse(f"def {self.signature}: pass")
        except SyntaxError:
            return None
        fn = tree.body[0]
        if not isinstance(fn, ast.FunctionDef) or fn.name != self.function:
            return None
        a = fn.args
        return tuple(p.arg for p in a.posonlyargs + a.args + a.kwonlyargs)
