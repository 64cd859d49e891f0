"""Mutants: plausible wrong answers the graded tests must catch (the grader's proof that it can fail).

`tests/mutants/<exercise id>/<what is wrong>.py` holds ONE wrong function (the same name as the exercise's)
under a docstring that says what is wrong. `build_submission` turns it into a full submission folder:
every chapter module copied from solutions/, with the mutant appended to its chapter's module, so it
replaces the right answer and every other exercise stays correct. `make test` grades each mutant and
fails when one scores full points for its exercise, or when a registered exercise has no mutant.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from minillm.course.grader import ExerciseResult, Submission, grade_submissions
from minillm.course.registry import EXERCISES, get, repo_root


@dataclass
class MutantOutcome:
    exercise_id: str
    mutant: Path
    result: ExerciseResult

    @property
    def caught(self) -> bool:
        # "fail" and only "fail": a mutant that does not import or crashes proves nothing about the tests
        return self.result.status == "fail"


def find_mutants(root: Path | None = None) -> dict[str, list[Path]]:
    """Mutant files per registered exercise (an exercise without any maps to [])."""
    base = Path(root or repo_root()) / "tests" / "mutants"
    return {ex_id: sorted((base / ex_id).glob("*.py")) if (base / ex_id).is_dir() else [] for ex_id in EXERCISES}


def build_submission(mutant: Path, dest: Path, exercise_id: str, root: Path | None = None) -> Path:
    """A submission folder in `dest`: the solutions, with `mutant` overriding its exercise's function."""
    root = Path(root or repo_root())
    dest.mkdir(parents=True, exist_ok=True)
    for module in (root / "solutions").glob("ch*.py"):
        shutil.copy(module, dest / module.name)
    target = dest / f"{get(exercise_id).module}.py"
    with open(target, "a", encoding="utf-8") as f:  # a later def of the same name wins at import
        f.write(f"\n\n# ---- mutant {mutant.name} ----\n" + mutant.read_text(encoding="utf-8"))
    return dest


def run_mutants(workdir: Path, root: Path | None = None, timeout: float = 60.0, jobs: int = 2,
                only: list[str] | None = None) -> list[MutantOutcome]:
    """Grade every mutant's exercise against its mutant submission: all of them in `jobs` grading sessions
    (each mutant still in its own sandbox worker, see minillm.course.grader.grade_submissions)."""
    root = Path(root or repo_root())
    jobs_list = [(ex_id, m) for ex_id, ms in find_mutants(root).items() if only is None or ex_id in only for m in ms]
    subs = [Submission(get(ex_id), build_submission(mutant, Path(workdir) / f"{ex_id}-{mutant.stem}", ex_id, root))
            for ex_id, mutant in jobs_list]
    results = grade_submissions(subs, root, timeout, jobs=jobs)
    return [MutantOutcome(ex_id, mutant, r) for (ex_id, mutant), r in zip(jobs_list, results)]
