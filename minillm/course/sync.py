"""Generate `solutions/` and `exercises/` from the marked regions of the reference code.

The answer to each exercise is written once, in the engine. This module reads the `# >>> exercise ID`
regions (see minillm.course.registry), and writes, per chapter, one solutions module (the regions as they
are, markers removed) and one exercises module (the same, each `# >>> solution` block replaced by a
`raise NotImplementedError`). `minillm course sync --check` (run by `make test`) fails when the committed
files differ from what the markers give today: edit the reference, then run `minillm course sync`.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from minillm.course.registry import CHAPTERS, EXERCISES, Exercise, repo_root

BEGIN = re.compile(r"^# >>> exercise (\S+)\s*$")
END = re.compile(r"^# <<< exercise\s*$")
SOL_BEGIN = re.compile(r"^(\s*)# >>> solution\s*$")
SOL_END = re.compile(r"^\s*# <<< solution\s*$")
ANY_MARKER = re.compile(r"#\s*(>>>|<<<)\s*(exercise|solution)\b")

# Where markers may live; sync refuses a marked region whose id is not registered.
SCAN_DIRS = ("minillm", "kernels")
SCAN_SKIP = ("minillm/course/",)  # the course machinery quotes the markers in its docstrings

IMPORTS = "from __future__ import annotations\n\nimport math\n\nimport torch\nimport torch.nn.functional as F\n"
TRITON_IMPORTS = "import triton\nimport triton.language as tl\n"

NOT_ATTEMPTED = "not attempted yet"  # the grader's tell for a stub, inside the NotImplementedError message


class MarkerError(ValueError):
    """A malformed, unregistered or mismatched exercise region."""


@dataclass
class Region:
    exercise_id: str
    source: str  # path relative to the root
    lines: list[str]  # the region's lines, without the exercise markers


@dataclass
class SyncResult:
    files: dict[str, str] = field(default_factory=dict)  # relative path -> generated text
    missing: list[Exercise] = field(default_factory=list)  # registered, but no region in its source yet
    unregistered: list[Region] = field(default_factory=list)  # marked in the code, absent from the registry


def extract_regions(text: str, source: str) -> list[Region]:
    """All `# >>> exercise` regions of one file, checked for balanced markers."""
    regions, current, start = [], None, 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if m := BEGIN.match(line):
            if current is not None:
                raise MarkerError(f"{source}:{lineno}: '# >>> exercise {m.group(1)}' inside region {current.exercise_id}")
            current, start = Region(m.group(1), source, []), lineno
        elif END.match(line):
            if current is None:
                raise MarkerError(f"{source}:{lineno}: '# <<< exercise' without an opening marker")
            regions.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
        elif ANY_MARKER.search(line) and line.lstrip().startswith("#"):
            raise MarkerError(f"{source}:{lineno}: marker outside an exercise region (exercise markers start at column 0)")
    if current is not None:
        raise MarkerError(f"{source}:{start}: region {current.exercise_id} is never closed with '# <<< exercise'")
    return regions


def render(region: Region, stub: bool) -> str:
    """The region as solution code (stub=False) or as the learner's stub (stub=True)."""
    out, in_solution, n_blocks = [], False, 0
    for line in region.lines:
        if m := SOL_BEGIN.match(line):
            if in_solution:
                raise MarkerError(f"{region.source}: nested '# >>> solution' in {region.exercise_id}")
            in_solution, n_blocks = True, n_blocks + 1
            if stub:
                chapter = CHAPTERS.get(int(region.exercise_id[2:4])) if region.exercise_id[2:4].isdigit() else None
                where = f"exercises/{chapter.module}.py" if chapter else "exercises/"
                out.append(f'{m.group(1)}raise NotImplementedError("{region.exercise_id} is {NOT_ATTEMPTED}: '
                           f'write it in {where}")')
        elif SOL_END.match(line):
            if not in_solution:
                raise MarkerError(f"{region.source}: '# <<< solution' without an opening marker in {region.exercise_id}")
            in_solution = False
        elif not (stub and in_solution):
            out.append(line)
    if in_solution or n_blocks == 0:
        raise MarkerError(f"{region.source}: {region.exercise_id} needs one or more closed '# >>> solution' blocks")
    while out and not out[-1].strip():
        out.pop()
    while out and not out[0].strip():
        out.pop(0)
    return "\n".join(out) + "\n"


