"""Shared pytest setup: marker registration and the graded-test fixtures (`impl`, `ref`).

A graded test is marked `@pytest.mark.exercise("ch01.rms_norm")` and `@pytest.mark.points(n)`; its
`impl` fixture is the implementation MINILLM_IMPL selects (through tests/adapters.py) and `ref` the
solution. Keep this file small: other suites add their fixtures next to their tests.
"""
from __future__ import annotations

import pytest

from adapters import get_impl, get_reference


def pytest_configure(config: pytest.Config) -> None:
    # also declared in pyproject.toml; repeated here so a student release or an autograder copy that
    # runs with another config still knows them
    config.addinivalue_line("markers", "exercise(id): a graded test of one exercise")
    config.addinivalue_line("markers", "points(n): points this graded test is worth")


def _exercise_id(request: pytest.FixtureRequest) -> str:
    marker = request.node.get_closest_marker("exercise")
    if marker is None or not marker.args:
        raise pytest.UsageError(f"{request.node.nodeid} uses a graded fixture without @pytest.mark.exercise(id)")
    return marker.args[0]


@pytest.fixture(autouse=True)
def minillm_submission() -> str | None:
    """Which submission a graded test runs against under `minillm grade` (the grader's plugin parametrizes this
    over the submissions it grades in one session); None otherwise: MINILLM_IMPL decides."""
    return None


@pytest.fixture
def impl(request: pytest.FixtureRequest, minillm_submission: str | None):
    """The function under test (learner, solution or submission, per MINILLM_IMPL or the grader's plan)."""
    return get_impl(_exercise_id(request), minillm_submission)


@pytest.fixture
def ref(request: pytest.FixtureRequest):
    """The solution of the same exercise."""
    return get_reference(_exercise_id(request))
