"""Gradescope: results.json from a GradeReport, and the autograder archive an instructor uploads.

results.json (Gradescope's autograder format): one entry per graded test with score, max_score, status,
name, number, output, output_format and visibility (hidden tests: "after_published"), and at top level
score, execution_time, output and stdout_visibility "hidden" (a learner's prints stay private).

The archive holds `setup.sh` (installs torch for CPU and this package), `run_autograder`, which grades
`$ROOT/submission` and writes `$ROOT/results/results.json` (ROOT being $MINILLM_AUTOGRADER_ROOT or /autograder;
that variable lets `make test` run the archive against a fake submission folder), and `course.json`: the
assignment's chapters, the inputs' seed, if the instructor set one, the hidden tests' own seed, and the run's time
budget (minillm.course.config; GRADESCOPE_TIME_BUDGET_S unless set). run_autograder grades exactly those
chapters, and stops at the budget: results.json is written before Gradescope's own timeout would leave none.

The archive ships no answers: no solutions/ (the graded tests compare against the engine's own functions,
the one source the solutions are generated from) and no exercises/. The engine's source is there, as it must
be for the reference to run, but only the graded test's process reads it: the submission runs in the sandbox
worker (minillm.course.sandbox), which can neither import nor open anything under the archive's folder.
"""
from __future__ import annotations

import dataclasses
import os
import re
import stat
import zipfile
from pathlib import Path

from minillm.course import config as course_config
from minillm.course.grader import GradeReport
from minillm.course.registry import repo_root
from minillm.course.sync import NOT_ATTEMPTED

# What the archive carries (relative to the course root): the package (whose marked regions are the reference),
# the graded tests with their hidden part, and the packaging files, plus the helpers of tests/ the graded tests
# import (graded_test_helpers). Not solutions/: see the module docstring.
ARCHIVE_PATHS = ("minillm", "kernels", "tests/conftest.py", "tests/adapters.py", "tests/graded",
                 "pyproject.toml", "setup.py")
SKIP_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}

# What grading imports besides torch (installed first, from the CPU index) and the package itself, which is
# installed --no-deps (its own list pulls jupyterlab, transformers, a server): pytest and triton run the tests,
# tqdm is imported by the CLI (minillm.quant), gguf by the ch07 tests, safetensors and tokenizers by the engine
# the ch09 tests run. tests/course checks that the graded tests import with nothing else installed.
GRADING_REQUIREMENTS = ("pytest", "numpy", "triton", "tqdm", "gguf", "safetensors", "tokenizers")

SETUP_SH = f"""#!/usr/bin/env bash
# Gradescope runs this once when it builds the autograder image (Ubuntu, no GPU).
set -euo pipefail
apt-get update -q && apt-get install -y -q python3 python3-pip python3-venv
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
/autograder/venv/bin/pip install -q {' '.join(GRADING_REQUIREMENTS)}
cd /autograder/source && /autograder/venv/bin/pip install -q --no-deps -e .
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this for every submission. ROOT is overridable so the archive can be tested locally.
set -uo pipefail
ROOT="${MINILLM_AUTOGRADER_ROOT:-/autograder}"
PY="${MINILLM_PYTHON:-$ROOT/venv/bin/python}"
[ -x "$PY" ] || PY=python3
mkdir -p "$ROOT/results"
cd "$ROOT/source"
export PYTHONPATH="$ROOT/source${PYTHONPATH:+:$PYTHONPATH}" MINILLM_ROOT="$ROOT/source"
# the run's time budget is course.json's time_budget_s; MINILLM_GRADE_TIME_BUDGET overrides it
"$PY" -m minillm.cli grade --impl "$ROOT/submission" --format gradescope \\
    --out "$ROOT/results/results.json" --timeout "${MINILLM_GRADE_TIMEOUT:-120}" \\
    ${MINILLM_GRADE_TIME_BUDGET:+--time-budget "$MINILLM_GRADE_TIME_BUDGET"}
"""


def ungradable_results(message: str) -> dict:
    """results.json for a submission that could not be graded at all (e.g. none of the exercise modules in it):
    score 0 and the reason, in the output every learner sees."""
    return {"score": 0.0, "output": f"Your submission could not be graded: {message}", "stdout_visibility": "hidden",
            "tests": []}


