"""The course configuration an instructor sets for a release: the graded inputs' seed and the assignment's chapters.

`minillm course release DIR --seed N --chapters ch05,ch06` and `minillm course gradescope ZIP ...` write it as
`course.json` at the top of the copy they make; `minillm grade` and the Gradescope autograder read it back:

    {"seed": 1234, "chapters": [5, 6]}                       # a student release
    {"seed": 1234, "chapters": [5, 6], "hidden_seed": 987}   # the autograder archive only

* `seed`: every graded input is drawn from it (minillm.course.checks.graded_seed), so the same submission scores
  the same on every run and on every machine; `minillm grade --seed N` reproduces any run. Without a course.json
  it is DEFAULT_SEED.
* `chapters`: the assignment. `minillm grade` with no target grades exactly these chapters (all when absent).
* `hidden_seed` (instructor's option): the hidden tests (tests/graded/hidden) draw from it instead, a seed the
  learner never sees: it is written only into the autograder archive, never into a student release.
* `time_budget_s`: seconds the whole grading run may take (`minillm grade --time-budget S` overrides it); the
  exercises not graded by then fail with "not run: the submission used up the grading time budget". Absent: no
  budget. The autograder archive always carries one (GRADESCOPE_TIME_BUDGET_S unless the instructor sets it),
  because Gradescope kills an autograder that runs past the assignment's limit and then shows no score at all.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minillm.course.registry import CHAPTERS, repo_root

CONFIG_FILE = "course.json"
DEFAULT_SEED = 20_241  # the seed of a course without course.json: fixed, so scores never drift between runs
MAX_SEED = 2**31 - 1
# Gradescope's default autograder timeout is 10 minutes (up to 40 in the assignment's settings): 8 minutes of
# grading leaves two for run_autograder's start and for writing results.json. Raise both together, never this alone.
GRADESCOPE_TIME_BUDGET_S = 480.0


@dataclass(frozen=True)
class CourseConfig:
    seed: int = DEFAULT_SEED
    chapters: tuple[int, ...] = field(default_factory=tuple)  # empty: every chapter
    hidden_seed: int | None = None
    time_budget_s: float | None = None  # None: no budget

    def __post_init__(self) -> None:
        check_time_budget(self.time_budget_s, "course config: time_budget_s")
        for name, value in (("seed", self.seed), ("hidden_seed", self.hidden_seed)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED):
                raise ValueError(f"course config: {name} must be an integer in [0, {MAX_SEED}], got {value!r}")
        bad = [c for c in self.chapters if c not in CHAPTERS]
        if bad:
            raise ValueError(f"course config: unknown chapters {bad}; the course has "
                             f"{', '.join(f'ch{c:02d}' for c in CHAPTERS)}")

    def public(self) -> "CourseConfig":
        """What a student release may carry: the hidden seed removed."""
        return CourseConfig(self.seed, self.chapters, time_budget_s=self.time_budget_s)

    def to_json(self) -> str:
        data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}
        return json.dumps(data, indent=2) + "\n"


def check_time_budget(value: float | None, name: str) -> None:
    """ValueError naming `name` unless `value` is None or a finite number of seconds > 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")


def parse_chapters(text: str | None) -> tuple[int, ...]:
    """'ch05,ch06' or '5,6' -> (5, 6); None (no --chapters) -> () (every chapter). '' is refused: an empty
    shell variable must not quietly mean every chapter."""
    if text is None:
        return ()
    if not text.strip():
        raise ValueError("--chapters is empty; name the assignment's chapters, e.g. ch05,ch06 "
                         "(leave --chapters out for every chapter)")
    chapters = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(?:ch)?(\d{1,2})\s*", part)
        if not m or int(m.group(1)) not in CHAPTERS:
            raise ValueError(f"--chapters: {part.strip()!r} is not a chapter; use e.g. ch05,ch06 "
                             f"(the course has {', '.join(f'ch{c:02d}' for c in CHAPTERS)})")
        chapters.append(int(m.group(1)))
    return tuple(sorted(set(chapters)))


def load(root: Path | None = None) -> CourseConfig:
    """The course.json of `root` (the course root by default), or the defaults when there is none."""
    path = Path(root or repo_root()) / CONFIG_FILE
    if not path.is_file():
        return CourseConfig()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or set(data) - {"seed", "chapters", "hidden_seed", "time_budget_s"}:
        raise ValueError(f"{path}: expected an object with seed, chapters, hidden_seed and time_budget_s, "
                         f"got {data!r}")
    return CourseConfig(data.get("seed", DEFAULT_SEED), tuple(data.get("chapters") or ()), data.get("hidden_seed"),
                        data.get("time_budget_s"))


def write(config: CourseConfig, dest: Path) -> Path:
    path = Path(dest) / CONFIG_FILE
    path.write_text(config.to_json(), encoding="utf-8")
    return path
