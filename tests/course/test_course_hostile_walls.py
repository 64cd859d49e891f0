"""Hostile submissions of a second kind: they take the sandbox worker's Python guards down, lie in their replies,
write into what they only read, or reach the answers through the grader's own hands. Each must score 0 with a
one-line reason, and none may cost another submission its points.

* the worker's audit hook is Python in the learner's process: rebinding `builtins.any` (or the hook's globals)
  turns it off, and then only the kernel's walls hold (minillm.course.confine: Landlock for files, seccomp for
  processes, sockets and signals); those cases are skipped where the kernel offers no such wall;
* a reply is bytes the learner's process writes: a forged header, or a pickle that names one list a trillion
  times, must not make the grading session hold it all (minillm.course.replies); a message must not draw on the
  terminal that shows the report;
* an argument written in place comes back only if the exercise writes it: zeroing the weight, or rewriting the
  block table the test checks against, fails the call, also when the call then raises (a raising call's writes
  come back too, so "raise ValueError and change nothing" is graded as written);
* a library shortcut is trapped by its operation, whatever the spelling (C binding, torch.ops, a Tensor method),
  and so is a host read of a tensor's values where the exercise forbids one;
* a submitted module that is a symbolic link is refused, never followed by the grader.

The cases are graded in one session beside the reference answer (a bystander that must keep its full marks).
"""
from __future__ import annotations

import platform
from pathlib import Path

import pytest

from minillm.course import confine
from minillm.course.grader import Submission, grade_submissions
from minillm.course.registry import get
from test_course_hostile import ROOT, SLOT, SOLUTION, _submission, assert_scores_zero