def results_json(report: GradeReport) -> dict:
    """Gradescope's results.json content for `report`."""
    tests, summary = [], []
    for i, ex in enumerate(report.exercises, 1):
        hint = f"\n{ex.advice}" if ex.advice else ""
        owed = ex.points - sum(t.points for t in ex.tests if t.outcome != "skipped")
        if owed > 0:  # tests never listed: the process died first, or their file failed to collect
            tests.append({"name": ex.id, "number": f"{i}", "score": 0.0, "max_score": owed,
                          "status": "failed", "output": f"{ex.status}: {ex.message}{hint}",
                          "output_format": "text", "visibility": "visible"})
        for j, t in enumerate(ex.tests, 1):
            if t.outcome == "skipped":
                continue
            passed = t.outcome == "passed"
            if passed:
                out = "passed"
            elif ex.status in ("timeout", "error") and t.outcome in ("not run", "passed"):
                out = f"{ex.status}: {ex.message}"
            elif t.outcome == "not_attempted":  # the stub's own message, or why (its module is missing)
                out = ("not attempted: " + (f"{ex.id} still raises NotImplementedError"
                                            if not t.message or NOT_ATTEMPTED in t.message else t.message))
            else:
                out = f"{t.outcome}: {t.message}"
            tests.append({"name": f"{ex.id}: {t.name}", "number": f"{i}.{j}", "score": t.earned,
                          "max_score": t.points, "status": "passed" if passed and t.earned == t.points else "failed",
                          "output": out + ("" if passed else hint), "output_format": "text",
                          "visibility": "after_published" if t.hidden else "visible"})
        visible_ok = all(t.outcome == "passed" for t in ex.tests if not t.hidden) and ex.status not in ("error", "timeout")
        has_hidden = any(t.hidden for t in ex.tests)
        state = "all visible tests passed" if visible_ok and has_hidden else ex.status
        summary.append(f"{ex.id}: {state}")
    seed_line = (f"inputs seed {report.seed} (`minillm grade --seed {report.seed}` reproduces the visible tests)"
                 + ("; hidden tests use the instructor's own seed" if report.hidden_seed else ""))
    return {"score": report.score, "execution_time": round(report.execution_time, 2),
            "output": "\n".join([seed_line, *summary]), "output_format": "text",
            "stdout_visibility": "hidden", "tests": tests,
            "extra_data": {"seed": report.seed, "chapters": report.chapters, "impl": report.impl}}


def _walk(root: Path, rel: str):
    path = root / rel
    if path.is_file():
        yield path
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not SKIP_PARTS.intersection(p.relative_to(root).parts) and p.suffix != ".pyc":
                yield p


def graded_test_helpers(root: Path) -> list[str]:
    """The modules of tests/ that the graded tests import by their bare name (`from test_engine import
    tiny_model`, `from tiny import ByteTokenizer`: pytest puts tests/ on the path), and the ones those import,
    as paths relative to `root`. The archive must carry them: without them a graded test file fails to collect
    and its whole grading session scores 0 for every exercise in it, right answers included."""
    tests = root / "tests"
    todo = sorted((tests / "graded").rglob("*.py"))
    seen: set[str] = set()
    while todo:
        text = todo.pop().read_text(encoding="utf-8")
        for name in re.findall(r"^\s*(?:from\s+(\w+)\s+import|import\s+(\w+))", text, re.M):
            name = name[0] or name[1]
            if name not in seen and (tests / f"{name}.py").is_file():
                seen.add(name)
                todo.append(tests / f"{name}.py")
    return sorted(f"tests/{name}.py" for name in seen)


def build_autograder(zip_path: Path, root: Path | None = None,
                     config: course_config.CourseConfig | None = None) -> list[str]:
    """Write the Gradescope autograder archive for the assignment `config` (default: the course's course.json,
    else every chapter and the default seed); returns the files it holds."""
    root = Path(root or repo_root())
    if not (root / "tests" / "graded" / "hidden").is_dir():
        raise FileNotFoundError(f"{root}/tests/graded/hidden is missing: build the autograder from the instructor's "
                                "repository")
    config = config or course_config.load(root)
    if config.time_budget_s is None:  # Gradescope kills a run past its timeout and shows no score: always a budget
        config = dataclasses.replace(config, time_budget_s=course_config.GRADESCOPE_TIME_BUDGET_S)
    names = []
    try:  # opened before the walk: a path that cannot take the archive fails before any work
        out = open(zip_path, "wb")
    except OSError as e:
        raise ValueError(f"cannot write the autograder archive {zip_path}: {e.strerror}") from None
    with out, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in (("setup.sh", SETUP_SH), ("run_autograder", RUN_AUTOGRADER),
                           (course_config.CONFIG_FILE, config.to_json())):
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | (0o644 if name.endswith(".json") else 0o755)) << 16
            z.writestr(info, text)
            names.append(name)
        for rel in (*ARCHIVE_PATHS, *graded_test_helpers(root)):
            for p in _walk(root, rel):
                arc = p.relative_to(root).as_posix()
                z.write(p, arc)
                names.append(arc)
    return names


def autograder_root() -> Path:
    return Path(os.environ.get("MINILLM_AUTOGRADER_ROOT", "/autograder"))
