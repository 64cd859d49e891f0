"""The pytest plugin the grader loads into each isolated test process (`-p minillm.course.pytest_plugin`).

It keeps only the tests of the exercises named by `--minillm-exercise`, and appends one JSON line per
event to `--minillm-results`: the collected tests first (so a process that dies later still tells the
grader what it owed), then one record per test as soon as it finishes, then `finished`. Each record
carries a nonce the grader handed over in the environment (removed before any learner code runs), and
the grader ignores a file that does not end with `finished`: a learner's `os._exit(0)` cannot pass.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from minillm.course.sync import NOT_ATTEMPTED

_NONCE = os.environ.pop("MINILLM_GRADER_NONCE", "")
MAX_MESSAGE = 400
MAX_TRACEBACK = 8000


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("minillm", "minillm grader")
    group.addoption("--minillm-exercise", action="append", default=[], help="keep only this exercise's tests")
    group.addoption("--minillm-results", default=None, help="append JSON-lines results to this file")


def _emit(config: pytest.Config, record: dict) -> None:
    path = config.getoption("minillm_results")
    if path:
        with open(path, "a", encoding="utf-8") as f:  # reopened each time: the learner cannot close it on us
            f.write(json.dumps({**record, "nonce": _NONCE}) + "\n")


def _describe(item: pytest.Item) -> dict:
    ex = item.get_closest_marker("exercise")
    pts = item.get_closest_marker("points")
    return {"nodeid": item.nodeid, "name": item.name,
            "exercise": ex.args[0] if ex and ex.args else None,
            "points": float(pts.args[0]) if pts and pts.args else 0.0,
            "hidden": "hidden" in Path(str(item.fspath)).parts}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = set(config.getoption("minillm_exercise"))
    if not wanted:
        return
    keep = [it for it in items if _describe(it)["exercise"] in wanted]
    drop = [it for it in items if it not in keep]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
    _emit(config, {"event": "collected", "tests": [_describe(it) for it in keep]})


def _still_a_stub(exercise_id: str | None) -> bool:
    """The implementation's module still holds this exercise's stub line (a Triton kernel cannot raise
    NotImplementedError at run time: its stub fails to compile instead, and must still count as not attempted)."""
    if not exercise_id:
        return False
    try:
        from minillm.course.impl import module_file, resolve_impl
        from minillm.course.registry import get
        text = module_file(get(exercise_id), resolve_impl()).read_text(encoding="utf-8", errors="replace")
    except Exception:  # noqa: BLE001  (no verdict is better than a crash in the reporter)
        return False
    return f'"{exercise_id} is {NOT_ATTEMPTED}' in text


def _classify(call: pytest.CallInfo, exercise_id: str | None = None) -> tuple[str, str]:
    exc = call.excinfo.value if call.excinfo else None
    if exc is None:
        return "failed", ""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, NotImplementedError) and NOT_ATTEMPTED in str(exc):
        return "not_attempted", text
    if type(exc).__name__ != "ImplementationError" and _still_a_stub(exercise_id):
        return "not_attempted", f"{exercise_id} is {NOT_ATTEMPTED} ({type(exc).__name__}: {text})"
    if type(exc).__name__ == "ImplementationError":
        return "error", text
    if isinstance(exc, AssertionError) and text:
        return "failed", text
    return "failed", f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
            status, message = _classify(call, _describe(item)["exercise"])
        _emit(item.config, {"event": "test", **_describe(item), "outcome": status,
                            "message": message[:MAX_MESSAGE], "duration": rep.duration,
                            "traceback": "" if rep.passed else rep.longreprtext[-MAX_TRACEBACK:]})


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _emit(session.config, {"event": "finished", "exitstatus": int(exitstatus)})
