"""Build the chapter notebooks from their percent-format sources, with the solution's outputs stored.

A chapter is authored as `chapters/NN_topic.py` in jupytext's percent format (`# %%` code cells,
`# %% [markdown]` text cells): it diffs and reviews like code. `minillm course notebooks` writes the paired
`chapters/NN_topic.ipynb` and executes it with MINILLM_IMPL=solutions, so the stored outputs are the
solution's; nbval then compares a learner's run (`MINILLM_IMPL=exercises`) against them, cell by cell
where a cell is marked `# NBVAL_CHECK_OUTPUT`. `--check` only verifies that every .ipynb holds the same
cells as its .py (no execution), which `make test` runs. `grade_notebook` (`minillm grade --notebooks`)
runs a chapter with the learner's code and names each checked cell that differs: its index, its first line,
and what was expected against what came out.
"""
from __future__ import annotations

import configparser
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from minillm.course.registry import repo_root


def sources(chapters_dir: Path | None = None, names: list[str] | None = None) -> list[Path]:
    """The percent-format chapter sources (chapters/*.py that start with a jupytext header or a cell), only
    those `names` (stems or file names) when given. A name that is no chapter is a ValueError: a typo selected
    nothing, and `--smoke` passed having run nothing."""
    folder = Path(chapters_dir or repo_root() / "chapters")
    every = []
    for p in sorted(folder.glob("*.py")):
        head = p.read_text(encoding="utf-8")[:2000]
        if "# %%" in head or "format_name: percent" in head:
            every.append(p)
    for name in names or ():
        if not any(name in (p.stem, p.name) for p in every):
            raise ValueError(f"no chapter {name!r}; the chapters are {', '.join(p.stem for p in every)}")
    return [p for p in every if not names or p.stem in names or p.name in names]


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def out_of_sync(chapters_dir: Path | None = None, names: list[str] | None = None) -> list[str]:
    """Problems: a .py without its .ipynb, an .ipynb without its .py, or cells that differ. Given `names`, only
    those chapters' (a stray .ipynb is then not looked for)."""
    import jupytext
    folder = Path(chapters_dir or repo_root() / "chapters")
    problems = []
    pys = {p.stem: p for p in sources(folder, names)}
    for stem, py in pys.items():
        ipynb = py.with_suffix(".ipynb")
        if not ipynb.exists():
            problems.append(f"{ipynb.name} is missing: run `minillm course notebooks {stem}`")
        elif _cells(jupytext.read(py)) != _cells(jupytext.read(ipynb)):
            problems.append(f"{ipynb.name} differs from {py.name}: run `minillm course notebooks {stem}`")
    for nb in sorted(folder.glob("*.ipynb")):
        if nb.stem not in pys and not names:
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
    for i, cell in enumerate(nb.cells):  # ids by position, not random: a rebuilt chapter's diff shows what changed
        cell.id = f"cell-{i}"
    if execute:
        from nbclient import NotebookClient
        with _env(MINILLM_IMPL=impl, MINILLM_ROOT=str(repo_root())):
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(py.parent)}}).execute()
    out = py.with_suffix(".ipynb")
    nbformat.write(nb, out)
    return out


def _sanitizers(cfg: Path) -> list[tuple[re.Pattern, str]]:
    """The (regex, replacement) pairs of an nbval sanitize file, in order."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(cfg, encoding="utf-8")
    return [(re.compile(parser[s]["regex"]), parser[s].get("replace", "")) for s in parser.sections()
            if "regex" in parser[s]]


def _output_text(cell, sanitizers: list[tuple[re.Pattern, str]]) -> str:
    """What a checked cell shows (streams, text results, errors), sanitised as nbval does."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append(f"{out.get('ename')}: {out.get('evalue')}")
    text = "".join(p if isinstance(p, str) else "".join(p) for p in parts)
    for regex, replace in sanitizers:
        text = regex.sub(replace, text)
    return text.strip()


def _first_line(text: str, limit: int = 80) -> str:
    line = next((ln for ln in text.splitlines() if ln.strip() and not ln.startswith("# NBVAL")), "")
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _first_difference(expected: str, got: str) -> tuple[str, str]:
    for e, g in zip(expected.splitlines() + [""] * 99, got.splitlines() + [""] * 99):
        if e != g:
            return _first_line(e, 100) or "(nothing)", _first_line(g, 100) or "(nothing)"
    return _first_line(expected, 100), _first_line(got, 100)


def grade_notebook(ipynb: Path, impl: str, timeout: float = 900.0, max_lines: int = 5) -> tuple[bool, list[str]]:
    """Run `ipynb` with implementation `impl` (no fallback to the reference) and compare every
    `# NBVAL_CHECK_OUTPUT` cell with its stored (solution's) output, as nbval --nbval-lax does.
    Returns (passed, lines): one line per failing cell: cell N, the first line of its source, expected ... got ...."""
    import nbformat
    from nbclient import NotebookClient
    ipynb = Path(ipynb)
    stored = nbformat.read(ipynb, as_version=4)
    fresh = nbformat.read(ipynb, as_version=4)
    sanitizers = _sanitizers(repo_root() / "chapters" / "sanitize.cfg")
    impl_path = impl if impl in ("exercises", "solutions") else str(Path(impl).resolve())
    with _env(MINILLM_IMPL=impl_path, MINILLM_FALLBACK="0", MINILLM_ROOT=str(repo_root())):
        try:
            NotebookClient(fresh, timeout=int(timeout), kernel_name="python3", allow_errors=True,
                           resources={"metadata": {"path": str(ipynb.parent)}}).execute()
        except Exception as e:  # noqa: BLE001  (a dead kernel or a cell timeout: say so, in one line)
            return False, [f"{ipynb.name}: fail (the notebook did not finish: {type(e).__name__}: {_first_line(str(e))})"]
    failures = []
    for i, (old, new) in enumerate(zip(stored.cells, fresh.cells)):
        if new.cell_type != "code":
            continue
        errored = next((o for o in new.get("outputs", []) if o.get("output_type") == "error"), None)
        checked = "NBVAL_CHECK_OUTPUT" in new.source
        if errored is not None and "NBVAL_RAISES_EXCEPTION" not in new.source:
            failures.append(f"cell {i} `{_first_line(new.source)}`: raised {errored.get('ename')}: "
                            f"{_first_line(errored.get('evalue', ''), 120)}")
        elif checked:
            want, got = _output_text(old, sanitizers), _output_text(new, sanitizers)
            if want != got:
                e, g = _first_difference(want, got)
                failures.append(f"cell {i} `{_first_line(new.source)}`: expected {e!r}, got {g!r}")
    if not failures:
        return True, [f"{ipynb.name}: pass"]
    lines = [f"{ipynb.name}: fail ({len(failures)} cell{'s' if len(failures) > 1 else ''})"]
    lines += ["  " + f for f in failures[:max_lines]]
    if len(failures) > max_lines:
        lines.append(f"  ... and {len(failures) - max_lines} more")
    return False, lines
