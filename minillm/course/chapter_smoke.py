"""Run chapters top to bottom as scripts on this machine, outputs unchecked (`minillm course notebooks --smoke`).

nbval compares a run with the stored outputs, which are the CPU's: on a GPU (bf16, its own timings and kernels)
they differ by design, so there the question is only whether every cell runs. This runs each chapter's
percent-format source (chapters/NN_topic.py, the notebook's twin) as a script with the solutions, each in its
own process and with the chapter's folder as the working directory (as Jupyter gives a notebook), with top-level
`await` allowed (a notebook cell may await) and stand-ins for IPython's `display` and for ipywidgets where they
are not installed (a bare GPU machine has neither), and says which chapter failed, with the end of its traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _stand_ins() -> None:
    """IPython's display and ipywidgets, as do-nothing objects, where the real ones are missing."""
    import builtins
    import types
    try:
        from IPython.display import display
    except ImportError:
        ipython, shown = types.ModuleType("IPython"), types.ModuleType("IPython.display")
        shown.display, shown.HTML, shown.Markdown = (lambda *a, **k: None), str, str
        ipython.display, ipython.get_ipython, ipython.version_info = shown, (lambda: None), (9, 0, 0)  # matplotlib asks
        sys.modules["IPython"], sys.modules["IPython.display"] = ipython, shown
        display = shown.display
    builtins.display = display  # a notebook's global
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        class Widget:
            def __init__(self, *args, **kwargs):
                self.children = args[0] if args else []
                self.value, self.description = "", kwargs.get("description", "")

            def on_click(self, callback):
                pass

            def clear_output(self, *args, **kwargs):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False
        widgets = types.ModuleType("ipywidgets")
        for name in ("Output", "HTML", "Button", "VBox", "HBox", "IntSlider", "Dropdown", "Label"):
            setattr(widgets, name, Widget)
        sys.modules["ipywidgets"] = widgets


def run_as_script(path: str) -> None:
    """Execute one chapter source in this process, as a notebook would run its cells in order."""
    import ast
    import asyncio
    import inspect
    _stand_ins()
    os.environ.setdefault("MPLBACKEND", "Agg")
    code = compile(Path(path).read_text(encoding="utf-8"), path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, {"__name__": "__main__", "__file__": path})  # noqa: S307  (our own chapter source)
    if inspect.iscoroutine(result):  # the source awaited at top level
        asyncio.run(result)


def run_chapter(py: Path, impl: str = "solutions", timeout: float = 600.0) -> tuple[str, float, str]:
    """(status "ok" / "failed" / "timeout", seconds, the last lines of its stderr) of one chapter's run."""
    start = time.time()
    env = {**os.environ, "MINILLM_IMPL": impl}  # the child picks a headless matplotlib (run_as_script)
    try:
        proc = subprocess.run([sys.executable, "-m", "minillm.course.chapter_smoke", py.name], cwd=py.parent,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, f"still running after {timeout:g} s"
    tail = "\n".join(proc.stderr.strip().splitlines()[-6:])
    return ("ok" if proc.returncode == 0 else "failed"), time.time() - start, tail


def smoke(chapters: list[Path], impl: str = "solutions", timeout: float = 600.0, jobs: int = 1) -> int:
    """Run every chapter (`jobs` at a time), print a line each as it ends; the number that did not pass."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")

    def one(py: Path) -> bool:
        status, seconds, tail = run_chapter(py, impl, timeout)
        print(f"{py.name:36s} {status:8s} {seconds:6.1f} s", flush=True)
        if status != "ok":
            print("    " + tail.replace("\n", "\n    "), flush=True)
        return status == "ok"

    with ThreadPoolExecutor(jobs) as pool:
        return sum(not ok for ok in pool.map(one, chapters))


if __name__ == "__main__":
    run_as_script(sys.argv[1])
