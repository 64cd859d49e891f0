"""Notebook tooling: percent .py -> executed .ipynb with the solution's outputs; nbval passes with the
solutions and fails with the blank stubs (so a chapter's checked cells grade the learner too)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.course import notebooks
from minillm.course.registry import repo_root

FIXTURE = Path(__file__).parent / "fixtures" / "chapters" / "01_demo.py"
pytestmark = pytest.mark.slow


def nbval(ipynb: Path, impl: str, fallback: str = "1") -> subprocess.CompletedProcess:
    env = {**os.environ, "MINILLM_IMPL": impl, "MINILLM_FALLBACK": fallback}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-sanitize-with", str(repo_root() / "chapters" / "sanitize.cfg"), str(ipynb)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ipynb.parent)


def test_build_check_and_grade_a_chapter(tmp_path):
    py = tmp_path / FIXTURE.name
    shutil.copy(FIXTURE, py)
    assert notebooks.out_of_sync(tmp_path) == [f"01_demo.ipynb is missing: run `minillm course notebooks 01_demo`"]
    ipynb = notebooks.build(py, execute=True)
    assert notebooks.out_of_sync(tmp_path) == []
    text = ipynb.read_text()
    assert "[[1, 1, 1, 0], [1, 1, 1, 1]]" in text  # the solution's output is stored

    ok = nbval(ipynb, "solutions")
    assert ok.returncode == 0, ok.stdout[-3000:]  # the timing and the address differ, but are sanitised
    bad = nbval(ipynb, "exercises", fallback="0")
    assert bad.returncode != 0 and "not attempted" in bad.stdout, bad.stdout[-3000:]

    # `minillm grade --notebooks`: the failing checked cells, by index, first line and expected vs got
    passed, lines = notebooks.grade_notebook(ipynb, "solutions")
    assert passed and lines == ["01_demo.ipynb: pass"], lines
    passed, lines = notebooks.grade_notebook(ipynb, "exercises")  # a stub raises: no fallback when grading
    assert not passed and lines[0] == "01_demo.ipynb: fail (1 cell)", lines
    assert lines[1].startswith("  cell 2 `print(causal_mask(2, 4).int().tolist())`: raised NotImplementedError: "
                               "ch02.causal_mask is not attempted yet"), lines
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "ch02_kv_cache.py").write_text(
        "import torch\ndef causal_mask(q_len, kv_len, device=None):\n"
        "    return torch.ones(q_len, kv_len, dtype=torch.bool)\n")
    passed, lines = notebooks.grade_notebook(ipynb, str(wrong))
    assert lines[1:] == ["  cell 2 `print(causal_mask(2, 4).int().tolist())`: "
                         "expected '[[1, 1, 1, 0], [1, 1, 1, 1]]', got '[[1, 1, 1, 1], [1, 1, 1, 1]]'"], lines

    ids = [cell["id"] for cell in json.loads(text)["cells"]]  # by position: a rebuild changes no id
    rebuilt = json.loads(notebooks.build(py, execute=False).read_text())["cells"]
    assert ids == [f"cell-{i}" for i in range(len(ids))] == [cell["id"] for cell in rebuilt]
    py.write_text(py.read_text().replace("causal_mask(2, 4)", "causal_mask(3, 4)"))
    assert notebooks.out_of_sync(tmp_path) == ["01_demo.ipynb differs from 01_demo.py: run `minillm course notebooks 01_demo`"]


def test_repository_chapters_are_in_sync():
    problems = notebooks.out_of_sync()
    assert not problems, problems


def test_a_real_chapter_shows_the_learners_wrong_answer(tmp_path):
    """Chapter 5 run with a slot_mapping that ignores the block table past its first block (a mutant; every other
    function correct): the checked cells that print slots differ from the stored (solution's) output, and
    `minillm grade --notebooks` names them. The notebook really runs the learner's code."""
    from minillm.course.mutants import build_submission
    mutant = repo_root() / "tests" / "mutants" / "ch05.slot_mapping" / "contiguous_blocks.py"
    wrong = build_submission(mutant, tmp_path / "wrong", "ch05.slot_mapping")
    ipynb = repo_root() / "chapters" / "05_paged_attention.ipynb"
    passed, lines = notebooks.grade_notebook(ipynb, str(wrong))
    assert not passed and lines[0].startswith("05_paged_attention.ipynb: fail"), lines
    # the slots gathered for the attention demo come from the wrong blocks
    assert "expected 'blocks touched: [0, 1, 5]', got 'blocks touched: [0, 1, 2]'" in "\n".join(lines), lines
    # (the solutions pass: every chapter under nbval in `make test`, and grade_notebook's own pass on the demo chapter
    # above; running this chapter a second time here cost 40 s of CI)


def test_smoke_runs_chapters_as_scripts_and_names_the_one_that_fails(tmp_path, capsys):
    """`minillm course notebooks --smoke`: each chapter runs in its own folder, top-level await allowed, display
    available as in a notebook; a failing chapter is named with the end of its traceback and counted."""
    from minillm.course.chapter_smoke import smoke
    good = tmp_path / "01_good.py"
    good.write_text("# %%\nimport asyncio\nfrom pathlib import Path\n\nawait asyncio.sleep(0)\n"
                    "display(Path('data.txt').read_text())  # the chapter's folder is the working directory\n")
    (tmp_path / "data.txt").write_text("hello")
    bad = tmp_path / "02_bad.py"
    bad.write_text("# %%\nx = 1\n# %%\nraise ValueError('cell two broke')\n")
    assert smoke([good, bad], jobs=2) == 1
    out = capsys.readouterr().out
    assert re.search(r"01_good\.py\s+ok", out) and re.search(r"02_bad\.py\s+failed", out)
    assert "ValueError: cell two broke" in out
    with pytest.raises(ValueError, match="jobs must be a positive integer, got 0"):
        smoke([good], jobs=0)


def test_check_reads_only_the_named_chapters(tmp_path):
    """`minillm course notebooks --check NAME` checked every chapter (the names were ignored); a name that matches
    no chapter is refused with the chapters there are, not taken as an empty selection that passes."""
    for stem in ("01_done", "02_draft"):
        (tmp_path / f"{stem}.py").write_text("# %%\nx = 1\n")
    notebooks.build(tmp_path / "01_done.py", execute=False)  # 02_draft has no .ipynb yet
    assert notebooks.out_of_sync(tmp_path, names=["01_done"]) == []
    assert notebooks.out_of_sync(tmp_path, names=["02_draft.py"]) == [
        "02_draft.ipynb is missing: run `minillm course notebooks 02_draft`"]
    assert len(notebooks.out_of_sync(tmp_path)) == 1
    with pytest.raises(ValueError, match=r"no chapter '03_gone'; the chapters are 01_done, 02_draft$"):
        notebooks.sources(tmp_path, names=["01_done", "03_gone"])
