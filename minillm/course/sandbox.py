"""The graded test's side of the sandbox: a submission's function, called in another process.

While `minillm grade` runs, a graded test's `impl` fixture is a `RemoteFunction`: calling it sends the inputs to a
worker process (minillm/course/sandbox_worker.py) that holds the submission's module and nothing of the course,
and returns the learner's outputs as plain data. The reference answers stay in the test's process, where the
comparison happens; the worker cannot import or read them (its import guard and audit hook refuse it), cannot
see the grader's seed (its environment is emptied) and cannot touch the test's torch (another process).

Why a second process rather than guards inside the test's process: in one Python process nothing is private.
A learner's function can walk the caller's frames to the expected value, find the reference through `gc`, or
patch the comparison; trapping each route one by one loses to the next spelling. Across a process boundary the
answers are simply not there.

What the worker may cost (set by the grader through the environment, see `limits_from_env`): memory
(RLIMIT_AS), CPU seconds (RLIMIT_CPU), output (RLIMIT_FSIZE on its log), no child processes (refused by its
audit hook; RLIMIT_NPROC as well where the user is not root), a wall-clock limit per call and one for the worker's
whole life (the exercise's timeout). A worker that dies, hangs or calls sys.exit ends the exercise: every later
call fails with the same one line. On a CPU the worker is forked from a warm template that has imported torch
(minillm.course.fork_server) and locks itself down after the fork; on a GPU it is spawned.
"""
from __future__ import annotations

import builtins
import inspect
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from minillm.course import fork_server, guard
from minillm.course.replies import (REPLY_CAP, STORAGE_TAG, BadReply, Budget, check_writes, decode, load,
                                    write_back)
from minillm.course.registry import Exercise, get, repo_root
from minillm.course.sync import NOT_ATTEMPTED

HERE = Path(__file__).resolve().parent
HEADER_SIZE = 8


class SubmissionCrash(Exception):
    """The worker died, hung, exited or could not start: the exercise scores 0 (the grader reads the name)."""


class SandboxRefused(AssertionError):
    """The submission tried something the sandbox refuses (reading the course's files, starting processes...)."""


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 8192  # RLIMIT_AS (0: none, as on a GPU): torch alone reserves ~2 GB of address space
    cpu_s: int = 120  # RLIMIT_CPU over the worker's life
    output_mb: int = 8  # RLIMIT_FSIZE: the worker's log (prints) and any scratch file
    call_timeout_s: float = 30.0  # wall clock per call
    budget_s: float = 0.0  # wall clock of the worker's whole life, start included (0: none): the exercise's timeout


def limits_from_env() -> Limits:
    import torch
    env = os.environ
    d = Limits()
    memory = 0 if torch.cuda.is_available() else d.memory_mb  # CUDA maps terabytes of address space: no RLIMIT_AS
    return Limits(int(env.get("MINILLM_SANDBOX_MEMORY_MB", memory)), int(env.get("MINILLM_SANDBOX_CPU_S", d.cpu_s)),
                  int(env.get("MINILLM_SANDBOX_OUTPUT_MB", d.output_mb)),
                  float(env.get("MINILLM_SANDBOX_CALL_TIMEOUT_S", d.call_timeout_s)),
                  float(env.get("MINILLM_SANDBOX_BUDGET_S", d.budget_s)))


def _exception(reply: dict, ex: Exercise) -> BaseException:
    """The learner's exception, rebuilt from the worker's description (a builtin type: pytest.raises still works)."""
    message, where, kind = reply["message"], reply.get("where", ""), reply.get("kind", "")
    if kind == "ImplementationError":
        return guard.ImplementationError(message)
    if kind == "ForbiddenCallError":
        return guard.ForbiddenCallError(message)
    if kind == "TamperingError":
        return guard.TamperingError(message)
    if kind == "Refused":
        return SandboxRefused(f"{ex.id}: {message}{where}")
    if reply["type"] in ("SystemExit", "KeyboardInterrupt"):
        return SubmissionCrash(f"{ex.id} called sys.exit({message}){where}: a graded function must return")
    cls = getattr(builtins, reply["exc"], Exception)
    if cls is NotImplementedError and NOT_ATTEMPTED in message:
        return NotImplementedError(message)
    text = message if reply["type"] == reply["exc"] else f"{reply['type']}: {message}"
    try:
        return cls(f"{text}{where}")
    except Exception:  # noqa: BLE001  (an exception type with another constructor)
        return RuntimeError(f"{reply['type']}: {text}{where}")


