"""The sandbox's fork server: a warm template from which sandbox workers are forked (run as a script, CPU only).

Started by minillm.course.fork_server as `python -I sandbox_template.py SOCKET_FD` from a scratch folder holding a
copy of this file and of sandbox_worker.py, it imports torch, numpy and triton (nothing of the course, no lock-down:
no audit hook, no rlimits), then answers requests on a Unix socket from the grading session that started it:

* spawn (with the two pipe ends of a new worker, passed as SCM_RIGHTS): fork a child that starts a session of its
  own, closes every other descriptor (this socket first: a learner's code must never reach the template), takes
  its scratch folder, log and environment, then runs sandbox_worker.serve, which locks the child down exactly as a
  spawned worker locks itself down before the submission's module is imported;
* wait (a pid and a timeout): the child's exit status (negative: the signal), or None while it still runs. The
  template is the workers' parent, so it reaps them and the grader still learns that a worker died of SIGXCPU;
* an empty message (the session closed the socket): kill the workers still running and exit.
"""
from __future__ import annotations

import os
import pickle
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_worker  # noqa: E402  (the copy beside this file)

sys.path.pop(0)


def _message(sock) -> tuple[dict, list[int]]:
    import socket
    data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
    return (pickle.loads(data) if data else {}), list(fds)


def _child(request: dict, fds: list[int], sock) -> None:
    """In the forked child: become a fresh worker (own session, scratch folder, log and environment), then serve."""
    code = 1
    try:
        os.setsid()
        sock.close()  # the fork server's channel is not the learner's
        os.chdir(request["cwd"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        keep = {0, 1, 2, *fds}
        for fd in [int(n) for n in os.listdir("/proc/self/fd")]:  # whatever else the server held
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        os.environ.clear()
        os.environ.update(request["env"])
        import tempfile
        tempfile.tempdir = None  # recomputed from the new TMPDIR
        sandbox_worker.serve(fds[0], fds[1])
        code = 0
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def fork_server(sock_fd: int) -> None:
    """A template worker: torch, numpy and triton imported, nothing of the course, no lock-down yet. Each request
    (with the two pipe ends, passed over a Unix socket) forks a child that locks itself down and serves one
    submission exactly as a spawned worker would, without paying Python's and torch's start again. It also reaps
    its children and reports how each ended (the grader's messages say why a worker died). Used on a CPU only:
    CUDA does not survive a fork."""
    import signal
    import socket
    import time
    sock = socket.socket(fileno=sock_fd)
    import numpy  # noqa: F401
    import torch  # noqa: F401
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        pass
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # a fork copies one thread: a lock another thread held would stay held in every child
        print(f"sandbox template: {threads} threads after importing torch; forking is unsafe", file=sys.stderr)
        return  # the grader spawns its workers instead
    ended: dict[int, int] = {}
    children: set[int] = set()

    def reap(pid: int = -1, block: bool = False) -> None:
        while children:
            try:
                got, status = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if got == 0:
                return
            children.discard(got)
            ended[got] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            if pid != -1 or block:
                return

    def reply(obj) -> None:
        sock.sendall(pickle.dumps(obj, protocol=4))

    while True:
        request, fds = _message(sock)
        reap()
        op = request.get("op")
        if op is None:  # the grading session is gone: so are its workers
            for pid in children:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            return
        if op == "spawn":
            pid = os.fork()
            if pid == 0:
                _child(request, fds, sock)
            for fd in fds:
                os.close(fd)
            children.add(pid)
            reply({"pid": pid})
        elif op == "wait":  # {"pid", "timeout"}: the exit status, or None while it still runs
            pid, deadline = request["pid"], time.monotonic() + float(request.get("timeout", 0))
            while pid in children:
                reap(pid)
                if pid in children and time.monotonic() >= deadline:
                    break
                if pid in children:
                    time.sleep(0.01)
            reply({"status": ended.get(pid)})


if __name__ == "__main__":
    fork_server(int(sys.argv[1]))
