"""The in-process guards (notebooks, overrides): library shortcuts trapped, monkey-patching detected and undone,
import errors named, foreign code refused; a stub falls back to the reference with a banner, an attempt never does.
(Grading runs the submission in a sandbox process instead: tests/course/test_course_hostile.py.)"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minillm.course.impl import (ForbiddenCallError, ImplementationError, TamperingError, guarded, load_function,
                                 resolve_impl)
from minillm.course.registry import get, repo_root

ROOT = repo_root()


def test_forbidden_shortcut_is_trapped_even_when_swallowed():
    def sneaky(x, weight, eps):
        try:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        except Exception:
            return x  # hides the trap's error: the guard must still fail the call
    with pytest.raises(ForbiddenCallError, match="must not call torch.nn.functional.rms_norm"):
        guarded(get("ch01.rms_norm"), sneaky)(torch.randn(2, 4), torch.ones(4), 1e-6)
    assert F.rms_norm.__name__ == "rms_norm"  # the trap is gone afterwards


def test_calling_the_engines_reference_is_trapped():
    def lazy(x, weight, eps):
        from minillm.layers.norm import rms_norm
        return rms_norm(x, weight, eps)
    with pytest.raises(ForbiddenCallError, match="minillm.layers.norm.rms_norm"):
        guarded(get("ch01.rms_norm"), lazy)(torch.randn(2, 4), torch.ones(4), 1e-6)


def test_host_reads_of_device_values_are_trapped_in_the_learners_code_only():
    """ch06.resolve_deferred_ids traps torch.Tensor methods (.tolist(), bool(), ...): a learner's loop is refused,
    torch's own use of them (printing a tensor) is not, and afterwards the inherited methods are inherited again
    (nothing left on torch.Tensor, which the tamper check would flag)."""
    ex = get("ch06.resolve_deferred_ids")

    def loop(input_ids, previous_tokens):
        for i in range(input_ids.numel()):
            if input_ids[i] < 0:
                input_ids[i] = previous_tokens[-1 - int(input_ids[i])]

    def prints_then_gathers(input_ids, previous_tokens):
        print(input_ids)  # torch's formatter reads the values: not the learner's read
        rows = (-1 - input_ids).clamp(0, previous_tokens.numel() - 1)
        input_ids.copy_(torch.where(input_ids < 0, previous_tokens[rows], input_ids))

    owned_before = {m for m in ("tolist", "item", "__bool__", "__index__") if m in vars(torch.Tensor)}
    with pytest.raises(ForbiddenCallError, match="must not call torch.Tensor.__bool__"):
        guarded(ex, loop)(torch.tensor([3, -1]), torch.tensor([7]))
    ids = torch.tensor([3, -1])
    guarded(ex, prints_then_gathers)(ids, torch.tensor([7]))
    assert ids.tolist() == [3, 7] and bool(ids[0] > 0)
    assert {m for m in ("tolist", "item", "__bool__", "__index__") if m in vars(torch.Tensor)} == owned_before


def test_monkey_patching_is_detected_and_restored():
    original_allclose, original_sqrt = torch.allclose, math.sqrt

    def cheat(x, weight, eps):
        torch.allclose = lambda *a, **k: True
        math.sqrt = lambda v: 1.0
        return x
    with pytest.raises(TamperingError, match="torch.allclose"):
        guarded(get("ch01.rms_norm"), cheat)(torch.randn(2, 4), torch.ones(4), 1e-6)
    assert torch.allclose is original_allclose and math.sqrt is original_sqrt


def test_import_errors_and_missing_functions_are_named(tmp_path):
    (tmp_path / "ch01_basics.py").write_text("def rms_norm(x, weight, eps)\n    return x\n")
    with pytest.raises(ImplementationError, match="ch01_basics.py failed to import: SyntaxError"):
        load_function("ch01.rms_norm", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "ch01_basics.py").write_text("import torch\n")
    with pytest.raises(ImplementationError, match="no function 'rms_norm'"):
        load_function("ch01.rms_norm", other)
    with pytest.raises(ImplementationError, match="ch02_kv_cache.py does not exist"):
        load_function("ch02.causal_mask", other)


def test_patching_at_import_time_is_refused(tmp_path):
    (tmp_path / "ch01_basics.py").write_text("import torch\ntorch.equal = lambda *a: True\n")
    original = torch.equal
    with pytest.raises(ImplementationError, match="replaced torch.equal at import"):
        load_function("ch01.rms_norm", tmp_path)
    assert torch.equal is original


def test_a_full_repository_copy_is_a_valid_submission(tmp_path):
    (tmp_path / "exercises").mkdir()
    (tmp_path / "exercises" / "ch02_kv_cache.py").write_text(
        "import torch\ndef causal_mask(q_len, kv_len, device=None):\n    return 'mine'\n")
    assert load_function("ch02.causal_mask", tmp_path)(1, 1) == "mine"


def test_added_dunder_on_tensor_is_removed():
    def cheat(x, weight, eps):
        torch.Tensor.__eq__ = lambda *a, **k: True
        return x
    with pytest.raises(TamperingError, match=r"torch.Tensor.__eq__"):
        guarded(get("ch01.rms_norm"), cheat)(torch.randn(2, 4), torch.ones(4), 1e-6)
    assert "__eq__" not in vars(torch.Tensor)
    assert not bool((torch.zeros(2) == torch.ones(2)).any())


def test_answers_imported_from_solutions_are_refused(tmp_path):
    (tmp_path / "ch02_kv_cache.py").write_text("from solutions.ch02_kv_cache import causal_mask\n")
    with pytest.raises(ImplementationError, match=r"causal_mask is code from \S*solutions/ch02_kv_cache.py, not from"):
        load_function("ch02.causal_mask", tmp_path)


def test_a_helper_built_with_exec_is_refused(tmp_path):
    (tmp_path / "ch02_kv_cache.py").write_text(
        "_helper = eval(compile('lambda q, k: None', '<made up>', 'eval'))\n"
        "def causal_mask(q_len, kv_len, device=None):\n    return _helper(q_len, kv_len)\n")
    with pytest.raises(ImplementationError, match=r"causal_mask -> _helper is code from exec/compile"):
        load_function("ch02.causal_mask", tmp_path)


def test_a_triton_kernel_is_checked_through_its_fn(tmp_path):
    import triton
    (tmp_path / "ch04_decode_and_fusion.py").write_text(
        "import triton\n_ns = {}\n"
        "exec(compile('import triton\\n@triton.jit\\ndef k(X):\\n    pass\\n', '<disguise>', 'exec'), _ns)\n"
        "rms_norm_kernel = _ns['k']\n")
    with pytest.raises(ImplementationError, match=r"rms_norm_kernel is code from exec/compile"):
        load_function("ch04.rms_norm_kernel", tmp_path)


def test_a_stub_falls_back_to_the_reference_with_one_banner(tmp_path, capsys, monkeypatch):
    import minillm.course.impl as impl
    monkeypatch.setattr(impl, "_BANNERS", set())  # the banner prints once per process: start afresh
    stub = ROOT / "exercises" / "ch05_paged_kv.py"
    (tmp_path / "ch05_paged_kv.py").write_text(stub.read_text())
    fn = load_function("ch05.slot_mapping", tmp_path, fallback=True)
    assert fn([7, 2], 15, 18, 16) == [127, 32, 33]
    load_function("ch05.slot_mapping", tmp_path, fallback=True)
    banner = capsys.readouterr().err
    assert banner.count("ch05.slot_mapping: not attempted yet, using the reference") == 1
    assert f"write it in {tmp_path / 'ch05_paged_kv.py'};" in banner  # the folder's file, not exercises/
    with pytest.raises(NotImplementedError, match="not attempted yet"):
        load_function("ch05.slot_mapping", tmp_path, fallback=False)([7, 2], 15, 18, 16)


def test_an_attempt_is_never_replaced(tmp_path):
    (tmp_path / "ch05_paged_kv.py").write_text(
        "def slot_mapping(block_table, start, end, block_size):\n    return [0] * (end - start)  # wrong, but mine\n")
    assert load_function("ch05.slot_mapping", tmp_path, fallback=True)([7, 2], 15, 18, 16) == [0, 0, 0]


def test_notebooks_default_to_the_learners_exercises(monkeypatch):
    monkeypatch.delenv("MINILLM_IMPL", raising=False)
    assert resolve_impl() == ROOT / "exercises"
    import adapters
    assert adapters.tests_default_impl() == "solutions"  # the graded tests keep proving the reference


@pytest.mark.parametrize("inner", ["lab1", "minillm-course/exercises"])
def test_a_submission_zipped_with_its_parent_folder_is_found(tmp_path, inner):
    """Gradescope unpacks a zip as it is: a learner who zipped the folder `lab1/` (or the whole repository) has the
    modules one or two folders down. That was graded as an empty submission, every point lost; the one folder
    below that holds them is graded, and a Mac zip's `__MACOSX/` copy of it is not a second candidate."""
    for folder in (inner, f"__MACOSX/{inner}"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "ch01_basics.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("junk\n")
    assert resolve_impl(tmp_path) == tmp_path / inner


def test_modules_in_two_nested_folders_are_refused_by_name(tmp_path):
    """Two copies (an old one beside the new one) are not guessed between: the error names both."""
    for folder in ("lab1", "lab1_old"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ch02_kv_cache.py").write_text("x = 1\n")
    with pytest.raises(ImplementationError, match=r"several folders \(lab1, lab1_old\)"):
        resolve_impl(tmp_path)


def test_a_nested_link_is_not_followed(tmp_path):
    """A folder found below the submission is never reached through a symbolic link (to the solutions, say)."""
    (tmp_path / "lab1").symlink_to(ROOT / "solutions")
    with pytest.raises(ImplementationError, match="holds none of the exercise modules"):
        resolve_impl(tmp_path)


@pytest.mark.parametrize("exercise_id", ["ch03.matmul_kernel", "ch04.rms_norm_kernel"])
def test_the_engines_kernel_runs_unguarded_as_the_reference(exercise_id):
    """Without solutions/ (a student release, the Gradescope archive) the reference is the engine's own kernel;
    its launcher was guarded like a learner's, so the trap on the engine's kernel caught the reference itself
    ("'function' object is not subscriptable") and the solutions lost 9 of 480 points on Gradescope."""
    import importlib

    from minillm.course.checks import kernel_launcher
    ex = get(exercise_id)
    engine = importlib.import_module("minillm." + ex.source[:-3].replace("/", "."))
    g = torch.Generator().manual_seed(0)
    if exercise_id == "ch03.matmul_kernel":
        a, b = torch.randn(9, 50, generator=g), torch.randn(50, 30, generator=g)
        got, want = kernel_launcher(engine.matmul_kernel, exercise_id, "matmul")(a, b, 16, 16, 16), a @ b
    else:
        x, w = torch.randn(3, 40, generator=g), torch.randn(40, generator=g)
        got = kernel_launcher(engine.rms_norm_kernel, exercise_id, "rms_norm")(x, w, 1e-6)
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


_SHIPPED = '''
import triton
import triton.language as tl


@triton.jit
def given_kernel(X, N: tl.constexpr):
    pass


def launcher(x):
    given_kernel[(1,)](x, N=4)
    return x


def _other(x):
    return x + 1
'''


@pytest.mark.parametrize("rebinding,caught", [
    ("", False),  # the module as shipped
    ("globals()['launcher'] = _other", True),  # the text stays as shipped; the name is another function
    ("import sys; setattr(sys.modules[__name__], 'launcher', _other)", True),
    ("launcher.__code__ = _other.__code__", True),
    ("given_kernel = triton.jit(_other)", True),
    ("_fake = object.__new__(type('_Fake', (type(given_kernel),), {}))\n_fake.fn = given_kernel.fn\n"
     "globals()['given_kernel'] = _fake", True),  # holds the shipped def as .fn, launches what it likes
])
def test_check_shipped_refuses_a_name_rebound_while_the_module_runs(tmp_path, monkeypatch, rebinding, caught):
    """guard.check_shipped: the course's launcher and given kernels must be, when they run, the functions their
    defs compile to; a module may keep their text as shipped and rebind the names through globals(), setattr,
    __code__ or a subclass of Triton's kernel class that holds the shipped def as .fn."""
    import importlib.util
    import sys

    from minillm.course import guard
    path = tmp_path / "ch_shipped.py"
    path.write_text(_SHIPPED + "\n" + rebinding + "\n")
    spec = importlib.util.spec_from_file_location("ch_shipped", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ch_shipped", module)
    spec.loader.exec_module(module)
    if caught:
        with pytest.raises(TamperingError, match="must run as shipped"):
            guard.check_shipped(module, ("launcher", "given_kernel"), str(path), "chXX.demo")
    else:
        guard.check_shipped(module, ("launcher", "given_kernel"), str(path), "chXX.demo")
