"""The import rules of DESIGN.md, checked on the source: data flows one way and the course sits above the engine.

- Only minillm/course/ and the faces (cli, llm, bench) import the course.
- kernels/ imports nothing from minillm but leaf helpers (hooks, platform) and other kernels.
- layers/ never import the engine.
- No import cycles among the package's modules (module-level imports only: a function-local import is a
  deliberate lazy edge and cannot deadlock an import).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACES = ("minillm.course", "minillm.cli", "minillm.llm", "minillm.bench")
KERNEL_LEAVES = ("minillm.hooks", "minillm.platform", "minillm.kernels")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "minillm").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(p for p in parts if p != "__init__")] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        stem = path.stem
        found["minillm.kernels" + ("" if stem == "__init__" else "." + stem)] = path
    return found


def _imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, (ast.Try, ast.If)) and module_level_only:
            for child in ast.walk(node):  # imports guarded by try/if at module level still run at import
                if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                    names.add(child.module)
                elif isinstance(child, ast.Import):
                    names.update(a.name for a in child.names)
    return {n for n in names if n == "minillm" or n.startswith("minillm.")}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_only_the_faces_import_the_course():
    offenders = [f"{mod} imports {imp}" for mod, path in _modules().items() if not _under(mod, FACES)
                 for imp in _imports(path, module_level_only=False) if _under(imp, ("minillm.course",))]
    assert not offenders, "the engine, layers and kernels must reach the course only through minillm.hooks:\n" + \
        "\n".join(offenders)


def test_kernels_import_only_leaf_helpers():
    offenders = [f"{mod} imports {imp}" for mod, path in _modules().items() if _under(mod, ("minillm.kernels",))
                 for imp in _imports(path, module_level_only=False) if not _under(imp, KERNEL_LEAVES)]
    assert not offenders, "\n".join(offenders)


def test_layers_never_import_the_engine():
    offenders = [f"{mod} imports {imp}" for mod, path in _modules().items() if _under(mod, ("minillm.layers",))
                 for imp in _imports(path, module_level_only=False) if _under(imp, ("minillm.engine",))]
    assert not offenders, "\n".join(offenders)


def test_hooks_is_a_leaf():
    assert _imports(ROOT / "minillm" / "hooks.py", module_level_only=False) == set()


def test_no_import_cycles():
    modules = _modules()
    graph = {}
    for mod, path in modules.items():
        edges = set()
        for imp in _imports(path, module_level_only=True):
            # `from minillm.x import y` names either module minillm.x.y or an attribute of minillm.x
            target = imp if imp in modules else imp.rpartition(".")[0]
            if target in modules and target != mod and not mod.startswith(target + "."):
                edges.add(target)
        graph[mod] = edges
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for mod in sorted(graph):
        if mod not in state and (cycle := visit(mod)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_a_bare_kernels_import_from_the_checkout_reaches_the_pypi_package(tmp_path):
    """With the repository root first on sys.path, `import kernels` finds our kernels/ folder; it must hand the
    name to an installed PyPI `kernels` (transformers imports it), and stay an empty module without one."""
    import subprocess
    import sys

    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.19.1'\nfrom .sub import CUDAProperties\n")
    (fake / "sub.py").write_text("class CUDAProperties: pass\n")
    probe = "import kernels; print(getattr(kernels, '__version__', None), kernels.__file__)"

    def bare_import(*path):
        # -S: no site-packages, so only the folders given here hold a `kernels`
        env = {"PYTHONPATH": ":".join(str(p) for p in path), "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert bare_import(ROOT, fake.parent) == ["0.19.1", str(fake / "__init__.py")]
    version, where = bare_import(ROOT)
    assert version == "None" and where == str(ROOT / "kernels" / "__init__.py")


def test_every_cuda_graph_is_recorded_with_the_collector_paused():
    """CUDA graphs are recorded through minillm.kernels.hardware: graph_capture (torch.cuda.graph inside
    paused_gc), or paused_gc around a hand-cut recording (capture_begin / capture_end). A collector run in the
    middle of a capture that frees another engine's dead graph invalidates the capture (hardware.paused_gc)."""
    offenders = []
    for mod, path in _modules().items():
        if mod == "minillm.kernels.hardware":
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr == "graph" and ast.unparse(node.func.value) == "torch.cuda":
                offenders.append(f"{mod}:{node.lineno} records with torch.cuda.graph: use hardware.graph_capture")
            elif node.func.attr == "capture_begin" and "paused_gc()" not in source:
                offenders.append(f"{mod}:{node.lineno} calls capture_begin with no paused_gc() around it")
    assert not offenders, "\n".join(offenders)


def test_paused_gc_pauses_the_collector_and_restores_it():
    import gc

    import pytest

    from minillm.kernels.hardware import paused_gc

    assert gc.isenabled()
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), paused_gc():  # resumed on the way out of an exception too
        raise KeyError("x")
    assert gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()
