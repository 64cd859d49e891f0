"""The grader proves itself: stubs score 0, solutions 100%, every mutant is caught, a hostile submission
costs only its own exercises, and the Gradescope archive grades a submission folder end to end.

A grading run is a couple of pytest sessions (a few seconds each to start, mostly importing torch) and one
sandbox worker per submission, forked from a warm template in well under a second; the module still shares its
two full gradings through module-scoped fixtures, and grades every mutant in one run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from minillm.course import config as course_config
from minillm.course import gradescope, report
from minillm.course.grader import grade
from minillm.course.mutants import find_mutants, run_mutants
from minillm.course.registry import EXERCISES, repo_root
from minillm.course.release import release

ROOT = repo_root()
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def solutions_report():
    return grade(impl="solutions", jobs=2)


@pytest.fixture(scope="module")
def stubs_json():
    out = subprocess.run([sys.executable, "-m", "minillm.cli", "grade", "--impl", "exercises", "--format", "json"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_stubs_score_zero_and_are_not_attempted(stubs_json):
    assert stubs_json["score"] == 0 and stubs_json["max_score"] == sum(e.points for e in EXERCISES.values())
    for ex in stubs_json["exercises"]:
        assert ex["status"] == "not attempted", f"{ex['id']}: {ex['status']} ({ex['message']})"
        assert all(t["outcome"] == "not_attempted" for t in ex["tests"]), ex["id"]


def test_solutions_score_full(solutions_report):
    for ex in solutions_report.exercises:
        assert ex.status == "pass" and ex.earned == ex.points, f"{ex.id}: {ex.status}: {ex.message}"
    assert solutions_report.score == solutions_report.max_score > 0
    table = report.format_table(solutions_report)
    assert f"total: {solutions_report.score:g} / {solutions_report.max_score:g} (100.0%)" in table


@pytest.mark.parametrize("seed", [2, 3])
def test_solutions_score_full_at_other_seeds(seed):
    """The graded tests draw their inputs from the release's seed: the reference must score full marks whatever
    that seed is, or some test depends on luck (a sampled mean within a fixed tolerance, say) and will one day fail
    a right answer. (Seeds 1 to 11 were checked by hand when this test came in; at seed 3 it caught a test that
    compared a formula with 40,000 sampled verify steps.)"""
    result = grade(impl="solutions", jobs=2, seed=seed)
    failed = [f"{ex.id}: {ex.message}" for ex in result.exercises if ex.earned != ex.points]
    assert not failed and result.score == result.max_score, f"seed {seed}: {failed}"


def test_graded_points_add_up_to_the_registry(solutions_report):
    for ex in solutions_report.exercises:
        total = sum(t.points for t in ex.tests)
        assert total == EXERCISES[ex.id].points, (f"{ex.id}: its graded tests carry {total:g} points, the registry "
                                                  f"says {EXERCISES[ex.id].points}")
        assert all(t.points > 0 for t in ex.tests), f"{ex.id}: a graded test without @pytest.mark.points"


def test_every_exercise_has_a_mutant():
    lacking = [ex_id for ex_id, files in find_mutants().items() if not files]
    assert not lacking, f"exercises without a mutant under tests/mutants/<id>/: {lacking}"


def test_every_mutant_is_caught(tmp_path):
    outcomes = run_mutants(tmp_path, jobs=2)
    assert len(outcomes) >= len(EXERCISES)
    survivors = [f"{o.exercise_id}/{o.mutant.name} ({o.result.status}: {o.result.message})"
                 for o in outcomes if not o.caught]
    assert not survivors, f"mutants the graded tests did not catch: {survivors}"


HOSTILE_CH01 = '''

def rms_norm(x, weight, eps):  # an infinite loop
    while True:
        pass


def apply_rotary(x, cos, sin):  # leaves without a word
    import os
    os._exit(0)


def top_k_filter(logits, top_k):
    import sys
    sys.exit(3)


def top_p_filter(logits, top_p):  # fools the comparison, if it can
    torch.equal = lambda *a, **k: True
    torch.Tensor.__eq__ = lambda *a, **k: True
    return logits
'''

HOSTILE_CH02 = '''

_correct_causal_mask = causal_mask
_SHOUTED = []


def causal_mask(q_len, kv_len, device=None):  # right, after a few kB of prints (prints are free; a flood is not)
    if not _SHOUTED:
        _SHOUTED.append(1)
        print("x" * 10_000)
    return _correct_causal_mask(q_len, kv_len, device)
'''

HOSTILE_CH05 = '''

_correct_hash_block = hash_block


def slot_mapping(block_table, start, end, block_size):  # a segfault, if ctypes were allowed
    import ctypes
    ctypes.string_at(0)


def hash_block(parent_hash, token_ids):  # right, with warnings on the way
    import warnings
    warnings.warn("a learner's warning", UserWarning)
    warnings.warn("a deprecated thing", DeprecationWarning)
    return _correct_hash_block(parent_hash, token_ids)
'''


def hostile_submission(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for module, extra in [("ch01_basics", HOSTILE_CH01), ("ch02_kv_cache", HOSTILE_CH02), ("ch05_paged_kv", HOSTILE_CH05)]:
        (folder / f"{module}.py").write_text((ROOT / "solutions" / f"{module}.py").read_text() + extra)
    return folder


def test_every_graded_test_file_collects_in_the_autograder_archive(tmp_path):
    """The graded tests of ch09 and ch11 import helpers from tests/ (test_engine, tiny, tiny_moe) that the archive
    left out: on Gradescope their files failed to collect, and a whole-course assignment scored the solutions
    0 / 480. Every graded file must import from the unpacked archive alone."""
    zip_path = tmp_path / "autograder.zip"
    names = gradescope.build_autograder(zip_path, config=course_config.CourseConfig())
    assert {"tests/test_engine.py", "tests/tiny.py", "tests/tiny_moe.py"} <= set(names)
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(tmp_path / "source")
    source = tmp_path / "source"
    (tmp_path / "venv_like").mkdir()
    only = _only_installed(["torch", *gradescope.GRADING_REQUIREMENTS])
    (tmp_path / "venv_like" / "sitecustomize.py").write_text(only)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source), str(tmp_path / "venv_like")]),
           "MINILLM_ROOT": str(source), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    run = subprocess.run([sys.executable, "-c", "import minillm.cli; minillm.cli.build_parser()"], cwd=source,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]  # run_autograder's `python -m minillm.cli grade`
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/graded"], cwd=source, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def _only_installed(requirements: list[str]) -> str:
    """A sitecustomize that makes this environment look like Gradescope's after setup.sh: a top-level module of an
    installed distribution outside `requirements` and their dependencies cannot be imported (the --no-deps
    install of the package left out tqdm, which the CLI imports: every submission got no results.json)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    keep, todo = set(), list(requirements)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in keep:
            continue
        keep.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [r.name for r in map(Requirement, reqs) if not r.marker or r.marker.evaluate({"extra": ""})]
    keep.add("minillm")
    blocked = sorted(module for module, dists in metadata.packages_distributions().items()
                     if module.isidentifier() and not any(d.lower().replace("_", "-") in keep for d in dists))
    return f"""import importlib.abc, sys
BLOCKED = {set(blocked)!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed by setup.sh)")
sys.meta_path.insert(0, Block())
"""


