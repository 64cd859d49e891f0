"""Hostile submissions: every way found (or feared) to earn points without writing the answer must score 0,
with a one-line reason that says what was refused.

Each case is a chapter module made of the blank stubs plus the hostile code (appended, so its def replaces the
stub), graded by the real grader on the real graded tests of one cheap exercise: ch05.slot_mapping (pure Python),
ch01.rms_norm (a library shortcut) and ch04.rms_norm_kernel (a Triton kernel in disguise). All cases are graded
in two grading sessions side by side, each in its own sandbox worker; the infinite loop is bounded by a short
per-call timeout.
"""
from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

from minillm.course import gradescope
from minillm.course.grader import GradeReport, Submission, grade_exercise, grade_submissions
from minillm.course.registry import get, repo_root

ROOT = repo_root()
pytestmark = pytest.mark.slow
SOLUTION = ROOT / "solutions" / "ch05_paged_kv.py"
ENGINE = ROOT / "minillm" / "engine" / "block_table.py"
NOT_FOUND = '''
def _nothing_found():
    raise LookupError("no reference in this process")
'''


def _solution_kernel_source() -> str:
    """The reference rms_norm_kernel's source text, to hide inside a submission as a string (the jit disguise)."""
    text = (ROOT / "solutions" / "ch04_decode_and_fusion.py").read_text()
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == "rms_norm_kernel")
    lines = text.splitlines()[node.lineno - 1 - len(node.decorator_list):node.end_lineno]
    return "import triton\nimport triton.language as tl\n\n" + "\n".join(lines) + "\n"


