"""Report formats and comparison messages, on hand-made results (no processes started)."""
from __future__ import annotations

import json

import pytest
import torch

from minillm.course import gradescope, report
from minillm.course.checks import assert_close, assert_equal, assert_scalar_close
from minillm.course.grader import ExerciseResult, GradeReport, TestResult


def sample_report() -> GradeReport:
    ok = ExerciseResult("ch01.rms_norm", "use eps", 3.0, 3.0, "pass", "", 1.0,
                        [TestResult("a::t1", "t1", 2.0, 2.0, "passed"), TestResult("h::t2", "t2", 1.0, 1.0, "passed", hidden=True)])
    bad = ExerciseResult("ch01.rope", "pair i with i + D/2", 2.0, 0.0, "fail",
                         "t3: output: max abs err 0.5 (atol 1e-05), first bad index (0, 1): got 1, expected 0.5", 1.0,
                         [TestResult("a::t3", "t3", 2.0, 0.0, "failed", "output: max abs err 0.5", "Traceback: boom")])
    dead = ExerciseResult("ch02.causal_mask", "bottom-right", 4.0, 0.0, "timeout", "timed out after 10 s", 10.0,
                          [TestResult("a::t4", "t4", 4.0, 0.0, "not run", "timed out after 10 s")], log="last words")
    return GradeReport("exercises", [ok, bad, dead], 12.5)


def test_table_shows_points_status_first_failure_and_hint():
    text = report.format_table(sample_report())
    assert "ch01.rms_norm                     3 / 3  pass" in text
    assert "ch01.rope                         0 / 2  fail" in text and "first bad index (0, 1)" in text
    assert "hint: pair i with i + D/2" in text and "timed out after 10 s" in text
    assert "total: 3 / 9 (33.3%)" in text and "Traceback: boom" not in text
    verbose = report.format_table(sample_report(), verbose=True)
    assert "Traceback: boom" in verbose and "last words" in verbose


def test_json_has_the_same_content():
    data = json.loads(report.format_json(sample_report()))
    assert data["score"] == 3 and data["max_score"] == 9
    assert [e["status"] for e in data["exercises"]] == ["pass", "fail", "timeout"]
    assert data["exercises"][1]["hint"] == "pair i with i + D/2" and "traceback" not in data["exercises"][1]["tests"][0]


def test_gradescope_results():
    res = gradescope.results_json(sample_report())
    assert res["score"] == 3 and res["stdout_visibility"] == "hidden" and res["execution_time"] == 12.5
    names = [t["name"] for t in res["tests"]]
    assert names == ["ch01.rms_norm: t1", "ch01.rms_norm: t2", "ch01.rope: t3", "ch02.causal_mask: t4"]
    hidden = res["tests"][1]
    assert hidden["visibility"] == "after_published" and hidden["status"] == "passed"
    assert res["tests"][3]["output"].startswith("timeout: timed out after 10 s")
    assert "hint: pair i with i + D/2" in res["tests"][2]["output"]
    assert "ch01.rms_norm: all visible tests passed" in res["output"]
    assert [t["number"] for t in res["tests"]] == ["1.1", "1.2", "2.1", "3.1"]


def test_assert_close_message_names_errors_and_index():
    expected = torch.tensor([[0.0, 1.0], [2.0, float("-inf")]])
    actual = expected.clone()
    actual[1, 0] = 2.5
    with pytest.raises(AssertionError, match=r"max abs err 0.5 .*first bad index \(1, 0\): got 2.5, expected 2"):
        assert_close(actual, expected, "out")
    actual = expected.clone()
    actual[1, 1] = 0.0
    with pytest.raises(AssertionError, match=r"1 of 4 differ in where they are -inf/inf/nan, first bad index \(1, 1\)"):
        assert_close(actual, expected, "out")
    with pytest.raises(AssertionError, match=r"dtype torch.float64, expected torch.float32"):
        assert_close(expected.double(), expected)
    with pytest.raises(AssertionError, match=r"shape \(4,\), expected \(2, 2\)"):
        assert_close(expected.reshape(4), expected)
    bf = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert_close(bf * 1.004, bf)  # within bf16's tolerance: one rounding


def test_assert_equal_and_scalar():
    with pytest.raises(AssertionError, match=r"1 of 3 entries differ, first bad index \(2,\): got True, expected False"):
        assert_equal(torch.tensor([True, False, True]), torch.tensor([True, False, False]))
    assert_scalar_close(1.0 + 1e-12, 1.0)
    with pytest.raises(AssertionError, match="expected a number"):
        assert_scalar_close("1.0", 1.0)
