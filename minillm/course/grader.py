"""The grader: run each exercise's graded tests in its own process and turn what comes back into points.

One process per exercise, with a timeout and a cap on what it may print, so that an infinite loop,
`sys.exit`, `os._exit`, a segfault, a flood of prints, an import error or a monkey-patched torch costs
that exercise its points and one clear line, and never the grader or the other exercises. The child is
pytest with minillm.course.pytest_plugin, which reports test by test into a JSON-lines file; the grader
believes the file only when it ends with the child's `finished` record (never the exit code alone).
"""
from __future__ import annotations

import collections
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minillm.course.impl import resolve_impl
from minillm.course.registry import Exercise, repo_root, select

STATUSES = ("pass", "fail", "not attempted", "error", "timeout")
OUTPUT_CAP = 32_000  # bytes of the child's stdout/stderr kept (the tail); the rest is read and dropped


@dataclass
class TestResult:
    __test__ = False  # a result, not a pytest test class
    nodeid: str
    name: str
    points: float
    earned: float = 0.0
    outcome: str = "not run"  # passed / failed / not_attempted / error / skipped / not run
    message: str = ""
    traceback: str = ""
    hidden: bool = False


@dataclass
class ExerciseResult:
    id: str
    hint: str
    points: float  # possible
    earned: float = 0.0
    status: str = "error"
    message: str = ""  # the first failure, one line
    duration: float = 0.0
    tests: list[TestResult] = field(default_factory=list)
    log: str = ""  # tail of the child's output (shown with -v)


@dataclass
class GradeReport:
    impl: str
    exercises: list[ExerciseResult]
    execution_time: float
    seed: int | None = None  # the inputs' seed: MINILLM_GRADE_SEED=seed reproduces this run

    @property
    def score(self) -> float:
        return sum(e.earned for e in self.exercises)

    @property
    def max_score(self) -> float:
        return sum(e.points for e in self.exercises)

    def to_dict(self) -> dict:
        return {"impl": self.impl, "score": self.score, "max_score": self.max_score,
                "execution_time": round(self.execution_time, 2), "exercises": [asdict(e) for e in self.exercises]}


def _drain(stream, keep: collections.deque) -> None:
    """Read the child's output to the end, keeping only the last OUTPUT_CAP bytes."""
    size = 0
    for chunk in iter(lambda: stream.read(65536), b""):
        keep.append(chunk)
        size += len(chunk)
        while size - len(keep[0]) > OUTPUT_CAP:
            size -= len(keep.popleft())


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _read_records(path: Path, nonce: str) -> tuple[list[dict], bool]:
    records, finished = [], False
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("nonce") != nonce:
                continue
            records.append(rec)
            finished = finished or rec.get("event") == "finished"
    return records, finished


def test_files(ex: Exercise, tests_dir: Path) -> list[Path]:
    """The graded test files of `ex`'s chapter: by convention their names contain 'chNN' (hidden/ included)."""
    files = sorted((p for p in Path(tests_dir).rglob("test_*.py") if f"ch{ex.chapter:02d}" in p.name),
                   key=lambda p: ("hidden" in p.parts, str(p)))  # visible tests first
    return files or [Path(tests_dir)]