# ---- the worker process -----------------------------------------------------------------------------

class Sandbox:
    """One worker process holding `ex`'s chapter module from `module_file` (started on first use)."""

    def __init__(self, ex: Exercise, module_file: Path, forbidden: dict[str, str], denied: list[str],
                 limits: Limits | None = None, triton: bool | None = None, key: str | None = None) -> None:
        # the file itself is never resolved: a submitted symbolic link is refused, not followed (see start)
        self.ex, self.module_file = ex, Path(module_file).parent.resolve() / Path(module_file).name
        # the engine's names cannot even be imported in the worker: only the libraries' shortcuts need traps there
        self.forbidden = {k: v for k, v in forbidden.items() if not k.startswith(("minillm.", "kernels."))}
        self.denied = denied
        self.limits = limits or limits_from_env()
        text = (self.module_file.read_text(encoding="utf-8", errors="replace")
                if self.module_file.is_file() and not self.module_file.is_symlink() else "")
        self.triton = ("triton" in text) if triton is None else triton
        # unique per submission: one grading session may launch the kernels of several submissions of a chapter
        self.module_name = f"submission_{self.module_file.stem}" + (f"_{key}" if key else "")
        self.spent = 0.0  # seconds of the budget used so far (waiting for the worker)
        self._reply_size = 0  # bytes of the last reply: what it may decode to (minillm.course.replies.Budget)
        self.proc: subprocess.Popen | None = None
        self.kernel = False  # the exercise's function is a @triton.jit kernel (the worker says so)
        self.walls: list[str] = []
        self.fatal: str | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="minillm-sandbox-"))
        self.log = self.dir / "scratch" / "output.log"

    # -- lifecycle --
    def start(self) -> None:
        if self.module_file.is_symlink():  # it would import whatever it points to: the engine's own module, say
            self._die(f"{self.module_file.name} is a symbolic link (to {os.readlink(self.module_file)}): submit the "
                      "module's own text")
        if not self.module_file.is_file():
            self._die(f"{self.module_file.name} is missing from the submission (one module per chapter, "
                      f"at its top level or under exercises/)")
        bin_dir, scratch = self.dir / "bin", self.dir / "scratch"
        bin_dir.mkdir()
        scratch.mkdir()
        for name in ("sandbox_worker.py", "guard.py", "confine.py"):
            shutil.copy(HERE / name, bin_dir / name)
        r_req, w_req = os.pipe()
        r_rep, w_rep = os.pipe()
        env = {**fork_server.worker_env(), "HOME": str(scratch), "TMPDIR": str(scratch),
               "TRITON_CACHE_DIR": str(scratch / "triton")}
        self.proc = None
        if fork_server.wanted():  # a child of the warm template (see minillm.course.fork_server)
            try:
                self.proc = fork_server.server(fork_server.worker_env()).spawn((r_req, w_rep), env, scratch, self.log)
            except OSError:  # the template is gone or refused to fork: spawn, as on a GPU
                self.proc = None
        if self.proc is None:
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen([sys.executable, "-I", str(bin_dir / "sandbox_worker.py"), str(r_req),
                                              str(w_rep)], pass_fds=(r_req, w_rep), stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, env=env, cwd=scratch,
                                             start_new_session=True)
        os.close(r_req)
        os.close(w_rep)
        self._w, self._r = w_req, r_rep
        lim = self.limits
        self._send({"exercise_id": self.ex.id, "function": self.ex.function, "module_name": self.module_name,
                    "module_file": str(self.module_file), "forbidden": self.forbidden, "triton": self.triton,
                    "guard_dir": str(bin_dir), "scratch": str(scratch),
                    "denied": [str(Path(d).resolve()) for d in self.denied],
                    "allowed": [str(bin_dir), str(scratch), str(self.module_file.parent), sys.prefix, sys.base_prefix],
                    "limits": {"memory_mb": lim.memory_mb, "cpu_s": lim.cpu_s, "output_mb": lim.output_mb}})
        reply = self._receive(timeout=max(60.0, lim.call_timeout_s), what="starting")
        if not reply.get("ready"):
            exc = _exception(reply, self.ex)
            self._die(str(exc) if isinstance(exc, (guard.ImplementationError, SubmissionCrash))
                      else f"{self.module_file.name} failed to import: {exc}")
        self.kernel = bool(reply.get("kernel"))
        self.walls = list(reply.get("walls") or [])  # the kernel's walls that went up (minillm.course.confine)

    def _kill(self) -> None:
        """Kill the worker and everything it started (its own process group)."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def close(self) -> None:
        self._kill()
        for fd in (getattr(self, "_w", None), getattr(self, "_r", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._w = self._r = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def _die(self, message: str) -> None:
        self.fatal = message
        self._kill()
        raise SubmissionCrash(message)

    # -- messages --
    def _send(self, obj: Any) -> None:
        data = pickle.dumps(obj, protocol=4)
        try:
            os.write(self._w, len(data).to_bytes(HEADER_SIZE, "little"))
            view = memoryview(data)
            while view:
                view = view[os.write(self._w, view):]
        except (BrokenPipeError, OSError):
            self._died("receiving its inputs")

    def _receive(self, timeout: float, what: str) -> dict:
        start = time.monotonic()
        budget_left = self.limits.budget_s - self.spent if self.limits.budget_s > 0 else float("inf")
        limit, self._limit = ((timeout, f"{timeout:g} s") if timeout <= budget_left else
                              (max(0.0, budget_left), f"{self.limits.budget_s:g} s (the exercise's time limit)"))
        deadline = start + limit
        try:
            size = int.from_bytes(self._read(HEADER_SIZE, deadline, what), "little")
            if size > REPLY_CAP:
                self._die(f"{self.ex.id}: the submission's process announced a reply of {size} bytes while {what}; "
                          f"at most {REPLY_CAP} may come back")
            body = self._read(size, deadline, what)
        finally:
            self.spent += time.monotonic() - start
        self._reply_size = len(body)
        try:
            return load(body)
        except Exception as e:  # noqa: BLE001  (a forged or broken reply)
            self._die(f"{self.ex.id}: the submission's process sent an unreadable reply ({type(e).__name__}: {e})")

    def _read(self, n: int, deadline: float, what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                self._die(f"{self.ex.id} timed out after {self._limit} while {what} "
                          "(an infinite loop, or far too slow?)")
            chunk = os.read(self._r, min(n - len(buf), 1 << 20))
            if not chunk:
                self._died(what)
            buf += chunk
        return bytes(buf)

    def _died(self, what: str) -> None:
        rc = self.proc.wait() if self.proc else None
        if rc is not None and rc < 0:
            sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else f"signal {-rc}"
            why = {"SIGXCPU": f"used more than {self.limits.cpu_s} s of CPU time",
                   "SIGKILL": "was killed (out of memory?)", "SIGXFSZ": "wrote more than the output cap",
                   "SIGSEGV": "crashed with SIGSEGV (a segfault in your code or a library it called)"}.get(sig, f"died from {sig}")
            self._die(f"{self.ex.id}: the submission's process {why} while {what}")
        self._die(f"{self.ex.id}: the submission's process exited (code {rc}) while {what}: "
                  "does your code call os._exit() or quit()?")

    # -- calls --
    def call(self, name: str, args: tuple, kwargs: dict, grid: tuple | None = None,
             shipped: tuple[str, ...] = ()) -> Any:
        """`module.name(*args, **kwargs)` in the worker (`module.name[grid](...)`: a kernel launch), with the
        learner's in-place changes of list, dict and tensor arguments applied to the caller's objects. The worker
        first checks that each of `shipped` (the course's code around a kernel) is the function its file defines
        (guard.check_shipped)."""
        if self.fatal:
            raise SubmissionCrash(self.fatal)
        if self.proc is None:
            self.start()
        self._send({"name": name, "args": args, "kwargs": kwargs, "grid": grid, "shipped": tuple(shipped)})
        reply = self._receive(self.limits.call_timeout_s, f"running {name}")
        if "result" not in reply:
            exc = _exception(reply, self.ex)
            if isinstance(exc, (SubmissionCrash, guard.ImplementationError)):
                self._die(str(exc))
            if reply.get("mutated"):  # what the raising call changed in place, as a returning call's changes
                self._write_back(name, args, reply)
            raise exc
        budget = self._write_back(name, args, reply)
        try:
            return decode(reply["result"], budget)
        except (BadReply, TypeError, ValueError) as e:  # a forged reply: the worker is no longer believed
            self._die(f"{self.ex.id}: the submission's process sent a reply the grader refuses: {e}")

    def _write_back(self, name: str, args: tuple, reply: dict) -> Budget:
        """Apply the learner's in-place changes of the reply (only to arguments the exercise `writes`) to the
        caller's objects; return the reply's size budget, part spent."""
        try:
            mutated = {i: v for i, v in dict(reply.get("mutated") or {}).items()
                       if type(i) is int and 0 <= i < len(args)}
            check_writes(self.ex.id, name, self.ex.param_names if name == self.ex.function else None, self.ex.writes,
                         sorted(mutated))
            budget = Budget(self._reply_size)
            for i, value in mutated.items():
                write_back(args[i], value if isinstance(value, tuple) and value[:1] == (STORAGE_TAG,)
                           else decode(value, budget))
            return budget
        except (BadReply, TypeError, ValueError) as e:  # a forged reply: the worker is no longer believed
            self._die(f"{self.ex.id}: the submission's process sent a reply the grader refuses: {e}")


class RemoteFunction:
    """A function of the submission's module, run in the sandbox. Carries the exercise's signature, so that
    `use_overrides` accepts it; a Triton exercise also exposes `__wrapped__.fn.__module__`, the name of a stand-in
    module whose attributes are the submission module's launchers (the graded tests launch kernels through them)."""

    def __init__(self, sandbox: Sandbox, name: str, signature: inspect.Signature | None = None,
                 shipped: tuple[str, ...] = ()) -> None:
        self._sandbox, self.__name__, self.__qualname__, self._shipped = sandbox, name, name, shipped
        self.__module__ = sandbox.module_name
        self.__doc__ = f"{name} from the submission, run in the grader's sandbox"
        if signature is not None:
            self.__signature__ = signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._sandbox.call(self.__name__, args, kwargs, shipped=self._shipped)

    def __repr__(self) -> str:
        return f"<sandboxed {self.__module__}.{self.__name__}>"


class RemoteModule(types.ModuleType):
    def __init__(self, sandbox: Sandbox) -> None:
        super().__init__(sandbox.module_name)
        self._sandbox = sandbox

    def __getattr__(self, name: str) -> RemoteFunction:
        if name.startswith("__"):
            raise AttributeError(name)
        return RemoteFunction(self._sandbox, name)


class _KernelHandle:
    """Stands for the submission's @triton.jit kernel: `.fn.__module__` names the stand-in module (whose
    launchers run in the sandbox) and `handle[grid](*args)` launches the kernel there, as `kernel[grid](...)` does."""

    def __init__(self, sandbox: Sandbox, name: str) -> None:
        self._sandbox, self._name = sandbox, name
        self.fn = types.SimpleNamespace(__module__=sandbox.module_name, __name__=name)

    def __getitem__(self, grid: Any) -> Callable:
        def launch(*args: Any, **kwargs: Any) -> None:
            g = grid(kwargs) if callable(grid) else grid  # a grid function gets the launch's meta-parameters
            self._sandbox.call(self._name, args, kwargs, grid=tuple(g))
        return launch


_SANDBOXES: dict[str, Sandbox] = {}  # by submission key (or exercise id outside a plan)
SUBMISSIONS: dict[str, Path] = {}  # the grader's plan: submission key -> its folder (set by the pytest plugin)


def _signature(ex: Exercise) -> inspect.Signature:
    return inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ex.param_names])