pytestmark = pytest.mark.slow
HAS_LANDLOCK = confine.landlock_abi() > 0
HAS_SECCOMP = platform.machine() in confine.SECCOMP_ARCHES
NEUTER = '''
def _neuter_the_guards():
    """Turn the worker's Python guards off: its audit hook reads these names at every event."""
    import builtins, sys
    builtins.any = lambda items: False
    frame = sys._getframe(1)
    while "REFUSED_IMPORTS" not in frame.f_globals:
        frame = frame.f_back
    frame.f_globals.update(DENIED_EVENTS=(), REFUSED_IMPORTS=(), _real=lambda path: "/nowhere",
                           _inside=lambda path, roots: True)
    sys.meta_path[:] = [m for m in sys.meta_path if type(m).__name__ != "ImportGuard"]
'''
REPLY_FD = '''
def _reply_fd():
    """The worker's end of the reply pipe: the one descriptor open for writing only, past stderr."""
    import fcntl, os
    for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")):
        try:
            if fd > 2 and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
                return fd
        except OSError:
            pass
'''
RMS = "def rms_norm(x, weight, eps):\n"
HOST_READ = """
def resolve_deferred_ids(input_ids, previous_tokens):
    if previous_tokens is None or previous_tokens.numel() == 0:
        raise ValueError("the previous step sampled nothing")
    ids, previous = ({read}(input_ids), {read}(previous_tokens))  # the values, on the host
    input_ids.copy_(torch.tensor([previous[-1 - i] if i < 0 else i for i in list(ids)], dtype=input_ids.dtype))
"""
# name: (exercise, code appended to the stubs (a Path: the module is a symbolic link to it), the reason, the wall)
CASES: dict[str, tuple[str, str | Path, str, str | None]] = {
    "neutered_guards_read_the_solutions": ("ch05.slot_mapping", NEUTER + SLOT + f'''    _neuter_the_guards()
    namespace = {{}}
    exec(open({str(SOLUTION)!r}).read(), namespace)
    return namespace["slot_mapping"](block_table, start, end, block_size)
''', r"Permission denied: \S*solutions/ch05_paged_kv\.py", "landlock"),
    "neutered_guards_fill_the_disk": ("ch05.slot_mapping", NEUTER + SLOT + '''    _neuter_the_guards()
    for i in range(20):  # 20 files of 8 MB each (the output cap is per file)
        with open(f"junk{i}", "wb") as f:
            f.write(bytes(8 << 20))
''', r"Permission denied: 'junk0'", "landlock"),
    "neutered_guards_fork": ("ch05.slot_mapping", NEUTER + SLOT + '''    _neuter_the_guards()
    import os
    if os.fork() == 0:  # a child could setsid() out of the worker's process group, beyond the grader's kill
        os._exit(0)
''', r"PermissionError: \[Errno 1\] Operation not permitted", "seccomp"),
    "neutered_guards_kill_the_grader": ("ch05.slot_mapping", NEUTER + SLOT + '''    _neuter_the_guards()
    import os, signal
    os.kill(os.getppid(), signal.SIGKILL)
''', r"PermissionError: \[Errno 1\] Operation not permitted", "seccomp"),
    "neutered_guards_send_a_datagram": ("ch05.slot_mapping", NEUTER + SLOT + '''    _neuter_the_guards()
    import socket
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"answers, please", ("127.0.0.1", 53))
''', r"PermissionError: \[Errno 1\] Operation not permitted", "seccomp"),
    "forged_reply_header": ("ch05.slot_mapping", REPLY_FD + SLOT + '''    import os, time
    os.write(_reply_fd(), (1 << 40).to_bytes(8, "little"))
    time.sleep(60)
''', r"announced a reply of 1099511627776 bytes", None),
    "forged_reply_naming_one_list_a_trillion_times": ("ch05.slot_mapping", REPLY_FD + SLOT + '''    import os, pickle, time
    level = [0]
    for _ in range(40):
        level = [level, level]
    data = pickle.dumps({"result": level}, protocol=4)
    os.write(_reply_fd(), len(data).to_bytes(8, "little") + data)
    time.sleep(60)
''', r"decodes to more objects and tensor bytes than it carries", None),
    "exception_whose_str_raises": ("ch05.slot_mapping", '''
class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text for the grader")
''' + SLOT + "    raise _Unprintable()\n", r"_Unprintable whose str\(\) raised RuntimeError", None),
    "message_that_draws_on_the_terminal": ("ch05.slot_mapping", SLOT + '''    raise RuntimeError("\\x1b[1A\\x1b[2Kch05.slot_mapping  10 / 10  pass")
''', r"RuntimeError: \\x1b\[1A\\x1b\[2Kch05\.slot_mapping  10 / 10  pass", None),
    "rewrite_the_block_table_to_fit_the_answer": ("ch05.slot_mapping", SLOT + '''    block_table[:] = range(len(block_table))  # the properties test checks the slots against this very list
    return list(range(start, end))
''', r"wrote into its argument 'block_table', which it only reads", None),
    "rewrite_the_block_table_then_refuse": ("ch05.slot_mapping", SLOT + '''    block_table[:] = range(len(block_table))
    raise ValueError("refused, after writing")  # a raising call's writes are seen too
''', r"wrote into its argument 'block_table', which it only reads", None),
    "zero_the_weight_the_reference_reads": ("ch01.rms_norm", RMS + '''    weight.zero_()  # the test hands the same weight to the reference afterwards
    return torch.zeros_like(x)
''', r"wrote into its argument 'weight', which it only reads", None),
    "library_shortcut_through_its_c_binding": ("ch01.rms_norm", RMS + '''    return torch._C._VariableFunctions.rms_norm(x, (x.shape[-1],), weight, eps)
''', r"must not call torch\.\S*rms_norm .*reached as torch\._VariableFunctionsClass\.rms_norm", None),
    "library_shortcut_through_torch_ops": ("ch01.rms_norm", RMS + '''    return torch.ops.aten.rms_norm(x, [x.shape[-1]], weight, eps)
''', r"must not call torch\.\S*rms_norm .*reached as torch\.ops\.aten\.rms_norm", None),
    "library_shortcut_kept_by_its_own_trap": ("ch01.rms_norm", RMS + '''    return torch.rms_norm.__kwdefaults__["_original"](x, (x.shape[-1],), weight, eps)
''', r"must not call torch\.\S*rms_norm", None),
    "softmax_as_a_tensor_method": ("ch03.online_softmax_update", '''
def online_softmax_update(m_i, l_i, acc, scores, values):
    m_new = torch.maximum(m_i, scores.amax(-1))
    alpha = torch.exp(m_i - m_new)
    p = scores.softmax(-1) * torch.exp(torch.logsumexp(scores, -1, keepdim=True) - m_new[..., None])
    return m_new, l_i * alpha + p.sum(-1), acc * alpha[..., None] + p @ values
''', r"must not call torch\.softmax .*reached as torch\.TensorBase\.softmax", None),
    "host_read_through_the_c_method": ("ch06.resolve_deferred_ids", HOST_READ.format(read="torch._C.TensorBase.tolist"),
                                       r"must not call torch\.Tensor\.tolist", None),
    "host_read_through_numpy": ("ch06.resolve_deferred_ids", HOST_READ.format(read="__import__('numpy').asarray"),
                                r"must not call torch\.Tensor\.__array__", None),
    "module_linked_to_the_engine": ("ch05.slot_mapping", ROOT / "minillm" / "engine" / "block_table.py",
                                    r"ch05_paged_kv\.py is a symbolic link \(to \S*block_table\.py\)", None),
}


