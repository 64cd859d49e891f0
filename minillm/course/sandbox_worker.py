"""The sandbox worker: the only process in which a submission's code runs while it is graded.

Started by minillm.course.sandbox (as `python -I sandbox_worker.py FD_IN FD_OUT`, from a copy in a scratch
folder), it imports torch (and triton for a kernel chapter), then locks itself down before the submission's
module is imported:

* imports: `minillm`, `kernels`, `solutions`, `exercises`, `tests` and the grader's own modules are refused by a
  sys.meta_path guard, and the repository's editable-install finder is removed: nothing of the course is importable;
* an audit hook (sys.addaudithook: it cannot be removed once added) refuses opening any file under the course's
  folders (solutions/, the engine's source, the graded tests, the grader's results) or another process's /proc
  entries, writing outside the worker's scratch folder, starting processes (fork, exec, subprocess, spawn),
  signalling others, ctypes, sockets, raising resource limits and adding audit hooks;
* the library shortcuts the exercise forbids are replaced by traps for the worker's whole life, so a shortcut
  bound at import time is the trap too (minillm.course.guard);
* the exercise's function must pass the provenance check (guard.check_provenance);
* and, since every guard above is Python in the learner's own process (rebinding `builtins.any` or the hook's
  globals disables it), the kernel's own walls go up last (minillm.course.confine: Landlock, seccomp, no
  capabilities): the course's files, other processes, sockets and new processes stay out of reach even then.

The reference answers never enter this process: the graded test (in its own process) sends the inputs, this worker
sends back the learner's outputs, and the comparison happens on the other side. Messages are length-prefixed
pickles; what goes back is restricted to plain data (tensors are sent as dtype, shape and bytes) so that the
trusted side can decode it without running any class of the learner's.
"""
from __future__ import annotations

import builtins
import errno
import importlib.abc
import importlib.util
import os
import pickle
import struct
import sys
import traceback

HEADER = struct.Struct("<Q")
TENSOR_TAG = "__minillm_tensor__"
STORAGE_TAG = "__minillm_storage__"  # the bytes of an argument's whole storage, written back by the caller
REFUSED_IMPORTS = ("minillm", "kernels", "solutions", "exercises", "tests", "adapters", "conftest", "guard",
                   "confine", "sandbox_worker", "_pytest", "pytest", "__editable__")
DENIED_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
                 "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit",
                 "resource.prlimit", "sys.addaudithook", "os.link", "os.symlink", "socket.", "ctypes.", "_ctypes.",
                 "urllib.", "ftplib.", "smtplib.", "http.", "webbrowser.", "shutil.chown", "os.chroot")


REFUSALS: list[str] = []  # what was refused since the last check: a swallowed refusal still fails the call
WALLS: list[str] = []  # the kernel's walls that are up (minillm.course.confine), reported to the grader


class Refused(PermissionError):
    """An action the sandbox does not allow (its message says which and why)."""


# ---- the lock-down ----------------------------------------------------------------------------------