def remote_function(exercise_id: str, impl_dir: Path, forbidden: dict[str, str],
                    key: str | None = None) -> RemoteFunction:
    """The sandboxed function of `exercise_id` from the submission folder `impl_dir` (one worker per exercise
    and submission `key`)."""
    ex = get(exercise_id)
    slot = f"{key}:{exercise_id}" if key else exercise_id
    if slot not in _SANDBOXES:
        denied = [str(repo_root())] + [d for d in os.environ.get("MINILLM_SANDBOX_DENY", "").split(os.pathsep) if d]
        _SANDBOXES[slot] = Sandbox(ex, Path(impl_dir) / f"{ex.module}.py", forbidden, denied, key=key)
    box = _SANDBOXES[slot]
    if box.proc is None and not box.fatal:
        box.start()
    fn = RemoteFunction(box, ex.function, _signature(ex))
    if box.kernel:
        sys.modules.setdefault(box.module_name, RemoteModule(box))
        fn.__wrapped__ = _KernelHandle(box, ex.function)
    return fn


def close(key: str) -> None:
    """End the workers of submission `key` (its tests are done); its result stays with the grader."""
    for slot in [s for s in _SANDBOXES if s.split(":")[0] == key]:
        box = _SANDBOXES.pop(slot)
        box.close()
        sys.modules.pop(box.module_name, None)


def close_all() -> None:
    for box in _SANDBOXES.values():
        box.close()
    _SANDBOXES.clear()
