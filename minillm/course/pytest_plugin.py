"""The pytest plugin the grader loads into each grading session (`-p minillm.course.pytest_plugin`).

The grader hands it a plan (`--minillm-plan`, JSON: a key, an exercise and a submission folder per entry). It keeps
only the tests of the planned exercises, parametrizes each over the keys of its submissions (the autouse fixture
`minillm_submission` of tests/conftest.py; the `impl` fixture then runs that submission's function in its own
sandbox worker), orders the tests submission by submission (so one worker lives at a time and is closed when its
submission is done), and appends one JSON line per event to `--minillm-results`: the collected tests first (so a
process that dies later still tells the grader what it owed), then one record per test as soon as it finishes,
then `finished`; a graded test file that fails to import adds a `collect_error` record (its path, its error).
Each record carries a nonce the grader handed over in the environment (removed before any learner code runs),
and the grader ignores a file that does not end with `finished`: a learner's `os._exit(0)` cannot pass.
"""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from minillm.course.sync import NOT_ATTEMPTED

_NONCE = os.environ.pop("MINILLM_GRADER_NONCE", "")
MAX_MESSAGE = 400
MAX_TRACEBACK = 8000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("minillm", "minillm grader")
    group.addoption("--minillm-plan", default=None, help="JSON file: [{key, exercise, submission}, ...] to grade")
    group.addoption("--minillm-results", default=None, help="append JSON-lines results to this file")


def _emit(config: pytest.Config, record: dict) -> None:
    path = config.getoption("minillm_results")
    if path:
        with open(path, "a", encoding="utf-8") as f:  # reopened each time: the learner cannot close it on us
            f.write(json.dumps({**record, "nonce": _NONCE}) + "\n")


_PLAN: list[dict] = []  # the grader's plan, in order


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("minillm_plan")
    if path:
        from minillm.course import fork_server, sandbox
        _PLAN[:] = json.loads(Path(path).read_text(encoding="utf-8"))
        sandbox.SUBMISSIONS.update({p["key"]: Path(p["submission"]) for p in _PLAN})
        signal.signal(signal.SIGTERM, _stop)
        fork_server.prestart()


def _stop(signum: int, frame) -> None:
    """SIGTERM from the grader (the run's time budget is spent, or the session's backstop): kill the sandbox
    workers, which live in sessions of their own and would outlive a killed process group (a learner's
    `time.sleep(1000)` uses no CPU time), then leave at once. The fork server sees its socket close and exits."""
    from minillm.course import sandbox
    for box in list(sandbox._SANDBOXES.values()):
        try:
            os.killpg(box.proc.pid, signal.SIGKILL)
        except (AttributeError, OSError):  # not started, or already gone
            pass
    os._exit(128 + signum)


def _exercise_of(node) -> str | None:
    ex = node.get_closest_marker("exercise")
    return ex.args[0] if ex and ex.args else None