SLOT = "def slot_mapping(block_table, start, end, block_size):\n"
CASES: dict[str, tuple[str, str, str]] = {  # name: (exercise, code appended to the stubs, the reason, a regex)
    "import_by_a_built_up_name": ("ch05.slot_mapping", f'''
import importlib
_ref = importlib.import_module("solu" + "tions.ch05_paged_kv").slot_mapping
{SLOT}    return _ref(block_table, start, end, block_size)
''', r"import solutions(\.ch05_paged_kv)? is refused"),
    "import_swallowed_inside_the_call": ("ch05.slot_mapping", f'''
{SLOT}    try:
        return __import__("solutions.ch05_paged_kv", fromlist=["x"]).slot_mapping(block_table, start, end, block_size)
    except ImportError:
        return []
''', r"import solutions(\.ch05_paged_kv)? is refused"),
    "engine_reference_bound_at_import": ("ch05.slot_mapping", f'''
from minillm.engine.block_table import slot_mapping as _ref
{SLOT}    return _ref(block_table, start, end, block_size)
''', r"import minillm\S* is refused"),
    "read_the_solutions_from_disk_and_exec": ("ch05.slot_mapping", f'''
{SLOT}    namespace = {{}}
    exec(open({str(SOLUTION)!r}).read(), namespace)
    return namespace["slot_mapping"](block_table, start, end, block_size)
''', r"opening \S*solutions/ch05_paged_kv\.py is refused"),
    "read_the_engine_through_proc_self_root": ("ch05.slot_mapping", f'''
{SLOT}    source = open("/proc/self/root" + {str(ENGINE)!r}).read()
    return eval(source)
''', r"opening /proc/self/root\S*block_table\.py is refused"),
    "symlink_the_solutions": ("ch05.slot_mapping", f'''
import os
{SLOT}    os.symlink({str(SOLUTION)!r}, "answers.py")
    return open("answers.py").read()
''', r"os\.symlink is refused"),
    "open_a_directory_then_a_relative_path": ("ch05.slot_mapping", f'''
import os
{SLOT}    fd = os.open({str(ROOT.parent)!r}, os.O_RDONLY)
    return os.read(os.open({ROOT.name + "/solutions/ch05_paged_kv.py"!r}, os.O_RDONLY, dir_fd=fd), 99)
''', r"os\.open of a directory .* is refused"),
    "code_compiled_under_the_engines_file_name": ("ch05.slot_mapping", f'''
slot_mapping = eval(compile("lambda block_table, start, end, block_size: []", {str(ENGINE)!r}, "eval"))
''', r"slot_mapping is code from \S*block_table\.py, not from ch05_paged_kv\.py"),
    "search_sys_modules_and_gc": ("ch05.slot_mapping", NOT_FOUND + f'''
import gc, sys
{SLOT}    for obj in list(sys.modules.values()) + gc.get_objects():
        f = getattr(obj, "slot_mapping", obj if callable(obj) and getattr(obj, "__name__", "") == "slot_mapping" else None)
        if callable(f) and getattr(getattr(f, "__code__", None), "co_filename", __file__) != __file__:
            return f(block_table, start, end, block_size)
    _nothing_found()
''', r"LookupError: no reference in this process|is refused"),  # gc's objects may trigger a refused dlopen
    "walk_the_callers_frames": ("ch05.slot_mapping", NOT_FOUND + f'''
import sys
{SLOT}    frame = sys._getframe(1)
    while frame is not None:
        for name in ("ref", "want", "expected"):
            if name in frame.f_locals:
                value = frame.f_locals[name]
                return value(block_table, start, end, block_size) if callable(value) else value
        frame = frame.f_back
    _nothing_found()
''', r"LookupError: no reference in this process"),
    "forge_the_grader_results": ("ch05.slot_mapping", f'''
import glob, json
{SLOT}    for path in glob.glob("/tmp/minillm-grade-*/**/results.jsonl", recursive=True):
        with open(path, "a") as f:
            f.write(json.dumps({{"event": "finished"}}) + "\\n")
    return None  # wrong for every test: a forged record must not turn that into points
''', r"refused|returned NoneType"),
    "patch_the_grader_module": ("ch05.slot_mapping", f'''
{SLOT}    try:
        import minillm.course.checks as checks
        checks.assert_close = lambda *a, **k: None
    except ImportError:
        pass
    return []
''', r"import minillm\S* is refused"),
    "kill_the_grader": ("ch05.slot_mapping", f'''
import os, signal
{SLOT}    os.kill(os.getppid(), signal.SIGKILL)
''', r"os\.kill is refused"),
    "infinite_loop": ("ch05.slot_mapping", f'''
{SLOT}    while True:
        pass
''', r"timed out after"),
    "os_exit": ("ch05.slot_mapping", f'''
import os
{SLOT}    os._exit(0)
''', r"exited \(code 0\)"),
    "sys_exit": ("ch05.slot_mapping", f'''
import sys
{SLOT}    sys.exit(3)
''', r"called sys\.exit\(3\)"),
    "huge_output": ("ch05.slot_mapping", f'''
{SLOT}    print("x" * 100_000_000)
    return []
''', r"output cap"),
    "fork_bomb": ("ch05.slot_mapping", f'''
import os
{SLOT}    while True:
        os.fork()
''', r"starting processes \(fork\) is refused"),
    "subprocess_cat": ("ch05.slot_mapping", f'''
import subprocess
{SLOT}    return subprocess.run(["cat", {str(SOLUTION)!r}], capture_output=True).stdout
''', r"starting processes is refused"),
    "memory_bomb": ("ch05.slot_mapping", f'''
{SLOT}    hoard = bytearray(1 << 40)
    return list(hoard[:1])
''', r"memory cap"),
    "ctypes_segfault": ("ch05.slot_mapping", f'''
import ctypes
{SLOT}    ctypes.string_at(0)
''', r"ctypes\.\S+ is refused"),
    "reach_the_fork_server": ("ch05.slot_mapping", f'''
import os, socket
{SLOT}    for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")):  # the template's channel, if it leaked
        socket.socket(fileno=fd).sendall(b"spawn me, unguarded")
    return []
''', r"socket\S* is refused"),
    "monkey_patch_torch": ("ch01.rms_norm", '''
def rms_norm(x, weight, eps):
    torch.allclose = lambda *a, **k: True
    torch.Tensor.__eq__ = lambda *a, **k: True
    return x
''', r"replaced torch\.(allclose|Tensor\.__eq__)"),
    "library_shortcut_bound_at_import": ("ch01.rms_norm", '''
from torch.nn.functional import rms_norm as _lib
def rms_norm(x, weight, eps):
    return _lib(x, (x.shape[-1],), weight, eps)
''', r"must not call torch\.nn\.functional\.rms_norm"),
    "engine_rms_norm_bound_at_import": ("ch01.rms_norm", '''
from minillm.layers.norm import rms_norm
''', r"import minillm\S* is refused"),
    "triton_kernel_imported_under_a_disguise": ("ch04.rms_norm_kernel", '''
import importlib
rms_norm_kernel = importlib.import_module("".join(["sol", "utions", ".ch04_decode_and_fusion"])).rms_norm_kernel
''', r"import solutions\S* is refused"),
    "triton_kernel_exec_under_a_disguise": ("ch04.rms_norm_kernel", f'''
_namespace = {{}}
exec(compile({_solution_kernel_source()!r}, "<disguise>", "exec"), _namespace)
rms_norm_kernel = _namespace["rms_norm_kernel"]
''', r"rms_norm_kernel is code from exec/compile"),
}


