"""One source of truth: exercises/ and solutions/ are generated from the reference's marked regions."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from minillm.course import sync
from minillm.course.registry import EXERCISES, Exercise, repo_root

FIXTURES = Path(__file__).parent / "fixtures"

TOY = [
    Exercise(id="ch01.scale", function="scale", source="ref/toy.py", points=1, hint="multiply",
             signature="scale(x: torch.Tensor, factor: float) -> torch.Tensor", called_from="nowhere"),
    Exercise(id="ch02.two_blocks", function="two_blocks", source="ref/toy.py", points=1, hint="add one",
             signature="two_blocks(n: int) -> int", called_from="nowhere"),
]


def toy_root(tmp_path: Path, *extra: str) -> Path:
    (tmp_path / "ref").mkdir()
    shutil.copy(FIXTURES / "ref" / "toy.py", tmp_path / "ref" / "toy.py")
    for name in extra:
        shutil.copy(FIXTURES / "ref" / name, tmp_path / "ref" / name.replace(".txt", ".py"))
    return tmp_path


def test_generates_solution_and_stub(tmp_path):
    result = sync.build(toy_root(tmp_path), TOY, scan_dirs=["ref"])
    assert sorted(result.files) == ["exercises/ch01_basics.py", "exercises/ch02_kv_cache.py",
                                    "solutions/ch01_basics.py", "solutions/ch02_kv_cache.py"]
    sol, stub = result.files["solutions/ch01_basics.py"], result.files["exercises/ch01_basics.py"]
    assert "return x * factor" in sol and "return x * factor" not in stub
    assert '"""Multiply by factor."""' in stub and "def scale(x: torch.Tensor, factor: float) -> torch.Tensor:" in stub
    assert f"ch01.scale is {sync.NOT_ATTEMPTED}" in stub
    assert "helper_outside" not in sol and ">>>" not in sol and "<<<" not in stub
    assert "ref/toy.py" in sol and "edit the reference" in sol.lower()
    two = result.files["exercises/ch02_kv_cache.py"]
    assert two.count("raise NotImplementedError(") == 2 and "return n + 1" not in two
    ns: dict = {}
    exec(compile(sol, "sol", "exec"), ns)  # the generated solution runs on its own imports
    import torch
    assert torch.equal(ns["scale"](torch.ones(2), 3.0), torch.full((2,), 3.0))
    ns = {}
    exec(compile(two, "stub", "exec"), ns)
    with pytest.raises(NotImplementedError, match=sync.NOT_ATTEMPTED):
        ns["two_blocks"](1)


def test_write_then_no_drift(tmp_path):
    root = toy_root(tmp_path)
    result = sync.build(root, TOY, scan_dirs=["ref"])
    assert sorted(sync.write(result, root)) == sorted(result.files)
    assert sync.drift(result, root) == [] and sync.write(result, root) == []
    (root / "solutions/ch01_basics.py").write_text("# hand edit\n")
    assert sync.drift(result, root) == ["solutions/ch01_basics.py"]


def test_missing_region_is_reported_not_generated(tmp_path):
    extra = Exercise(id="ch01.absent", function="absent", source="ref/toy.py", points=1, hint="h",
                     signature="absent()", called_from="nowhere")
    result = sync.build(toy_root(tmp_path), TOY + [extra], scan_dirs=["ref"])
    assert [e.id for e in result.missing] == ["ch01.absent"]


def test_unregistered_region_is_reported(tmp_path):
    result = sync.build(toy_root(tmp_path, "unregistered.py"), TOY, scan_dirs=["ref"])
    assert [r.exercise_id for r in result.unregistered] == ["ch01.mystery"]


def test_unclosed_region_fails(tmp_path):
    root = toy_root(tmp_path)
    shutil.copy(FIXTURES / "ref" / "unclosed.txt", root / "ref" / "toy.py")
    with pytest.raises(sync.MarkerError, match="never closed"):
        sync.build(root, TOY, scan_dirs=["ref"])


def test_signature_change_fails(tmp_path):
    root = toy_root(tmp_path)
    text = (root / "ref/toy.py").read_text().replace("def scale(x: torch.Tensor, factor", "def scale(x: torch.Tensor, k")
    (root / "ref/toy.py").write_text(text)
    with pytest.raises(sync.MarkerError, match="registry's signature"):
        sync.build(root, TOY, scan_dirs=["ref"])


def test_committed_files_match_the_markers():
    result = sync.build()
    missing = [f"{e.id} ({e.source})" for e in result.missing]
    if missing:
        pytest.skip(f"reference files without their exercise markers yet: {', '.join(missing)}")
    stale = sync.drift(result)
    assert not stale, f"{stale} differ from the reference's markers: run `minillm course sync`"


def test_every_marked_region_is_registered():
    unregistered = [f"{r.exercise_id} in {r.source}" for r in sync.build().unregistered]
    assert not unregistered, (f"marked but not registered: {unregistered}; add each to minillm/course/registry.py "
                              "with graded tests in tests/graded and a mutant in tests/mutants")


def test_registry_is_well_formed():
    for ex in EXERCISES.values():
        assert ex.param_names, ex.id
        assert ex.hint and "\n" not in ex.hint, f"{ex.id}: the hint must be one line"
        assert (repo_root() / ex.source).is_file(), f"{ex.id}: {ex.source} does not exist"
