"""The grader: run each exercise's graded tests against a submission, isolated, and turn what comes back into points.

A grading session is one pytest process (with minillm.course.pytest_plugin) that grades a plan of submissions:
an exercise and a folder each, several of the same exercise allowed (the mutants, the hostile cases). The learner's
code never runs in that process: each submission's function runs in its own sandbox worker (minillm.course.sandbox),
with a wall-clock limit per call and one for the whole exercise, CPU, memory and output caps, so that an infinite
loop, `sys.exit`, `os._exit`, a segfault, a flood of prints, an import error or a monkey-patched torch costs that
submission its points and one clear line, and never the session or the other submissions. Sharing the session is
what makes grading cheap: Python, torch, pytest and the graded tests start once per session, not once per
exercise, and the workers are forked from a warm template (minillm.course.fork_server).

The plugin reports test by test into a JSON-lines file; the grader believes the file only when it ends with the
session's `finished` record (never the exit code alone), or, for a session that died, only for the submissions
whose every test was reported.

A run may have a time budget (`minillm grade --time-budget S`, course.json's `time_budget_s`): a submission that
hangs in many exercises would otherwise run for the sum of their timeouts, past Gradescope's limit (no score at
all). When it is spent the sessions stop; what was graded stands, every exercise not finished fails with "not run:
the submission used up the grading time budget (N s)", and results.json is still written in time.
"""
from __future__ import annotations

import collections
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from minillm.course import config as course_config
from minillm.course.impl import resolve_impl, stub_in_source
from minillm.course.registry import Exercise, repo_root, select
from minillm.course.sync import NOT_ATTEMPTED

STATUSES = ("pass", "fail", "not attempted", "error", "timeout")
SESSION_MIN = 4  # submissions per grading session, at least, before a second one starts beside it
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
    nudge: str = ""  # the first-level hint, shown while the exercise is not attempted
    stub: bool = False  # the submission never wrote the function: still its stub, or its module is missing

    @property
    def advice(self) -> str:
        """What to show under the status: the nudge before any attempt, the stronger hint after a failed one.
        A function never written gets the nudge whatever the status: a chapter module that fails to import is an
        error for every exercise in it, but the hint (nearly the answer) is for those the learner tried."""
        if self.status == "pass":
            return ""
        if self.status == "not attempted" or self.stub:
            return f"nudge: {self.nudge}" if self.nudge else ""
        return f"hint: {self.hint}"


@dataclass
class GradeReport:
    impl: str
    exercises: list[ExerciseResult]
    execution_time: float
    seed: int | None = None  # the inputs' seed: `minillm grade --seed N` reproduces this run
    hidden_seed: bool = False  # the hidden tests drew from the instructor's own seed (never shown)
    chapters: list[int] = field(default_factory=list)  # the chapters graded (the assignment)

    @property
    def score(self) -> float:
        return sum(e.earned for e in self.exercises)

    @property
    def max_score(self) -> float:
        return sum(e.points for e in self.exercises)

    def to_dict(self) -> dict:
        return {"impl": self.impl, "score": self.score, "max_score": self.max_score, "seed": self.seed,
                "chapters": self.chapters, "execution_time": round(self.execution_time, 2), "exercises": [asdict(e) for e in self.exercises]}


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


def _call_timeout(call_timeout: float | None, timeout: float) -> float:
    """Seconds one call of the learner's function may take: the argument, else $MINILLM_SANDBOX_CALL_TIMEOUT_S,
    else half the exercise's timeout (at most 30 s), so that a hang ends the exercise well before its timeout."""
    if call_timeout is None and os.environ.get("MINILLM_SANDBOX_CALL_TIMEOUT_S"):
        call_timeout = float(os.environ["MINILLM_SANDBOX_CALL_TIMEOUT_S"])
    return call_timeout or min(30.0, max(2.0, timeout / 2))


@dataclass(frozen=True)
class Submission:
    """One thing to grade: exercise `ex` of the implementation folder `impl_dir`."""
    ex: Exercise
    impl_dir: Path