class ImportGuard(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in REFUSED_IMPORTS or fullname.startswith("__editable__"):
            message = (f"import {fullname} is refused while grading: an exercise module may import only torch, "
                       "math, triton and the standard library")
            REFUSALS.append(message)
            raise ImportError(message)
        return None


def _real(path) -> str:
    return os.path.realpath(os.fsdecode(path))


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


_STDLIB = os.path.dirname(os.path.realpath(os.__file__)) + os.sep
_SPAWNS = ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec")


def _spawned_by_triton() -> bool:
    """True when the code asking for a process (or for ctypes) is Triton's compiler or driver (ptxas, the
    launcher's C stub, ldconfig, libcuda through ctypes),
    i.e. the innermost frame outside the standard library and this file lies in the triton package. Only asked
    on a GPU (see make_audit_hook); the interpreter on a CPU never needs a process."""
    frame = sys._getframe(3)
    while frame is not None:
        name = os.path.realpath(frame.f_code.co_filename)
        stdlib = name.startswith(_STDLIB) and "-packages" + os.sep not in name
        if not stdlib and name != os.path.realpath(__file__):
            return f"-packages{os.sep}triton{os.sep}" in name
        frame = frame.f_back
    return False


def make_audit_hook(denied: tuple[str, ...], allowed: tuple[str, ...], scratch: str, gpu: bool = False):
    own_proc = f"/proc/{os.getpid()}"
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event: str, args: tuple) -> None:
        try:
            check(event, args)
        except Refused as e:
            REFUSALS.append(str(e))
            raise

    def check(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            if path is None or isinstance(path, int):
                return
            real = _real(path)
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & write_flags)
            if real.startswith("/proc/") and not (real == own_proc or real.startswith(own_proc + "/")) \
                    and not real.startswith(("/proc/cpuinfo", "/proc/meminfo", "/proc/stat")):
                raise Refused(f"reading {real} is refused while grading (another process's memory)")
            if real.endswith(("/mem", "/kcore")) or real in ("/dev/mem", "/dev/kmem"):
                raise Refused(f"opening {real} is refused while grading")
            if any(_inside(real, (d,)) and not any(_inside(a, (d,)) and _inside(real, (a,)) for a in allowed)
                   for d in denied):  # an allowed folder opens a denied one only where it lies inside it
                raise Refused(f"opening {path} is refused while grading: the course's files are out of reach")
            if writing and not (_inside(real, (scratch,)) or real == "/dev/null"):
                raise Refused(f"writing {path} is refused while grading (only the scratch folder is writable)")
            if os.path.isdir(real) and isinstance(flags, int) and mode is None and \
                    not (gpu and _inside(real, (scratch,)) and _spawned_by_triton()):
                # a directory fd would let relative opens bypass these checks; on a GPU, Triton's compiler
                # cleans its temporary build folder in scratch with shutil.rmtree, which opens directories
                raise Refused(f"os.open of a directory ({path}) is refused while grading")
        elif event == "import":
            name = str(args[0]) if args else ""
            if name.split(".")[0] in REFUSED_IMPORTS:
                raise Refused(f"import {name} is refused while grading")
        elif gpu and event.startswith(_SPAWNS) and _spawned_by_triton():
            return  # on a GPU, Triton compiles the learner's kernel with ptxas and a C compiler
        elif gpu and event.startswith(("ctypes.", "_ctypes.")) and _spawned_by_triton():
            return  # on a GPU, Triton's driver loads libcuda with ctypes.CDLL on its first launch
        elif event.startswith(DENIED_EVENTS):
            what = {"os.fork": "starting processes (fork)", "subprocess.Popen": "starting processes",
                    "os.system": "starting processes", "os.posix_spawn": "starting processes"}.get(event, event)
            if event == "ctypes.dlopen" and args:
                what = f"ctypes.dlopen({args[0]!r})"
            raise Refused(f"{what} is refused while grading")

    return hook


def lock_down(config: dict) -> None:
    """Import the libraries the exercise needs, then close every door (see the module docstring)."""
    import resource
    import signal

    import confine  # loaded by serve from the grader's bin folder
    mb = 1 << 20
    limits = config["limits"]
    for what, value in ((resource.RLIMIT_AS, limits["memory_mb"] * mb), (resource.RLIMIT_CPU, limits["cpu_s"]),
                        (resource.RLIMIT_FSIZE, limits["output_mb"] * mb), (resource.RLIMIT_CORE, 0)):
        if value <= 0 and what != resource.RLIMIT_CORE:
            continue  # 0: no limit (RLIMIT_AS on a GPU: CUDA reserves far more address space than it uses)
        hard = resource.getrlimit(what)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(what, (value, value))
    if os.getuid() != 0:  # root is not bound by RLIMIT_NPROC; the audit hook refuses fork for everyone
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        resource.setrlimit(resource.RLIMIT_NPROC, (min(4096, hard) if hard != resource.RLIM_INFINITY else 4096,) * 2)
    sys.dont_write_bytecode = True  # -I ignores PYTHONDONTWRITEBYTECODE; the submission folder is read-only
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails with EFBIG instead of killing us
    import torch  # noqa: F401  (imported before the hook: torch loads its libraries through ctypes)
    if config.get("triton"):
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    root_like = [p for p in sys.path if _real(p or ".") in map(_real, config["denied"])]
    for p in root_like:
        sys.path.remove(p)
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    sys.meta_path.insert(0, ImportGuard())
    for name in [m for m in sys.modules if m.split(".")[0] in ("guard", "confine", "sandbox_worker")]:  # forked
        sys.modules.pop(name)
    gpu = bool(config.get("triton")) and torch.cuda.is_available()
    if gpu:  # start CUDA and Triton's driver before the walls and the hook go up: until CUDA is initialised torch
        # counts devices through NVML (ctypes.CDLL("libnvidia-ml.so.1"), which the hook refuses from torch's frames),
        # and Triton's driver loads libcuda and builds its cuda_utils module on first use
        torch.cuda.init()
        torch.cuda.device_count()  # cached from now on, NVML no longer asked
        from triton.runtime import driver
        driver.active.get_current_device()
    libraries = [p for p in sys.path if os.path.isdir(p)]  # wherever they live
    WALLS[:] = confine.confine(config["allowed"], libraries, config["denied"], gpu, [config["scratch"]])
    sys.addaudithook(make_audit_hook(tuple(map(_real, config["denied"])), tuple(map(_real, config["allowed"])),
                                     _real(config["scratch"]), gpu))


