"""The student release: a copy of the course without the answers an instructor keeps.

Left out: solutions/, the hidden graded tests (tests/graded/hidden), the mutants and the grader's
self-proof (tests/mutants, tests/course: they need the solutions), version control, virtual environments
and caches. In the copy, MINILLM_IMPL defaults to `exercises` (there is no solutions/), graded tests
compare against the engine's own functions, and `minillm grade` works as in the instructor's copy.

Added: course.json (minillm.course.config) with the assignment's chapters and the inputs' seed, never the
hidden seed: `minillm grade` in the copy grades exactly those chapters on those inputs.

What stays, knowingly: the engine in minillm/ runs the reference of every exercise (the notebooks need a
working engine). A release is a study copy, not an exam: exams grade on Gradescope with hidden tests.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from minillm.course import config as course_config
from minillm.course.registry import repo_root

EXCLUDED_PATHS = ("solutions", "tests/graded/hidden", "tests/mutants", "tests/course", ".briefs", "out")
EXCLUDED_NAMES = {".git", ".venv", "__pycache__", ".pytest_cache", ".ipynb_checkpoints", "build", ".mypy_cache",
                  ".ruff_cache"}


def _ignored(root: Path, path: Path) -> bool:
    rel = path.relative_to(root).as_posix()
    if path.name in EXCLUDED_NAMES or path.name.endswith(".egg-info"):
        return True
    return any(rel == p or rel.startswith(p + "/") for p in EXCLUDED_PATHS)


def release(dest: Path, root: Path | None = None, overwrite: bool = False,
            config: course_config.CourseConfig | None = None) -> list[str]:
    """Copy the course to `dest` for students, with `config`'s public part (default: the course's own
    course.json, else every chapter and the default seed) as its course.json; returns the paths written.
    `dest` may not be the root, a folder inside it, or one holding it (`overwrite` empties `dest` first)."""
    root = Path(root or repo_root()).resolve()
    dest = Path(dest).resolve()
    if dest == root or root in dest.parents or dest in root.parents:  # --force below would delete the course
        raise ValueError(f"release destination {dest} must lie outside the course root {root} and not hold it")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dest} exists and is not empty; choose an empty folder or pass --force")
        shutil.rmtree(dest)
    try:  # now, not at the first copy: a folder that cannot be made (under a file, in /proc) fails before any work
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the release destination {dest}: {e.strerror}") from None
    written = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _ignored(root, here / d))  # prune: never walk .venv
        for name in sorted(filenames):
            path = here / name
            if _ignored(root, path) or path.suffix == ".pyc":
                continue
            target = dest / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            written.append(path.relative_to(root).as_posix())
    course_config.write((config or course_config.load(root)).public(), dest)
    if course_config.CONFIG_FILE not in written:
        written.append(course_config.CONFIG_FILE)
    return written
