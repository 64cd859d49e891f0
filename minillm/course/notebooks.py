"""Build the chapter notebooks from their percent-format sources, with the solution's outputs stored.

A chapter is authored as `chapters/NN_topic.py` in jupytext's percent format (`# %%` code cells,
`# %% [markdown]` text cells): it diffs and reviews like code. `minillm course notebooks` writes the paired
`chapters/NN_topic.ipynb` and executes it with MINILLM_IMPL=solutions, so the stored outputs are the
solution's; nbval then compares a learner's run (`MINILLM_IMPL=exercises`) against them, cell by cell
where a cell is marked `# NBVAL_CHECK_OUTPUT`. `--check` only verifies that every .ipynb holds the same
cells as its .py (no execution), which `make test` runs.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from minillm.course.registry import repo_root


def sources(chapters_dir: Path | None = None, names: list[str] | None = None) -> list[Path]:
    """The percent-format chapter sources (chapters/*.py that start with a jupytext header or a cell)."""
    folder = Path(chapters_dir or repo_root() / "chapters")
    found = []
    for p in sorted(folder.glob("*.py")):
        head = p.read_text(encoding="utf-8")[:2000]
        if "# %%" in head or "format_name: percent" in head:
            if not names or p.stem in names or p.name in names:
                found.append(p)
    return found


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def out_of_sync(chapters_dir: Path | None = None) -> list[str]:
    """Problems: a .py without its .ipynb, an .ipynb without its .py, or cells that differ."""
    import jupytext
    folder = Path(chapters_dir or repo_root() / "chapters")
    problems = []
    pys = {p.stem: p for p in sources(folder)}
    for stem, py in pys.items():
        ipynb = py.with_suffix(".ipynb")
        if not ipynb.exists():
            problems.append(f"{ipynb.name} is missing: run `minillm course notebooks {stem}`")
        elif _cells(jupytext.read(py)) != _cells(jupytext.read(ipynb)):
            problems.append(f"{ipynb.name} differs from {py.name}: run `minillm course notebooks {stem}`")
    for nb in sorted(folder.glob("*.ipynb")):
        if nb.stem not in pys:
            problems.append(f"{nb.name} has no percent-format source {nb.stem}.py (author chapters as .py)")
    return problems


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(py: Path, execute: bool = True, timeout: int = 600, impl: str = "solutions") -> Path:
    """Write `py`'s .ipynb (jupytext pairing metadata included), executed with `impl` when asked."""
    import jupytext
    import nbformat
    nb = jupytext.read(py)
    nb.metadata.setdefault("jupytext", {})["formats"] = "ipynb,py:percent"
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    if execute:
        from nbclient import NotebookClient
        with _env(MINILLM_IMPL=impl, MINILLM_ROOT=str(repo_root())):
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(py.parent)}}).execute()
    out = py.with_suffix(".ipynb")
    nbformat.write(nb, out)
    return out


def grade_notebook(ipynb: Path, impl: str, timeout: float = 900.0) -> tuple[bool, str]:
    """Run `ipynb` under nbval with implementation `impl`: its checked cells must reproduce the stored
    (solution's) outputs. Returns (passed, one line)."""
    import subprocess
    import sys
    impl_path = impl if impl in ("exercises", "solutions") else str(Path(impl).resolve())
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
           "--nbval-sanitize-with", str(repo_root() / "chapters" / "sanitize.cfg"), str(ipynb)]
    try:
        run = subprocess.run(cmd, env={**os.environ, "MINILLM_IMPL": impl_path}, capture_output=True, text=True,
                             timeout=timeout, cwd=ipynb.parent)
    except subprocess.TimeoutExpired:
        return False, f"{ipynb.name}: timed out after {timeout:g} s"
    last = (run.stdout.strip().splitlines() or ["no output"])[-1]
    return run.returncode == 0, f"{ipynb.name}: {'pass' if run.returncode == 0 else 'fail'} ({last})"