def _submission(folder: Path, exercise_id: str, code: str) -> Path:
    folder.mkdir(parents=True)
    module = get(exercise_id).module
    text = (ROOT / "exercises" / f"{module}.py").read_text() + "\n\n# ---- hostile ----\n" + code
    (folder / f"{module}.py").write_text(text)
    return folder


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every case graded in two grading sessions side by side, each case in its own sandbox worker."""
    base = tmp_path_factory.mktemp("hostile")
    subs = [Submission(get(ex_id), _submission(base / name, ex_id, code)) for name, (ex_id, code, _) in CASES.items()]
    return dict(zip(CASES, grade_submissions(subs, ROOT, timeout=120.0, call_timeout=4.0, jobs=2)))


def test_a_submission_is_bounded_by_its_exercise_time_limit(tmp_path):
    """Calls that each stay under the per-call limit still end at the exercise's limit, and only that submission
    is charged: the right answer graded in the same session passes."""
    slow = _submission(tmp_path / "slow", "ch05.slot_mapping", f'''
import time
{SLOT}    time.sleep(2.5)
    return []
''')
    ex = get("ch05.slot_mapping")
    hung, right = grade_submissions([Submission(ex, slow), Submission(ex, ROOT / "solutions")], ROOT, timeout=6.0,
                                    call_timeout=4.0)
    assert hung.earned == 0 and hung.status == "timeout", (hung.status, hung.message)
    assert "timed out after 6 s (the exercise's time limit)" in hung.message, hung.message
    assert right.status == "pass" and right.earned == right.points > 0, right.message


def test_a_run_stops_at_its_time_budget_and_still_reports_every_exercise(tmp_path):
    """Each exercise has its own timeout, but a submission hanging in many of them ran for their sum, past
    Gradescope's limit: no results.json, no score. At the run's budget the session stops; what was graded stands,
    the rest fails as "not run" and says why."""
    hang = _submission(tmp_path / "hang", "ch05.slot_mapping", f'''
import time
{SLOT}    time.sleep(1000)
''')
    solutions = ROOT / "solutions"
    done, hung, never = grade_submissions([Submission(get("ch05.slot_mapping"), solutions),
                                           Submission(get("ch05.slot_mapping"), hang),
                                           Submission(get("ch05.hash_block"), solutions)],
                                          ROOT, timeout=120.0, call_timeout=60.0, time_budget=12.0)
    assert done.status == "pass" and done.earned == done.points > 0, (done.status, done.message)
    for r in (hung, never):
        assert r.status == "fail" and r.earned == 0 and r.points == get(r.id).points, (r.status, r.message)
        assert r.message == "not run: the submission used up the grading time budget (12 s)"
    results = gradescope.results_json(GradeReport("x", [done, hung, never], 12.0))
    assert results["score"] == done.points and sum(t["max_score"] for t in results["tests"]) == (
        done.points + hung.points + never.points)
    assert "not run: the submission used up the grading time budget (12 s)" in results["tests"][-1]["output"]


def test_spawned_workers_hold_the_same_walls(tmp_path, monkeypatch):
    """MINILLM_SANDBOX_FORK=0 (and any GPU) spawns each worker afresh: the same refusals, the same full marks."""
    monkeypatch.setenv("MINILLM_SANDBOX_FORK", "0")
    names = ["read_the_solutions_from_disk_and_exec", "fork_bomb"]
    subs = [Submission(get(CASES[n][0]), _submission(tmp_path / n, CASES[n][0], CASES[n][1])) for n in names]
    *refused, right = grade_submissions(subs + [Submission(get("ch05.slot_mapping"), ROOT / "solutions")], ROOT,
                                        timeout=120.0, call_timeout=30.0)
    for name, result in zip(names, refused):
        assert result.earned == 0 and re.search(CASES[name][2], result.message), (name, result.message)
    assert right.status == "pass" and right.earned == right.points > 0, right.message


def assert_scores_zero(name: str, result, reason: str) -> None:
    """Hostile case `name` earned nothing, failed, and says why in one short line that matches `reason`."""
    assert result.earned == 0, f"{name} earned {result.earned:g} / {result.points:g}: {result.status}: {result.message}"
    assert result.status in ("fail", "error", "timeout"), f"{name}: {result.status}: {result.message}"
    assert "\n" not in result.message and len(result.message) < 600, result.message
    assert re.search(reason, result.message), f"{name}: the reason {result.message!r} does not match {reason!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_submission_scores_zero_with_a_reason(graded, name):
    assert_scores_zero(name, graded[name], CASES[name][2])


def test_the_hostile_cases_compile():
    for name, (_, code, _) in CASES.items():
        compile(code, name, "exec")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the sandbox's GPU path needs CUDA")
def test_sandbox_grades_real_kernels_on_a_gpu():
    """On a GPU the worker has no RLIMIT_AS and lets Triton's own compiler processes run: the reference kernels
    (chapters 3, 4 and 8: their graded tests move CPU-drawn inputs to the GPU, fp32 dots in IEEE) must still score
    full marks, and a forbidden process must still be refused."""
    from minillm.course.grader import grade
    for chapter in ("ch03", "ch04", "ch08"):
        report = grade(chapter, impl="solutions", jobs=4, timeout=300)
        assert report.score == report.max_score > 0, [(e.id, e.status, e.message) for e in report.exercises]
    _, code, reason = CASES["subprocess_cat"]
    result = grade_exercise(get("ch05.slot_mapping"), _submission(Path(__import__("tempfile").mkdtemp()) / "s",
                                                                  "ch05.slot_mapping", code), ROOT, timeout=120)
    assert result.earned == 0 and re.search(reason, result.message), result.message


def test_a_reply_can_carry_plain_data_only():
    """The grading side decodes the worker's replies without ever naming a class: a forged pickle that would
    run os.system (or build any object of the learner's) is refused."""
    import io
    import os
    import pickle

    import torch

    from minillm.course.replies import TENSOR_TAG, PlainUnpickler, decode
    with pytest.raises(pickle.UnpicklingError, match="only plain data"):
        PlainUnpickler(io.BytesIO(pickle.dumps({"result": os.system}))).load()
    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    back = decode(PlainUnpickler(io.BytesIO(pickle.dumps((TENSOR_TAG, "bfloat16", (2, 3), raw, "cpu")))).load())
    assert back.dtype == torch.bfloat16 and torch.equal(back, t)


def test_worker_encodes_tensors_of_any_strides():
    """A learner's answer may be a broadcast view, or a clone of one (stride 0 kept on a size-1 dim)."""
    import torch

    from minillm.course.replies import decode
    from minillm.course.sandbox_worker import encode
    for t in (torch.tensor(1.).expand(1, 1).clone(), torch.arange(3.).expand(2, 3), torch.arange(8.)[::2],
              torch.empty(0, 3)):
        back = decode(encode(t))
        assert back.shape == t.shape and torch.equal(back, t)


def test_in_place_writes_come_back_with_the_whole_storage():
    """A kernel that writes past the edge of the view it was given must be seen to, as in one process."""
    import torch

    from minillm.course.replies import STORAGE_TAG, write_back
    buf = torch.zeros(4, 4)
    view = buf[:2, :2]
    written = buf.clone()
    written[3, 3] = 7.0  # outside the view
    write_back(view, (STORAGE_TAG, written.reshape(-1).view(torch.uint8).numpy().tobytes()))
    assert buf[3, 3] == 7.0
    counts = [1, 2]
    write_back(counts, [0, 1])
    assert counts == [0, 1]


def test_a_template_that_fails_leaves_the_workers_spawned(monkeypatch):
    """A fork server that dies or refuses to fork (more than one thread after importing torch) is never retried:
    the workers are spawned afresh, as on a GPU, and grade the same."""
    import os
    import signal

    from minillm.course import fork_server, sandbox
    from minillm.course.impl import forbidden_calls
    monkeypatch.setattr(fork_server, "_BROKEN", False)
    monkeypatch.setattr(fork_server, "_SERVER", None)
    monkeypatch.setattr(sandbox, "_SANDBOXES", {})
    server = fork_server.server(fork_server.worker_env())
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    with pytest.raises(OSError, match="fork server exited"):
        server.spawn((0, 1), {}, Path("/"), Path("/dev/null"))
    assert not fork_server.wanted()
    fn = sandbox.remote_function("ch05.slot_mapping", ROOT / "solutions", forbidden_calls(get("ch05.slot_mapping")),
                                 key="t")
    try:
        assert isinstance(sandbox._SANDBOXES["t:ch05.slot_mapping"].proc, __import__("subprocess").Popen)
        assert fn([3, 1], 0, 3, 2) == [6, 7, 2]
    finally:
        sandbox.close("t")
        server.close()


def test_a_huge_print_at_import_names_the_output_cap(tmp_path):
    """A module that prints megabytes while it is imported said "OSError: [Errno 27] File too large", which a
    learner cannot read as "your print was too big"; it now says what a huge print inside a call says."""
    loud = _submission(tmp_path / "loud", "ch05.slot_mapping", 'print("x" * 100_000_000)\n')
    result, = grade_submissions([Submission(get("ch05.slot_mapping"), loud)], ROOT, timeout=60.0, call_timeout=10.0)
    assert_scores_zero("huge print at import", result, r"failed to import: OSError: printed or wrote more than the "
                                                      r"sandbox's output cap")


def test_a_graded_file_that_fails_to_collect_costs_only_its_own_exercises(tmp_path):
    """An import error in one graded test file (a helper left out of the archive, say) stopped the whole pytest
    run: every exercise of the session got 0 with the empty message "not run: ". Now the exercises whose tests
    live in that file fail with its collection error, and those of the other files are graded as usual."""
    tests = tmp_path / "tests"
    (tests / "graded").mkdir(parents=True)
    for rel in ("conftest.py", "adapters.py", "graded/conftest.py", "graded/test_ch05_paged_kv.py"):
        shutil.copy(ROOT / "tests" / rel, tests / rel)
    broken = (ROOT / "tests" / "graded" / "test_ch05_block_manager.py").read_text()
    (tests / "graded" / "test_ch05_block_manager.py").write_text(broken + "\nimport helper_left_out  # noqa\n")
    solutions = ROOT / "solutions"
    right, lost = grade_submissions([Submission(get("ch05.slot_mapping"), solutions),
                                     Submission(get("ch05.free_blocks"), solutions)], ROOT, timeout=60.0,
                                    tests_dir=tests / "graded")
    assert right.status == "pass" and right.earned == right.points > 0, (right.status, right.message)
    assert lost.status == "error" and lost.earned == 0 and lost.points == get("ch05.free_blocks").points
    assert ("test_ch05_block_manager.py failed to collect: ModuleNotFoundError: No module named 'helper_left_out'"
            in lost.message), lost.message
    results = gradescope.results_json(GradeReport("x", [right, lost], 1.0))  # the lost file's points still owed
    assert sum(t["max_score"] for t in results["tests"]) == results["score"] + lost.points