def _linked(folder: Path, exercise_id: str, target: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / f"{get(exercise_id).module}.py").symlink_to(target)
    return folder


def _unwalled(name: str) -> str | None:
    """The wall case `name` needs and this kernel lacks (it is then neither graded nor tested), else None."""
    wall = CASES[name][3]
    return wall if (wall == "landlock" and not HAS_LANDLOCK) or (wall == "seccomp" and not HAS_SECCOMP) else None


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every case, then the reference answer, graded in one session, each in its own sandbox worker."""
    base = tmp_path_factory.mktemp("walls")
    names = [n for n in CASES if not _unwalled(n)]
    subs = [Submission(get(CASES[n][0]), _linked(base / n, CASES[n][0], CASES[n][1]) if isinstance(CASES[n][1], Path)
                       else _submission(base / n, CASES[n][0], CASES[n][1])) for n in names]
    bystander = Submission(get("ch05.slot_mapping"), ROOT / "solutions")
    *results, right = grade_submissions(subs + [bystander], ROOT, timeout=60.0, call_timeout=4.0)
    return dict(zip(names, results)), right


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_submission_scores_zero_with_a_reason(graded, name):
    _, _, reason, wall = CASES[name]
    if _unwalled(name):
        pytest.skip(f"this kernel offers no {wall} wall: the Python guards alone cannot stop {name}")
    assert_scores_zero(name, graded[0][name], reason)


def test_the_bystander_keeps_its_marks(graded):
    """No case (a forged reply, a killed parent, a fork) costs the reference graded in the same session its marks."""
    right = graded[1]
    assert right.status == "pass" and right.earned == right.points > 0, (right.status, right.message)


def test_a_linked_exercises_folder_is_refused(tmp_path):
    """`exercises/` pointing at the solutions would grade the solutions: the submission's folder is refused."""
    from minillm.course.impl import ImplementationError, resolve_impl
    (tmp_path / "exercises").symlink_to(ROOT / "solutions")
    with pytest.raises(ImplementationError, match=r"exercises is a symbolic link \(to \S*solutions\)"):
        resolve_impl(tmp_path)


def test_grants_carve_the_denied_folders_out(tmp_path):
    """Landlock only allows: a denied folder inside an allowed tree is left out by granting its siblings, and a folder
    the grader allows by name inside a denied one (a virtual environment in the repository) is granted."""
    for sub in ("work/course/solutions", "work/course/.venv", "work/other", "work/notes"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "work" / "link").symlink_to(tmp_path / "work" / "course")
    work, course, venv = (str(tmp_path / p) for p in ("work", "work/course", "work/course/.venv"))
    assert confine.grants([work, venv], [course], [venv]) == [f"{work}/notes", f"{work}/other", venv]
    assert confine.grants([f"{course}/solutions"], [course], []) == []  # a tree inside a denied folder: dropped


