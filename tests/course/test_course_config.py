"""One seed per release, assignments by chapter, nudges before hints: the course configuration and what it drives.

The first tests need no process; the last grades one wrong submission three times (about 3 s a run).
"""
from __future__ import annotations

import json
import re
import zipfile

import pytest

from minillm.course import checks, gradescope, report
from minillm.course import config as course_config
from minillm.course.config import DEFAULT_SEED, CourseConfig, parse_chapters
from minillm.course.grader import ExerciseResult, GradeReport, Submission, grade, grade_submissions
from minillm.course.mutants import build_submission
from minillm.course.registry import EXERCISES, get, repo_root

ROOT = repo_root()


def test_parse_and_validate():
    assert parse_chapters("ch05,ch06") == (5, 6) and parse_chapters(" 6, ch05 ,5") == (5, 6)
    assert parse_chapters(None) == ()
    with pytest.raises(ValueError, match="--chapters is empty"):  # '' meant every chapter: an assignment of all
        parse_chapters("")
    with pytest.raises(ValueError, match="'ch99' is not a chapter"):
        parse_chapters("ch05,ch99")
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2147483647\], got -1"):
        CourseConfig(seed=-1)
    with pytest.raises(ValueError, match="unknown chapters"):
        CourseConfig(chapters=(42,))


def test_config_round_trip_and_public_part(tmp_path):
    assert course_config.load(tmp_path) == CourseConfig(seed=DEFAULT_SEED)  # no course.json: a fixed default
    cfg = CourseConfig(seed=5, chapters=(5, 6), hidden_seed=77)
    course_config.write(cfg, tmp_path)
    assert course_config.load(tmp_path) == cfg
    assert json.loads(cfg.public().to_json()) == {"seed": 5, "chapters": [5, 6]}
    (tmp_path / "course.json").write_text('{"seed": 1, "answers": "here"}')
    with pytest.raises(ValueError, match="expected an object with seed, chapters, hidden_seed and time_budget_s"):
        course_config.load(tmp_path)


def test_a_time_budget_is_checked_kept_and_always_in_the_autograder(tmp_path):
    """The whole run's time budget (see minillm.course.grader): course.json's time_budget_s, which the Gradescope
    archive always carries (Gradescope shows no score for a run past its timeout), and --time-budget."""
    from minillm.cli import build_parser
    from minillm.course.cli import _check_grade_numbers
    for bad in (0, -1.0, float("inf"), float("nan"), True, "60"):
        with pytest.raises(ValueError, match="time_budget_s must be a finite number of seconds > 0"):
            CourseConfig(time_budget_s=bad)
    cfg = CourseConfig(seed=5, chapters=(2,), hidden_seed=3, time_budget_s=300.0)
    course_config.write(cfg, tmp_path)
    assert course_config.load(tmp_path) == cfg and cfg.public().time_budget_s == 300.0
    args = build_parser().parse_args(["grade", "--time-budget", "0"])
    with pytest.raises(ValueError, match="--time-budget must be a finite number of seconds > 0, got 0.0"):
        _check_grade_numbers(args)
    names = gradescope.build_autograder(tmp_path / "ag.zip", config=CourseConfig(seed=1))
    with zipfile.ZipFile(tmp_path / "ag.zip") as z:
        assert json.loads(z.read("course.json"))["time_budget_s"] == course_config.GRADESCOPE_TIME_BUDGET_S < 600
        assert "--time-budget" in z.read("run_autograder").decode() and "course.json" in names


def test_graded_seed_is_fixed_and_hidden_tests_use_their_own(monkeypatch):
    monkeypatch.setattr(checks, "GRADE_SEED", 1000)
    monkeypatch.setattr(checks, "HIDDEN_SEED", None)
    assert checks.graded_seed(3) == checks.graded_seed(3) == 1003
    monkeypatch.setattr(checks, "HIDDEN_SEED", 50)
    namespace = {"graded_seed": checks.graded_seed}
    exec(compile("seed = graded_seed(3)", f"/x/tests/graded/hidden/test_hidden_ch09.py", "exec"), namespace)
    assert namespace["seed"] == 53 and checks.graded_seed(3) == 1003