# ---- data that goes back to the grader --------------------------------------------------------------

def encode(value, depth: int = 0):
    """Plain data only: None, bool, int, float, complex, str, bytes, list, tuple, dict; tensors as tagged tuples."""
    import torch
    if depth > 20:
        raise TypeError("the returned value is nested more than 20 levels deep")
    if value is None or isinstance(value, (bool, str, bytes)):
        return value
    if isinstance(value, (int, float, complex)):
        return type(value).__mro__[-2](value) if type(value) not in (int, float, complex) else value
    if isinstance(value, torch.Tensor):
        # a fresh dense copy: .contiguous() keeps a size-1 dimension's stride 0 (expand().clone()), and
        # viewing such a tensor as bytes fails
        t = torch.empty(value.shape, dtype=value.dtype).copy_(value.detach())
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return (TENSOR_TAG, str(t.dtype).removeprefix("torch."), tuple(t.shape), raw, str(value.device))
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (list, tuple)):
        items = [encode(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {encode(k, depth + 1): encode(v, depth + 1) for k, v in value.items()}
    try:
        import numpy as np
        if isinstance(value, np.generic):
            return encode(value.item(), depth + 1)
    except ImportError:
        pass
    raise TypeError(f"the grader cannot carry back a {type(value).__name__}: return tensors, numbers, strings, "
                    "lists, tuples or dicts")


def _storage_bytes(t):
    """A uint8 view of the whole storage under tensor `t` (a view's neighbours included)."""
    import torch
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _snapshot_arg(value):
    """What an argument held before the call: the whole storage of a tensor (a kernel that writes past a
    view's edge must be seen to), a deep copy of a list or dict, nothing for the rest."""
    import torch
    if isinstance(value, torch.Tensor):
        return _storage_bytes(value.detach()).clone()
    if isinstance(value, (list, dict)):
        return pickle.loads(pickle.dumps(value))
    return None


def _same(a, b) -> bool:
    """Deep equality that tensors inside lists and dicts answer too: same dtype, shape and bytes (NaN equals NaN)."""
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(*(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8)
                                                         for t in (a, b))))
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  (an uncomparable object: call it changed)
        return False


def _mutation(before, after):
    """The argument's new content if the call changed it, else None."""
    import torch
    if isinstance(after, torch.Tensor):
        now = _storage_bytes(after.detach())
        return None if torch.equal(before, now) else (STORAGE_TAG, now.cpu().numpy().tobytes())
    return None if _same(before, after) else encode(after)


# ---- calls ------------------------------------------------------------------------------------------

def _builtin_name(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if getattr(builtins, cls.__name__, None) is cls:
            return cls.__name__
    return "Exception"


def _where(exc: BaseException, own_file: str) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if _real(f.filename) == _real(own_file)]
    return f" (line {frames[-1].lineno} of {os.path.basename(own_file)})" if frames else ""


def _text(exc: BaseException) -> str:
    """str(exc), or a line saying it could not be had (a learner's __str__ may raise, or return anything)."""
    try:
        text = str(exc)
        if type(text) is str:
            return text
    except BaseException as e:  # noqa: BLE001
        return f"<{type(exc).__name__} whose str() raised {type(e).__name__}>"
    return f"<{type(exc).__name__} whose str() returned no string>"


def _reason(exc: BaseException) -> str:
    """What `exc` means to the learner: a cap of the sandbox is named (errno 27, "File too large", says nothing
    about a print), anything else is its own text. The same words whether it struck at import or in a call."""
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "printed or wrote more than the sandbox's output cap (a huge print?)"
    if isinstance(exc, MemoryError):
        return "ran out of the sandbox's memory cap (an enormous allocation?)"
    if isinstance(exc, RecursionError):
        return "maximum recursion depth exceeded"
    return _text(exc)


def _describe(exc: BaseException, own_file: str, exercise_id: str) -> dict:
    message = _reason(exc)
    return {"exc": _builtin_name(exc), "type": type(exc).__name__, "message": message[:2000],
            "where": _where(exc, own_file), "kind": type(exc).__name__ if type(exc).__name__ in (
                "ForbiddenCallError", "TamperingError", "ImplementationError", "Refused") else ""}


