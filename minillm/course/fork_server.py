"""The trusted side of the sandbox's fork server: start sandbox workers by forking a warm template process.

A sandbox worker (minillm/course/sandbox_worker.py) spends about two CPU seconds importing torch before the
submission's first line runs; a grading session with dozens of submissions paid that dozens of times. The fork
server is one `python -I sandbox_template.py` process per grading session that has imported torch,
numpy and triton and nothing of the course, and has not locked itself down. For each submission it forks a child
that then does exactly what a spawned worker does (a new session, its own scratch folder, log and environment,
then the rlimits, the import guard, the audit hook, the shortcut traps and the provenance check, in that order),
so the learner's code meets the same walls; only the imports are shared, copy-on-write.

Why it is safe on a CPU: the template never ran an operator, so torch's thread pools were never started
(OMP_NUM_THREADS=1 and MKL_NUM_THREADS=1 besides) and fork copies a single-threaded process. On a GPU the workers
are spawned as before: CUDA does not survive a fork. `MINILLM_SANDBOX_FORK=0` turns the server off.

The pipes of a worker are created here and handed to the server over a Unix socket (SCM_RIGHTS); the server is
the workers' parent, so it reaps them and tells the grader how each ended (`ForkedProcess.wait`).
"""
from __future__ import annotations

import atexit
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent


_BROKEN = False  # the template exited or failed once: this process spawns its workers from then on


def wanted() -> bool:
    """Fork workers from a template: on a CPU, unless MINILLM_SANDBOX_FORK=0 or the template failed."""
    if _BROKEN or os.environ.get("MINILLM_SANDBOX_FORK", "1") == "0":
        return False
    import torch
    return not torch.cuda.is_available()


class ForkServer:
    """One template worker process, started on first use, shared by every sandbox of this process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="minillm-forkserver-"))
        for name in ("sandbox_worker.py", "sandbox_template.py"):
            shutil.copy(HERE / name, self.dir / name)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock, self.lock = ours, threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-I", str(self.dir / "sandbox_template.py"), str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd=self.dir,
                                     env={**env, "HOME": str(self.dir), "TMPDIR": str(self.dir)})
        theirs.close()

    def _ask(self, request: dict, fds: tuple[int, ...] = ()) -> dict:
        global _BROKEN
        with self.lock:
            try:
                if fds:
                    socket.send_fds(self.sock, [pickle.dumps(request, protocol=4)], list(fds))
                else:
                    self.sock.sendall(pickle.dumps(request, protocol=4))
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
        if not data:
            _BROKEN = True
            raise OSError(f"the sandbox's fork server exited (code {self.proc.poll()})")
        return pickle.loads(data)  # the template is ours: nothing of the learner's has run in it

    def spawn(self, fds: tuple[int, int], env: dict[str, str], cwd: Path, log: Path) -> "ForkedProcess":
        reply = self._ask({"op": "spawn", "env": env, "cwd": str(cwd), "log": str(log)}, fds)
        return ForkedProcess(self, int(reply["pid"]))

    def close(self) -> None:
        self.sock.close()  # the server kills what it still runs and exits
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class ForkedProcess:
    """The parts of subprocess.Popen the sandbox uses, for a worker whose parent is the fork server."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid, self.returncode = server, pid, None

    def _status(self, timeout: float) -> int | None:
        if self.returncode is None:
            self.returncode = self.server._ask({"op": "wait", "pid": self.pid, "timeout": timeout})["status"]
        return self.returncode

    def poll(self) -> int | None:
        return self._status(0.0)

    def wait(self, timeout: float = 10.0) -> int:
        """The exit status (negative: the signal); a worker still alive after `timeout` s is killed first."""
        if self._status(timeout) is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._status(10.0)
        return self.returncode if self.returncode is not None else -signal.SIGKILL


_SERVER: ForkServer | None = None


def worker_env() -> dict[str, str]:
    """A worker's environment, less its own folders: the device's settings, never the grader's (no seed, no paths)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "LANG": "C.UTF-8"}
    for name in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "LD_LIBRARY_PATH", "TRITON_PTXAS_PATH"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    from minillm.course.checks import GRADED_TRITON_ENV
    return {**env, **GRADED_TRITON_ENV}


def prestart() -> None:
    """Start the fork server now (it imports torch while the session collects its tests), where one is used."""
    if wanted():
        server(worker_env())


def server(env: dict[str, str]) -> ForkServer:
    """This process's fork server (started with `env`, the workers' base environment, on first use)."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = ForkServer(env)
        atexit.register(_SERVER.close)  # its workers and its folder go with this process
    return _SERVER