def check_signature(ex: Exercise, code: str) -> None:
    """The region must define `ex.function` at top level with the registry's parameter names."""
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        raise MarkerError(f"{ex.source}: region {ex.id} is not valid Python: {e}") from e
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    if ex.function not in defs:
        raise MarkerError(f"{ex.source}: region {ex.id} defines {sorted(defs)} at top level, not {ex.function!r}")
    a = defs[ex.function].args
    names = tuple(p.arg for p in a.posonlyargs + a.args + a.kwonlyargs)
    if names != ex.param_names:
        raise MarkerError(f"{ex.source}: {ex.function}{names} differs from the registry's signature "
                          f"{ex.signature!r}; update both together (learners' code depends on it)")


def _header(chapter: int, sources: list[str], stub: bool, example_id: str = "chNN.name", kernels: bool = False) -> str:
    c = CHAPTERS[chapter]
    if stub:
        return (f'"""Chapter {chapter} exercises. {c.title}.\n\n'
                f"Write each function where it says `raise NotImplementedError`, then run `minillm grade ch{chapter:02d}`.\n"
                + ("Keep the signatures. Use only torch, math, F (torch.nn.functional), and triton / tl in the @triton.jit\n"
                   "kernels (each runs through the launcher beside it): each function stands alone.\n" if kernels else
                   "Keep the signatures. Use only torch, math and F (torch.nn.functional): each function stands alone.\n")
                + f"The engine calls the same signatures: `LLM(..., overrides={{\"{example_id}\": fn}})` runs yours inside it.\n\n"
                + "Generated by `minillm course sync` from the reference code (instructors: edit the reference, not this file).\n"
                + '"""\n')
    return (f'"""Chapter {chapter} solutions. {c.title}.\n\n'
            "Generated by `minillm course sync` from the marked regions of\n"
            + "".join(f"    {s}\n" for s in sources)
            + "Edit the reference, not this file.\n"
            '"""\n')


def build(root: Path | None = None, exercises: Iterable[Exercise] | None = None,
          scan_dirs: Iterable[str] = SCAN_DIRS) -> SyncResult:
    """Generate every chapter module in memory (nothing is written)."""
    root = Path(root or repo_root())
    registry = list(exercises) if exercises is not None else list(EXERCISES.values())
    by_id = {e.id: e for e in registry}
    found: dict[str, Region] = {}
    unregistered: list[Region] = []
    files = sorted({root / e.source for e in registry}
                   | {p for d in scan_dirs if (root / d).is_dir() for p in (root / d).rglob("*.py")})
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        if "# >>> exercise" not in text:
            continue
        rel = path.relative_to(root).as_posix()
        if rel.startswith(SCAN_SKIP):
            continue
        for region in extract_regions(text, rel):
            if region.exercise_id not in by_id:  # not generated; `unregistered` makes the self-check fail
                unregistered.append(region)
                continue
            if by_id[region.exercise_id].source != rel:
                raise MarkerError(f"{rel}: region {region.exercise_id} belongs in {by_id[region.exercise_id].source}")
            if region.exercise_id in found:
                raise MarkerError(f"{rel}: region {region.exercise_id} is marked twice")
            found[region.exercise_id] = region

    result = SyncResult(missing=[e for e in registry if e.id not in found], unregistered=unregistered)
    for chapter in sorted({e.chapter for e in registry}):
        present = [e for e in registry if e.chapter == chapter and e.id in found]
        if not present:
            continue
        bodies = {}
        for stub in (False, True):
            codes = [render(found[e.id], stub) for e in present]
            for e, code in zip(present, codes):
                check_signature(e, code)
            # the exercise id above each function: what `minillm grade` names it (ids and function names differ)
            codes = [f"# {e.id} ({e.points} points)\n{code}" for e, code in zip(present, codes)]
            kernels = any(re.search(r"\b(tl|triton)\.", c) for c in codes)
            imports = IMPORTS + (TRITON_IMPORTS if kernels else "")
            sources = sorted({e.source for e in present})
            bodies[stub] = (_header(chapter, sources, stub, present[0].id, kernels) + "\n" + imports + "\n\n"
                            + "\n\n".join(codes))
        module = CHAPTERS[chapter].module
        result.files[f"solutions/{module}.py"] = bodies[False]
        result.files[f"exercises/{module}.py"] = bodies[True]
    return result


def write(result: SyncResult, root: Path | None = None) -> list[str]:
    """Write the generated files; returns the ones that changed."""
    root = Path(root or repo_root())
    changed = []
    for rel, text in result.files.items():
        path = root / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            changed.append(rel)
    return changed


def drift(result: SyncResult, root: Path | None = None) -> list[str]:
    """Committed files that differ from (or are missing against) what the markers generate."""
    root = Path(root or repo_root())
    return [rel for rel, text in result.files.items()
            if not (root / rel).exists() or (root / rel).read_text(encoding="utf-8") != text]