def serve(fd_in: int, fd_out: int) -> None:
    inp, out = os.fdopen(fd_in, "rb", buffering=0), os.fdopen(fd_out, "wb", buffering=0)

    def read_exact(n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = inp.read(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def send(obj) -> None:
        data = pickle.dumps(obj, protocol=4)
        out.write(HEADER.pack(len(data)) + data)

    config = pickle.loads(read_exact(HEADER.unpack(read_exact(HEADER.size))[0]))
    sys.path.insert(0, config["guard_dir"])
    import confine  # noqa: F401  (the copies beside this file: minillm.course.guard and .confine import nothing
    import guard  # from minillm)
    sys.path.pop(0)
    exercise_id, own_file = config["exercise_id"], config["module_file"]
    module = None
    try:
        lock_down(config)
        hits: list[str] = []
        guard.install_traps(exercise_id, config["forbidden"], hits)
        baseline = guard.snapshot()
        REFUSALS.clear()  # only what the submission's import does counts from here
        spec = importlib.util.spec_from_file_location(config["module_name"], own_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[config["module_name"]] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as e:  # noqa: BLE001  (SystemExit at import too)
            raise guard.ImplementationError(f"{os.path.basename(own_file)} failed to import: "
                                            f"{type(e).__name__}: {_reason(e)}{_where(e, own_file)}") from None
        changed = guard.restore_changes(baseline)
        if REFUSALS:
            raise Refused(REFUSALS[0])
        if changed:
            raise guard.ImplementationError(f"{os.path.basename(own_file)} replaced {', '.join(changed[:3])} at "
                                            "import (restored); do not monkey-patch libraries")
        fn = getattr(module, config["function"], None)
        if not callable(fn):
            raise guard.ImplementationError(f"{os.path.basename(own_file)}: no function {config['function']!r} "
                                            f"(exercise {exercise_id})")
        guard.check_provenance(exercise_id, fn, own_file, config["function"])
        send({"ready": True, "kernel": hasattr(fn, "fn") and type(fn).__module__.startswith("triton"), "walls": WALLS})
    except BaseException as e:  # noqa: BLE001
        send({"ready": False, **_describe(e, own_file, exercise_id)})
        return

    while True:
        try:
            request = pickle.loads(read_exact(HEADER.unpack(read_exact(HEADER.size))[0]))
        except EOFError:
            return
        target = getattr(module, request["name"], None)
        before_args = None  # set once the call's arguments are snapshotted (never a previous request's)
        try:
            if not callable(target):
                raise guard.ImplementationError(f"{os.path.basename(own_file)}: no function {request['name']!r}")
            if request["name"] != config["function"]:
                guard.check_provenance(exercise_id, target, own_file, request["name"])
            guard.check_shipped(module, request.get("shipped", ()), own_file, exercise_id)
            args, kwargs = request["args"], request["kwargs"]
            before_args = [_snapshot_arg(a) for a in args]
            before = guard.snapshot()
            REFUSALS.clear()
            try:
                if request.get("grid") is not None:  # kernel[grid](...): the outputs are the arguments written
                    target[tuple(request["grid"])](*args, **kwargs)
                    result = None
                else:
                    result = target(*args, **kwargs)
            finally:
                refused = list(REFUSALS)
                try:
                    guard.check_after_call(exercise_id, hits, before)
                finally:
                    if refused:  # even if the learner's code caught the refusal and went on
                        raise Refused(refused[0])
            mutated = {i: m for i, (b, a) in enumerate(zip(before_args, args))
                       if b is not None and (m := _mutation(b, a)) is not None}
            reply = {"result": encode(result), "mutated": mutated}
        except BaseException as e:  # noqa: BLE001  (SystemExit and KeyboardInterrupt are the learner's too)
            reply = _describe(e, own_file, exercise_id)
            if type(e).__module__ == "builtins" and isinstance(e, Exception) and before_args is not None:
                # a refusal the exercise asks for (ValueError...) may have changed its arguments first: the grader
                # sees those changes too, so "raise and change nothing" is graded as written
                try:
                    reply["mutated"] = {i: m for i, (b, a) in enumerate(zip(before_args, args))
                                        if b is not None and (m := _mutation(b, a)) is not None}
                except Exception:  # noqa: BLE001  (the error reply stands without them)
                    pass
        try:
            sys.stdout.flush()
        except OSError:  # past the output cap: the reply already says so
            pass
        send(reply)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