GPU_WALLS = """
import os, sys
sys.path.insert(0, {here!r})
import confine
root, course = sys.argv[1], sys.argv[2]
scratch, other = os.path.join(root, "scratch"), os.path.join(root, "other")
walls = confine.confine([scratch], [], [course], gpu=True, scratch=[scratch])
def moved(folder):  # what Triton's cache does: write in a temporary folder, rename into place
    tmp = os.path.join(folder, "tmp.pid_1")
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "cuda_utils.so"), "wb") as f:
        f.write(b"x")
    try:
        os.replace(os.path.join(tmp, "cuda_utils.so"), os.path.join(folder, "cuda_utils.so"))
        return "moved"
    except OSError as e:
        return e.strerror
try:
    open(os.path.join(course, "answer.py")).read()
    course_read = "read"
except OSError as e:
    course_read = e.strerror
print(walls, moved(scratch), moved(other), course_read, sep="|")
"""


@pytest.mark.skipif(confine.landlock_abi() < 2, reason="Landlock ABI 2 or later (FS_REFER) needed")
def test_gpu_walls_let_tritons_cache_rename_in_scratch_only(tmp_path):
    """On a GPU Landlock handles reading only, yet the kernel still refuses every rename into another folder
    (EXDEV) where no rule grants FS_REFER: Triton's cache, which renames each compiled file into place, failed in
    the worker on the H200 (twenty-fifth session) until scratch got that right. Elsewhere renames stay refused,
    and the course stays unreadable."""
    import subprocess
    import sys
    for sub in ("scratch", "other", "course"):
        (tmp_path / sub).mkdir()
    (tmp_path / "course" / "answer.py").write_text("secret = 1\n")
    script = GPU_WALLS.format(here=str(Path(confine.__file__).parent))
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(tmp_path / "course")],
                         capture_output=True, text=True, timeout=60)
    walls, in_scratch, elsewhere, course_read = out.stdout.strip().split("|")
    assert "landlock" in walls, out
    assert in_scratch == "moved", out
    assert elsewhere == "Invalid cross-device link", out
    assert course_read == "Permission denied", out


def test_a_reply_decodes_to_no_more_than_it_carries():
    """Forty nested pairs of one list pickle to a few hundred bytes and decode to 2**40 lists; an honest reply (its
    tensor's bytes included) fits its own size; a tensor's bytes must be its shape times its dtype's size; the
    grader's decoding recurses, so a reply may not nest deeper than the worker ever sends."""
    import pickle

    import torch

    from minillm.course.replies import TENSOR_TAG, BadReply, Budget, decode, load
    level: list = [0]
    for _ in range(40):
        level = [level, level]
    body = pickle.dumps({"result": level}, protocol=4)
    with pytest.raises(BadReply, match="decodes to more objects and tensor bytes than it carries"):
        decode(load(body)["result"], Budget(len(body)))
    t = torch.arange(6, dtype=torch.float32)
    honest = pickle.dumps([(TENSOR_TAG, "float32", (2, 3), t.numpy().tobytes(), "cpu"), "float32", [1, 2]], protocol=4)
    got = decode(load(honest), Budget(len(honest)))
    assert torch.equal(got[0], t.reshape(2, 3)) and got[1:] == ["float32", [1, 2]]
    with pytest.raises(BadReply, match=r"shape \(1000000000,\) \(4000000000 bytes\) carrying 0 bytes"):
        decode((TENSOR_TAG, "float32", (10**9,), b"", "cpu"))
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(BadReply, match="nested more than 64 levels deep"):
        decode(deep)


def test_no_wall_is_attempted_off_linux(monkeypatch):
    """Landlock, seccomp and capset are Linux's: on a learner's Mac the worker grades with its Python guards alone
    instead of failing every exercise on a C function its libc does not have."""
    monkeypatch.setattr(confine.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(confine, "_prctl", lambda *a: pytest.fail("a Linux call was made off Linux"))
    assert confine.confine([], [], [], gpu=False) == []