def grade_exercise(ex: Exercise, impl_dir: Path, root: Path, timeout: float = 60.0,
                   tests_dir: Path | None = None, python: str = sys.executable, seed: int | None = None,
                   hidden_seed: int | None = None, call_timeout: float | None = None) -> ExerciseResult:
    """Run `ex`'s graded tests against the implementation in `impl_dir`, isolated."""
    return grade_submissions([Submission(ex, Path(impl_dir))], root, timeout, tests_dir, python, seed,
                             call_timeout=call_timeout)[0]


def grade_submissions(submissions: list[Submission], root: Path, timeout: float = 60.0,
                      tests_dir: Path | None = None, python: str = sys.executable, seed: int | None = None,
                      call_timeout: float | None = None, jobs: int = 1,
                      time_budget: float | None = None) -> list[ExerciseResult]:
    """Grade every submission, in up to `jobs` pytest sessions run side by side (each grades its share in turn).

    One session grades many submissions (even several of the same exercise: the plugin parametrizes the tests
    over them), each in its own sandbox worker: the learner's code never runs in the session itself, so
    sharing it costs no isolation, and the session's start (torch, pytest, the graded tests) is paid once.
    Each submission gets `timeout` seconds of its worker's time; a hang ends that submission only. The whole
    call gets `time_budget` seconds (None: no limit but the sessions' backstop; see the module docstring)."""
    if not submissions:
        return []
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    course_config.check_time_budget(time_budget, "time_budget")
    budget = (time.monotonic() + time_budget, time_budget) if time_budget is not None else None
    root = Path(root).resolve()
    # a session costs a few CPU seconds to start: one per SESSION_MIN submissions at least, then side by side
    jobs = max(1, min(jobs, len(submissions) // SESSION_MIN))
    shards = [list(range(i, len(submissions), jobs)) for i in range(jobs)]
    results: list[ExerciseResult | None] = [None] * len(submissions)

    with tempfile.TemporaryDirectory(prefix="minillm-grade-") as base:  # every session's folder, denied to all

        def run(shard: list[int]) -> None:
            for i, r in zip(shard, _grade_session([submissions[i] for i in shard], root, timeout, tests_dir, python,
                                                  seed, call_timeout, Path(base), budget)):
                results[i] = r

        with ThreadPoolExecutor(max_workers=len(shards)) as pool:
            list(pool.map(run, shards))
    return results  # type: ignore[return-value]


def _grade_session(subs: list[Submission], root: Path, timeout: float, tests_dir: Path | None, python: str,
                   seed: int | None, call_timeout: float | None, base: Path,
                   budget: tuple[float, float] | None = None) -> list[ExerciseResult]:
    """One pytest session over `subs` (see grade_submissions), in a folder under `base`; `budget`: the whole
    run's (deadline on time.monotonic(), seconds), past which the session is stopped."""
    tests_dir = Path(tests_dir or root / "tests" / "graded")
    nonce = secrets.token_hex(16)
    keys = [f"s{i}" for i in range(len(subs))]
    with tempfile.TemporaryDirectory(prefix="session-", dir=base) as tmp:
        results_file = Path(tmp) / "results.jsonl"
        # each submission's chapter module is graded from a private copy: its sandbox worker may read that
        # folder and nothing else of the course (not the repository, not the other submissions, not the results)
        plan, stubs = [], {}
        for key, sub in zip(keys, subs):
            folder = Path(tmp) / "submissions" / key
            folder.mkdir(parents=True)
            source = Path(sub.impl_dir) / f"{sub.ex.module}.py"
            if source.is_file():  # a symbolic link is copied as a link, never followed: the sandbox refuses it
                shutil.copy(source, folder / source.name, follow_symlinks=False)
            # read (never run) here: the nudge or the hint, whatever comes back from the session
            stubs[key] = not os.path.lexists(source) or stub_in_source(sub.ex, folder / source.name)
            plan.append({"key": key, "exercise": sub.ex.id, "submission": str(folder)})
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps(plan), encoding="utf-8")
        pkg_parent = str(Path(__file__).resolve().parents[2])  # the minillm this grader runs from
        env = {**os.environ, "MINILLM_ROOT": str(root),
               "MINILLM_GRADER_NONCE": nonce, "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1",
               "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",  # only our plugin: faster, and nothing else in the way
               "MINILLM_SANDBOX": "1", "MINILLM_SANDBOX_DENY": os.pathsep.join([str(base), str(root), pkg_parent]),
               "MINILLM_SANDBOX_CALL_TIMEOUT_S": f"{_call_timeout(call_timeout, timeout):g}",
               "MINILLM_SANDBOX_BUDGET_S": f"{timeout:g}",
               "MINILLM_SANDBOX_CPU_S": f"{int(timeout) + 5}", "MINILLM_FALLBACK": "0",
               "MINILLM_GRADE_SEED": str(seed if seed is not None else course_config.load(root).seed),
               "PYTHONPATH": os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p)}
        env.pop("MINILLM_IMPL", None)  # each submission's folder comes from the plan
        files = sorted({str(f) for sub in subs for f in test_files(sub.ex, tests_dir)},
                       key=lambda f: ("hidden" in Path(f).parts, f))
        cmd = [python, "-m", "pytest", *files, "-p", "minillm.course.pytest_plugin",
               "--minillm-plan", str(plan_file), "--minillm-results", str(results_file),
               "--rootdir", str(root), "-o", "addopts=", "-q", "-s", "--no-header", "--continue-on-collection-errors",
               "-p", "no:cacheprovider", "-p", "no:warnings", "-p", "no:randomly"]
        session_timeout = 120.0 + timeout * len(subs)  # each worker is bounded by its own budget; this is a backstop
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        tail: collections.deque = collections.deque()
        reader = threading.Thread(target=_drain, args=(proc.stdout, tail), daemon=True)
        reader.start()
        timed_out = out_of_budget = False
        wait = session_timeout if budget is None else min(session_timeout, max(0.0, budget[0] - start))
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            timed_out, out_of_budget = True, wait < session_timeout
            _stop_session(proc)
        reader.join(timeout=5)
        duration = time.monotonic() - start
        log = ("(the output is still streaming from an escaped process)" if reader.is_alive()
               else b"".join(tail).decode("utf-8", errors="replace")[-OUTPUT_CAP:])
        records, finished = _read_records(results_file, nonce)

    collected = next((r["tests"] for r in records if r.get("event") == "collected"), [])
    broken = {Path(r["path"]).resolve(): r for r in records if r.get("event") == "collect_error"}
    out = []
    for key, sub in zip(keys, subs):
        result = ExerciseResult(id=sub.ex.id, hint=sub.ex.hint, points=float(sub.ex.points), nudge=sub.ex.nudge,
                                log=log, stub=stubs[key])
        tests = {t["nodeid"]: TestResult(t["nodeid"], t["name"], t["points"], hidden=t["hidden"])
                 for t in collected if t.get("key") == key}
        durations = 0.0
        for rec in records:
            if rec.get("event") == "test" and rec.get("key") == key and rec["nodeid"] in tests:
                t = tests[rec["nodeid"]]
                t.outcome, t.message, t.traceback = rec["outcome"], rec["message"], rec["traceback"]
                t.earned = t.points if t.outcome == "passed" else 0.0
                durations += float(rec.get("duration") or 0.0)
        result.tests = list(tests.values())
        result.duration = durations if finished else duration
        complete = bool(result.tests) and all(t.outcome != "not run" for t in result.tests)
        if not finished and not complete and out_of_budget:  # stopped at the run's time budget: not graded
            result.status = "fail"
            result.message = f"not run: the submission used up the grading time budget ({budget[1]:g} s)"
            for t in result.tests:  # a test passed before the stop does not make an exercise graded in part
                t.earned, t.message = 0.0, result.message.removeprefix("not run: ")
                t.outcome = "not counted" if t.outcome == "passed" else t.outcome
        elif not finished and not complete:  # the session itself died or hung before this submission was done
            result.status = "timeout" if timed_out else "error"
            rc = proc.returncode
            result.message = (f"timed out after {session_timeout:g} s (the grading session as a whole)" if timed_out
                              else f"the test process died from {_signal_name(rc)}" if rc < 0
                              else f"the test process exited (code {rc}) before reporting")
        elif lost := next((broken[f] for f in map(Path.resolve, test_files(sub.ex, tests_dir)) if f in broken
                           and sub.ex.id in (broken[f]["exercises"] or [sub.ex.id])), None):
            result.status = "error"  # its points stay the registry's: the file's tests are owed, not dropped
            result.message = (f"{Path(lost['path']).name} failed to collect: {lost['message']} (the graded tests' "
                              "own error, not your code: tell your instructor)")
        elif not result.tests:
            result.status = "error"
            result.message = f"no graded tests found for {sub.ex.id} under {tests_dir}"
        else:
            _summarise(result)
        if result.status in ("timeout", "error"):
            for t in result.tests:
                t.earned = 0.0
                if t.outcome == "passed":
                    t.outcome, t.message = "not counted", result.message
                if t.outcome == "not run":
                    t.message = result.message
        result.earned = sum(t.earned for t in result.tests)
        out.append(result)
    return out