def grade_exercise(ex: Exercise, impl_dir: Path, root: Path, timeout: float = 60.0,
                   tests_dir: Path | None = None, python: str = sys.executable, seed: int | None = None) -> ExerciseResult:
    """Run `ex`'s graded tests against the implementation in `impl_dir`, isolated."""
    tests_dir = Path(tests_dir or root / "tests" / "graded")
    result = ExerciseResult(id=ex.id, hint=ex.hint, points=float(ex.points))
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="minillm-grade-") as tmp:
        results_file = Path(tmp) / "results.jsonl"
        pkg_parent = str(Path(__file__).resolve().parents[2])  # the minillm this grader runs from
        env = {**os.environ, "MINILLM_IMPL": str(impl_dir), "MINILLM_ROOT": str(root),
               "MINILLM_GRADER_NONCE": nonce, "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # only our plugin: faster, and nothing else in the way
               "PYTHONPATH": os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)}
        if seed is not None:  # fresh graded inputs each run, the same for every exercise of this run
            env["MINILLM_GRADE_SEED"] = str(seed)
        cmd = [python, "-m", "pytest", *map(str, test_files(ex, tests_dir)), "-p", "minillm.course.pytest_plugin",
               "--minillm-exercise", ex.id, "--minillm-results", str(results_file),
               "--rootdir", str(root), "-o", "addopts=", "-q", "-s", "--no-header",
               "-p", "no:cacheprovider", "-p", "no:warnings", "-p", "no:randomly"]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        tail: collections.deque = collections.deque()
        reader = threading.Thread(target=_drain, args=(proc.stdout, tail), daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: pytest and anything the learner spawned
            proc.wait()
        reader.join(timeout=5)  # a grandchild that escaped the process group may still hold the pipe
        result.duration = time.monotonic() - start
        result.log = ("(the output is still streaming from an escaped process)" if reader.is_alive()
                      else b"".join(tail).decode("utf-8", errors="replace")[-OUTPUT_CAP:])
        records, finished = _read_records(results_file, nonce)

    collected = next((r["tests"] for r in records if r.get("event") == "collected"), [])
    tests = {t["nodeid"]: TestResult(t["nodeid"], t["name"], t["points"], hidden=t["hidden"]) for t in collected}
    for rec in records:
        if rec.get("event") == "test" and rec["nodeid"] in tests:
            t = tests[rec["nodeid"]]
            t.outcome, t.message, t.traceback = rec["outcome"], rec["message"], rec["traceback"]
            t.earned = t.points if t.outcome == "passed" else 0.0
    result.tests = list(tests.values())

    if timed_out:
        result.status = "timeout"
        result.message = f"timed out after {timeout:g} s (an infinite loop, or far too slow?)"
    elif not finished:
        rc = proc.returncode
        result.status = "error"
        result.message = (f"the test process died from {_signal_name(rc)} (a crash in your code or a library it called)"
                          if rc < 0 else f"the test process exited (code {rc}) before reporting: "
                                         "does your code call sys.exit(), os._exit() or quit()?")
    elif not result.tests:
        result.status = "error"
        result.message = f"no graded tests found for {ex.id} under {tests_dir}"
    else:
        _summarise(result)
    if result.status in ("timeout", "error"):
        for t in result.tests:
            t.earned = 0.0
            if t.outcome == "not run":
                t.message = result.message
    result.earned = sum(t.earned for t in result.tests)
    return result


def _summarise(result: ExerciseResult) -> None:
    counted = [t for t in result.tests if t.outcome != "skipped"]
    result.points = float(sum(t.points for t in counted))  # a test skipped here (no GPU) cannot be owed
    outcomes = {t.outcome for t in counted}
    if not counted:
        result.status, result.message = "pass", "every test was skipped on this machine"
        return
    if outcomes == {"passed"}:
        result.status = "pass"
    elif outcomes == {"not_attempted"}:
        result.status = "not attempted"
    elif "error" in outcomes and "passed" not in outcomes:
        result.status = "error"
    else:
        result.status = "fail"
    failing = [t for t in counted if t.outcome != "passed"]
    visible = [t for t in failing if not t.hidden]
    if result.status == "not attempted":
        result.message = f"{result.id} is not attempted yet"
    elif visible:
        result.message = f"{visible[0].name}: {visible[0].message}"
    elif failing:  # do not leak a hidden test's inputs
        result.message = f"all visible tests passed; {len(failing)} hidden test(s) failed"


def grade(target: str | None = None, impl: str | os.PathLike | None = None, root: Path | None = None,
          timeout: float = 60.0, jobs: int | None = None, tests_dir: Path | None = None) -> GradeReport:
    """Grade every exercise selected by `target` (None, 'ch01' or 'ch01.rms_norm') in parallel."""
    root = Path(root or repo_root()).resolve()
    impl_dir = resolve_impl(impl or os.environ.get("MINILLM_IMPL") or "exercises", root)
    exercises = select(target)
    jobs = jobs or max(1, min(4, os.cpu_count() or 1))
    seed = int(os.environ.get("MINILLM_GRADE_SEED") or random.SystemRandom().randrange(1 << 20))
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda ex: grade_exercise(ex, impl_dir, root, timeout, tests_dir, seed=seed),
                                exercises))
    label = str(impl) if impl else os.environ.get("MINILLM_IMPL", "exercises")
    return GradeReport(impl=label, exercises=results, execution_time=time.monotonic() - start, seed=seed)