def test_nudge_before_an_attempt_hint_after_a_failure():
    assert all(ex.nudge != ex.hint for ex in EXERCISES.values()), "a nudge must say less than the hint"
    missing = [ex.id for ex in EXERCISES.values() if not ex.nudge]
    assert not missing, f"exercises without a nudge: {missing}"
    stub = ExerciseResult("ch05.slot_mapping", "THE HINT", 10.0, status="not attempted", nudge="THE NUDGE")
    wrong = ExerciseResult("ch05.slot_mapping", "THE HINT", 10.0, status="fail", message="got [1], expected [2]",
                           nudge="THE NUDGE")
    text = report.format_table(GradeReport("exercises", [stub], 1.0, seed=42))
    assert "nudge: THE NUDGE" in text and "THE HINT" not in text and "--seed 42 reproduces" in text
    text = report.format_table(GradeReport("exercises", [wrong], 1.0, seed=42))
    assert "hint: THE HINT" in text and "THE NUDGE" not in text
    res = gradescope.results_json(GradeReport("exercises", [stub], 1.0, seed=42, chapters=[5]))
    assert res["extra_data"] == {"seed": 42, "chapters": [5], "impl": "exercises"} and "inputs seed 42" in res["output"]


@pytest.mark.slow
def test_a_chapter_never_written_gets_the_nudge_not_the_hint(tmp_path):
    """A single-file upload of ch01 graded for ch02 showed ch02's strong hint (the mask's formula) for functions
    never written: a missing module is "not attempted" with the nudge. A module that fails to import costs every
    exercise in it, with the reason; the hint only for the function the learner wrote, the nudge for the stubs."""
    only_ch01, broken = tmp_path / "only_ch01", tmp_path / "broken"
    only_ch01.mkdir()
    broken.mkdir()
    (only_ch01 / "ch01_basics.py").write_text((ROOT / "solutions" / "ch01_basics.py").read_text())
    stub = (ROOT / "exercises" / "ch02_kv_cache.py").read_text()
    written = re.sub(r'raise NotImplementedError\("ch02.causal_mask [^\n]*', "return torch.ones(q_len, kv_len) +", stub)
    assert written != stub
    (broken / "ch02_kv_cache.py").write_text(written)  # causal_mask written (with a syntax error), the rest stubs
    line = written.splitlines().index("    return torch.ones(q_len, kv_len) +") + 1
    mask, size = get("ch02.causal_mask"), get("ch02.kv_cache_bytes")
    results = grade_submissions([Submission(mask, only_ch01), Submission(size, only_ch01), Submission(mask, broken),
                                 Submission(size, broken)], ROOT, timeout=60.0)
    for r in results[:2]:
        assert r.status == "not attempted" and r.earned == 0, (r.id, r.status, r.message)
        assert r.message == f"{r.id} is not attempted yet: ch02_kv_cache.py is not in the submission"
        assert r.advice == f"nudge: {r.nudge}"
    for r in results[2:]:
        assert r.status == "error" and r.earned == 0, (r.id, r.status, r.message)
        assert f"failed to import: SyntaxError: invalid syntax (ch02_kv_cache.py, line {line})" in r.message
    assert results[2].advice == f"hint: {mask.hint}" and results[3].advice == f"nudge: {size.nudge}"
    missing = json.dumps(gradescope.results_json(GradeReport("x", results[:2], 1.0)))
    assert "not attempted: ch02_kv_cache.py is not in the submission" in missing and mask.hint not in missing
    assert size.hint not in json.dumps(gradescope.results_json(GradeReport("x", results[3:], 1.0)))


@pytest.mark.slow
def test_the_same_wrong_submission_scores_the_same_every_run(tmp_path):
    """A mutant that is wrong only on some inputs: fresh seeds once gave it 0, 2 or 4 points; one seed, one score."""
    mutant = ROOT / "tests" / "mutants" / "ch05.slot_mapping"
    folder = build_submission(sorted(mutant.glob("*.py"))[0], tmp_path / "sub", "ch05.slot_mapping")
    runs = [grade("ch05.slot_mapping", impl=folder, jobs=1) for _ in range(2)]
    again = grade("ch05.slot_mapping", impl=folder, jobs=1, seed=runs[0].seed)  # what --seed does
    scores = {(r.seed, r.score, tuple(t.outcome for t in r.exercises[0].tests)) for r in runs + [again]}
    assert len(scores) == 1, scores
    assert runs[0].seed == course_config.load().seed and runs[0].score < runs[0].max_score