def _stop_session(proc: subprocess.Popen) -> None:
    """SIGTERM first (the plugin kills the sandbox workers, which live in sessions of their own, and exits), then
    SIGKILL to the session's whole group (pytest and the fork server)."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


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
    elif "error" in outcomes:  # an import failure, a crash, a hang or a refused action costs the whole exercise
        hung = any(t.outcome == "error" and " timed out after " in t.message for t in counted)
        result.status = "timeout" if hung else "error"
    else:
        result.status = "fail"
    worst = "error" if result.status == "timeout" else result.status
    failing = sorted((t for t in counted if t.outcome != "passed"), key=lambda t: t.outcome != worst)
    visible = [t for t in failing if not t.hidden]
    if result.status == "not attempted":
        # a stub's own message says it is not attempted; any other names why (the chapter's module is missing)
        why = next((t.message for t in counted if t.message and NOT_ATTEMPTED not in t.message), "")
        result.message = f"{result.id} is not attempted yet" + (f": {why}" if why else "")
    elif visible:
        result.message = f"{visible[0].name}: {visible[0].message}"
    elif failing:  # do not leak a hidden test's inputs
        result.message = f"all visible tests passed; {len(failing)} hidden test(s) failed"


def grade(target: str | None = None, impl: str | os.PathLike | None = None, root: Path | None = None,
          timeout: float = 60.0, jobs: int | None = None, tests_dir: Path | None = None,
          seed: int | None = None, time_budget: float | None = None) -> GradeReport:
    """Grade every exercise selected by `target` (None: the release's assignment, see minillm.course.config;
    'ch01' or 'ch01.rms_norm') in parallel, on inputs drawn from `seed` (None: $MINILLM_GRADE_SEED, else the
    release's seed), within `time_budget` seconds in all (None: the release's course.json, else none)."""
    root = Path(root or repo_root()).resolve()
    impl_dir = resolve_impl(impl or os.environ.get("MINILLM_IMPL") or "exercises", root)
    config = course_config.load(root)
    if target is None and config.chapters:
        exercises = [ex for ex in select(None) if ex.chapter in config.chapters]
    else:
        exercises = select(target)
    if seed is None:
        seed = int(os.environ["MINILLM_GRADE_SEED"]) if os.environ.get("MINILLM_GRADE_SEED") else config.seed
    course_config.CourseConfig(seed=seed)  # validates the range
    if jobs is None:
        jobs = max(1, min(4, os.cpu_count() or 1))  # grading sessions side by side
    start = time.monotonic()
    if time_budget is None:
        time_budget = config.time_budget_s
    results = grade_submissions([Submission(ex, impl_dir) for ex in exercises], root, timeout, tests_dir,
                                seed=seed, jobs=jobs, time_budget=time_budget)
    label = str(impl) if impl else os.environ.get("MINILLM_IMPL", "exercises")
    return GradeReport(impl=label, exercises=results, execution_time=time.monotonic() - start, seed=seed,
                       hidden_seed=config.hidden_seed is not None,
                       chapters=sorted({ex.chapter for ex in exercises}))