def test_autograder_archive_grades_a_hostile_submission(tmp_path):
    zip_path = tmp_path / "autograder.zip"
    assignment = course_config.CourseConfig(seed=7, chapters=(1, 2, 5), hidden_seed=99)
    names = gradescope.build_autograder(zip_path, config=assignment)
    assert {"setup.sh", "run_autograder", "course.json", "tests/graded/hidden/test_hidden_ch01_ch02.py",
            "minillm/course/grader.py"} <= set(names)
    # no answers ship: no solutions/, no exercises/ (the graded tests compare against the engine's own functions)
    assert not any(n.startswith(("solutions/", "tests/mutants", "tests/course", "exercises/")) for n in names)
    ag = tmp_path / "autograder"
    with zipfile.ZipFile(zip_path) as z:
        z.extractall(ag / "source")
    assert json.loads((ag / "source" / "course.json").read_text()) == {
        "seed": 7, "chapters": [1, 2, 5], "hidden_seed": 99,
        "time_budget_s": course_config.GRADESCOPE_TIME_BUDGET_S}  # always a budget: results.json before the timeout
    hostile_submission(ag / "submission")
    env = {**os.environ, "MINILLM_AUTOGRADER_ROOT": str(ag), "MINILLM_PYTHON": sys.executable,
           "MINILLM_GRADE_TIMEOUT": "120", "MINILLM_SANDBOX_CALL_TIMEOUT_S": "5"}  # the infinite loop ends in 5 s
    env.pop("MINILLM_ROOT", None)
    run = subprocess.run(["bash", str(ag / "source" / "run_autograder")], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads((ag / "results" / "results.json").read_text())

    assert set(results) >= {"score", "execution_time", "stdout_visibility", "tests", "extra_data"}
    assert results["stdout_visibility"] == "hidden"
    assert results["extra_data"]["seed"] == 7 and results["extra_data"]["chapters"] == [1, 2, 5]
    assert "inputs seed 7" in results["output"] and "99" not in results["output"]  # the hidden seed stays hidden
    for t in results["tests"]:
        assert set(t) == {"name", "number", "score", "max_score", "status", "output", "output_format", "visibility"}
        assert t["status"] in ("passed", "failed") and t["visibility"] in ("visible", "after_published")
    by_exercise: dict[str, list[dict]] = {}
    for t in results["tests"]:
        by_exercise.setdefault(t["name"].split(":")[0], []).append(t)
    # exactly the assignment's chapters are graded: a ch01/02/05 submission is not charged for ch03, ch04, ch06
    assert {ex[:4] for ex in by_exercise} == {"ch01", "ch02", "ch05"}
    earned = {ex: sum(t["score"] for t in ts) for ex, ts in by_exercise.items()}
    expected = {"ch01.arithmetic_intensity": 5, "ch01.rms_norm": 0, "ch01.rope": 0, "ch01.top_k_filter": 0,
                "ch01.top_p_filter": 0, "ch02.causal_mask": 10, "ch05.slot_mapping": 0, "ch05.hash_block": 5}
    assert {ex: earned.get(ex) for ex in expected} == expected
    assert results["score"] == sum(earned.values()) >= 20
    first = {ex: next(t["output"] for t in ts if t["status"] == "failed") for ex, ts in by_exercise.items()
             if earned[ex] == 0}
    assert "timed out after" in first["ch01.rms_norm"]
    assert "exited (code 0)" in first["ch01.rope"]
    assert "called sys.exit(3)" in first["ch01.top_k_filter"]
    assert "replaced torch.equal" in first["ch01.top_p_filter"] or "replaced torch.Tensor.__eq__" in first["ch01.top_p_filter"]
    assert "ctypes.string_at is refused" in first["ch05.slot_mapping"]
    assert any(t["visibility"] == "after_published" for t in results["tests"])
    assert "ch02.causal_mask: all visible tests passed" in results["output"]


def test_student_release_has_no_answers_and_still_grades(tmp_path):
    dest = tmp_path / "student"
    written = release(dest, config=course_config.CourseConfig(seed=11, chapters=(2,), hidden_seed=5))
    assert "exercises/ch01_basics.py" in written and "tests/graded/test_ch01_basics.py" in written
    for gone in ("solutions", "tests/graded/hidden", "tests/mutants", "tests/course", ".git", ".venv"):
        assert not (dest / gone).exists(), f"{gone} leaked into the student release"
    assert json.loads((dest / "course.json").read_text()) == {"seed": 11, "chapters": [2]}  # no hidden seed
    # without solutions/, the graded tests compare against the engine's own function
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(ROOT / "solutions" / "ch02_kv_cache.py", mine / "ch02_kv_cache.py")
    passed = grade(impl=mine, root=dest)  # no target: the release's assignment, chapter 2 only
    stubs = grade(impl="exercises", root=dest)
    assert {ex.id[:4] for ex in passed.exercises} == {"ch02"} and passed.seed == 11
    causal = next(ex for ex in passed.exercises if ex.id == "ch02.causal_mask")
    assert causal.status == "pass" and causal.earned == causal.points > 0, causal.message
    assert all(ex.status == "not attempted" for ex in stubs.exercises) and stubs.score == 0
    assert not any(t.hidden for t in causal.tests)


@pytest.mark.parametrize("where", ["parent", "grandparent", "root", "inside"])
def test_release_refuses_a_destination_that_holds_or_is_the_course_root(tmp_path, where):
    """`minillm release .. --force` deleted the course: a destination that *contains* the root passed the check
    (only the root itself and folders inside it were refused) and was rmtree'd. Refused before anything is removed."""
    root = tmp_path / "work" / "course"
    (root / "exercises").mkdir(parents=True)
    (root / "exercises" / "precious.py").write_text("# the instructor's work\n")
    (tmp_path / "work" / "beside.txt").write_text("another project's file\n")
    dest = {"parent": tmp_path / "work", "grandparent": tmp_path, "root": root, "inside": root / "student"}[where]
    with pytest.raises(ValueError, match="must lie outside the course root .* and not hold it"):
        release(dest, root=root, overwrite=True)
    assert (root / "exercises" / "precious.py").is_file() and (tmp_path / "work" / "beside.txt").is_file()
    assert not (root / "student").exists()