def _key(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("minillm_submission") if callspec else None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    keys = [p["key"] for p in _PLAN if p["exercise"] == _exercise_of(metafunc.definition)]
    if keys and "minillm_submission" in metafunc.fixturenames:
        metafunc.parametrize("minillm_submission", keys, ids=keys)


def _unkeyed(text: str, key: str | None) -> str:
    """A test's id without the submission's key (the learner's report names the test as it always has)."""
    return text.replace(f"[{key}-", "[").replace(f"[{key}]", "") if key else text


def _describe(item: pytest.Item) -> dict:
    pts = item.get_closest_marker("points")
    key = _key(item)
    return {"nodeid": _unkeyed(item.nodeid, key), "name": _unkeyed(item.name, key), "key": key,
            "exercise": _exercise_of(item),
            "points": float(pts.args[0]) if pts and pts.args else 0.0,
            "hidden": "hidden" in Path(str(item.fspath)).parts}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("minillm_plan"):
        return
    order = {p["key"]: i for i, p in enumerate(_PLAN)}
    keep = sorted((it for it in items if _key(it) in order), key=lambda it: order[_key(it)])  # stable: file order
    drop = [it for it in items if _key(it) not in order]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    _emit(config, {"event": "collected", "tests": [_describe(it) for it in keep]})


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A graded test file that fails to import is reported by its path, its error's last line and the exercises it
    holds (the grader runs with --continue-on-collection-errors, so the other files still run): only those
    exercises are lost. They are read from the file's text (`exercise("chNN.name")` markers), as it cannot be
    imported; none found (an empty list) means every exercise of the chapters its name carries."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and isinstance(collector, pytest.File) and collector.config.getoption("minillm_plan"):
        text = rep.longreprtext or ""
        errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
        first = next((line.strip() for line in text.splitlines() if line.strip()), "unknown error")
        try:
            source = collector.path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            source = ""
        named = sorted(set(re.findall(r"""exercise\(\s*["'](ch\d\d\.\w+)["']""", source)))
        _emit(collector.config, {"event": "collect_error", "path": str(collector.path), "exercises": named,
                                 "message": _printable(errors[-1] if errors else first)[:MAX_MESSAGE]})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    key = _key(item)
    if key is not None and (nextitem is None or _key(nextitem) != key):
        from minillm.course import sandbox
        sandbox.close(key)  # this submission is done: its worker goes


def _module_path(exercise_id: str, key: str | None) -> Path:
    """The chapter module of `exercise_id` in submission `key`'s folder (the plan's), else in MINILLM_IMPL's."""
    from minillm.course.impl import module_file, resolve_impl
    from minillm.course.registry import get
    folder = next((Path(p["submission"]) for p in _PLAN if p["key"] == key), None) or resolve_impl()
    return module_file(get(exercise_id), folder)


def _still_a_stub(exercise_id: str | None, key: str | None = None) -> bool:
    """The implementation's module still holds this exercise's stub (a Triton kernel cannot raise
    NotImplementedError at run time: its stub fails to compile instead, and must still count as not attempted).
    The module is parsed, never imported (minillm.course.impl.stub_in_source)."""
    if not exercise_id:
        return False
    try:
        from minillm.course.impl import stub_in_source
        from minillm.course.registry import get
        return stub_in_source(get(exercise_id), _module_path(exercise_id, key))
    except Exception:  # noqa: BLE001  (no verdict is better than a crash in the reporter)
        return False


def _missing(exercise_id: str | None, key: str | None) -> str | None:
    """'ch02_kv_cache.py is not in the submission' when the chapter's module is absent (not even a link): the
    learner never attempted the chapter, which is "not attempted", not a crash."""
    try:
        path = _module_path(exercise_id, key) if exercise_id else None
    except Exception:  # noqa: BLE001
        return None
    return f"{path.name} is not in the submission" if path and not os.path.lexists(path) else None


def _classify(call: pytest.CallInfo, exercise_id: str | None = None, key: str | None = None) -> tuple[str, str]:
    exc = call.excinfo.value if call.excinfo else None
    if exc is None:
        return "failed", ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, NotImplementedError) and NOT_ATTEMPTED in str(exc):
        return "not_attempted", text
    fatal = type(exc).__name__ in ("ImplementationError", "SubmissionCrash")  # the whole exercise is lost
    if fatal and (missing := _missing(exercise_id, key)):
        return "not_attempted", missing  # the one not-attempted message that is not the stub's own
    if not fatal and _still_a_stub(exercise_id, key):
        return "not_attempted", f"{exercise_id} is {NOT_ATTEMPTED} ({type(exc).__name__}: {text})"
    if fatal:
        return "error", text
    if isinstance(exc, AssertionError) and text:
        return "failed", text
    return "failed", f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _printable(text: str, keep: str = "") -> str:
    """`text` with control characters (but those in `keep`) spelled out as escapes: a learner's exception message
    reaches the report, and must not draw on the terminal (an escape sequence that rewrites a line as a pass)."""
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in text)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    rep = outcome.get_result()
    if not item.config.getoption("minillm_results"):
        return
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        if rep.passed:
            status, message = "passed", ""
        elif rep.skipped:
            status, message = "skipped", str(rep.longrepr[-1]) if isinstance(rep.longrepr, tuple) else "skipped"
        else:
            status, message = _classify(call, _exercise_of(item), _key(item))
        _emit(item.config, {"event": "test", **_describe(item), "outcome": status,
                            "message": _printable(message)[:MAX_MESSAGE], "duration": rep.duration,
                            "traceback": "" if rep.passed else _printable(rep.longreprtext[-MAX_TRACEBACK:], "\n")})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _emit(session.config, {"event": "finished", "exitstatus": int(exitstatus)})
