"""Programmatic dependent launch (kernels/pdl.py) without a GPU: the interpreter never compiles a PDL path, so
these tests compile for sm_90 on the CPU (Triton carries ptxas) and read the rule off the kernels' source."""
from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from minillm.kernels import fused, gemv, int4_gemv, paged_attention, pdl, rope_store

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_launch_options_only_where_hopper_can_take_them():
    """No PDL arguments on a CPU (the interpreter has no griddepcontrol); the switch takes a bool only."""
    assert pdl.launch_options(torch.device("cpu")) == {}
    before = pdl.is_enabled()
    try:
        pdl.set_enabled(False)
        assert not pdl.is_enabled() and pdl.launch_options(torch.device("cpu")) == {}
        with pytest.raises(TypeError, match="enabled must be a bool"):
            pdl.set_enabled("yes")
    finally:
        pdl.set_enabled(before)


def test_the_environment_switch_names_its_spellings(monkeypatch):
    monkeypatch.setenv("MINILLM_PDL", "Off")
    assert pdl._from_environment() is False
    monkeypatch.setenv("MINILLM_PDL", "1")
    assert pdl._from_environment() is True
    monkeypatch.setenv("MINILLM_PDL", "maybe")
    with pytest.raises(ValueError, match="MINILLM_PDL='maybe': use one of 1, on, true"):
        pdl._from_environment()


def _pdl_kernels():
    for module in (fused, gemv, int4_gemv, paged_attention, rope_store):
        for name, fn in vars(module).items():
            src = getattr(fn, "fn", None)  # a @triton.jit kernel (or its interpreter twin) wraps the function
            if callable(src) and src.__module__ == module.__name__ and "PDL" in inspect.signature(src).parameters:
                yield f"{module.__name__.rsplit('.', 1)[-1]}.{name}", src


@pytest.mark.parametrize("name,fn", list(_pdl_kernels()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_pdl_kernel_waits_before_it_reads_another_kernels_output(name, fn):
    """kernels/pdl.py's rule: a kernel with a PDL parameter calls grid_dependency_sync(PDL) in its top-level
    body, before anything but loads of constant weights (the register GEMV's first tile). The bf16 GEMV keeps its
    own USE_PDL path (gemv.py) and is not listed here."""
    body = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0].body
    calls = [i for i, stmt in enumerate(body) if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
             and getattr(stmt.value.func, "id", "") == "grid_dependency_sync"]
    assert calls, f"{name} takes PDL but never calls grid_dependency_sync(PDL)"
    loads = [ast.unparse(node.args[0]) for stmt in body[:calls[0]] for node in ast.walk(stmt)
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load"]
    assert all(arg == "w_ptrs" for arg in loads), f"{name} loads {loads} before the wait (only weights may be)"


def test_pdl_paths_compile_for_hopper():
    """grid_dependency_sync(PDL=True) and the INT4 GEMV's PDL path compile for sm_90 on this CPU, and the PTX
    holds the two griddepcontrol instructions (a separate process: the compiler, not the interpreter)."""
    script = textwrap.dedent("""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "0"
        sys.path.insert(0, "benchmarks")
        import triton
        from sass_count import compile_gemv
        try:
            kernel = compile_gemv(256, 64, 2, prefetch=True, half=True, pdl=True)
        except Exception as err:  # no ptxas for sm_90 in this Triton: nothing to check here
            print("SKIP", type(err).__name__, err)
            raise SystemExit(0)
        ptx = kernel.asm["ptx"]
        print("wait" if "griddepcontrol.wait" in ptx else "no wait",
              "launch" if "griddepcontrol.launch_dependents" in ptx else "no launch")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="0"))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.strip().splitlines()[-1]
    if out.startswith("SKIP"):
        pytest.skip(out)
    assert out == "wait launch"
