"""Answers that answer nothing must earn nothing: for every exercise, a function that raises ValueError for any
input, returns None, returns 0, returns [] or hands back its first argument scores 0 points.

Mutants (tests/mutants) prove that each exercise's tests catch plausible *wrong* answers: that each one scores
less than full marks. This file asks more of the tests for the laziest answers: no points at all. It found the
"must raise ValueError" tests paying for a function that raises for everything (they now first ask for one valid
answer: minillm.course.checks.assert_rejects), a merge test that zipped over an empty reply, a RoPE property the
identity satisfied, and parametrized cases (a one-word vocabulary, an empty range, no drafts) whose right answer
*is* the input or [] (they moved into the properties tests, beside real checks).
"""
from __future__ import annotations

import pytest

from minillm.course.grader import Submission, grade_submissions
from minillm.course.mutants import build_submission
from minillm.course.registry import EXERCISES, repo_root

pytestmark = pytest.mark.slow
STUBS = {
    "raises": "raise ValueError('refused')",
    "returns_none": "return None",
    "returns_zero": "return 0",
    "returns_empty": "return []",
    "returns_its_input": "return args[0] if args else None",
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """(stub, exercise id) -> ExerciseResult, every stub of every exercise graded in two sessions side by side."""
    base = tmp_path_factory.mktemp("stubs")
    jobs, subs = [], []
    for stub, body in STUBS.items():
        for ex_id, ex in EXERCISES.items():
            source = base / "stubs" / f"{ex_id}-{stub}.py"
            source.parent.mkdir(exist_ok=True)
            source.write_text(f'def {ex.function}(*args, **kwargs):\n    """{stub}"""\n    {body}\n')
            subs.append(Submission(ex, build_submission(source, base / stub / ex_id, ex_id)))
            jobs.append((stub, ex_id))
    return dict(zip(jobs, grade_submissions(subs, repo_root(), timeout=120.0, jobs=2)))


@pytest.mark.parametrize("stub", list(STUBS))
def test_a_stub_earns_no_point(graded, stub):
    paid = {ex_id: (r.earned, [t.name for t in r.tests if t.earned]) for (s, ex_id), r in graded.items()
            if s == stub and r.earned}
    assert not paid, f"a function that does nothing but {stub.replace('_', ' ')} earned points: {paid}"
