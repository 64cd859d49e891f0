"""Kernel-enforced walls around the sandbox worker: what still holds once the learner's code has defeated every
Python-level guard.

The worker's audit hook and import guard (minillm/course/sandbox_worker.py) are Python objects inside the learner's
own process, and Python keeps nothing private: rebinding `builtins.any`, `os.path.realpath` or the hook's globals
(reachable from any frame) turns the hook into a no-op (PEP 578: audit hooks are no sandbox). So before the
submission is imported, the worker also asks the kernel for walls that no Python code can take down, for itself and
for every thread or process it could start, for good:

* no_new_privs, and every capability dropped: a worker run as root (as on Gradescope) can no longer raise its
  resource limits, mount, load kernel modules or read files it does not own;
* Landlock (Linux 5.13+): the file system shrinks to a read-only allowlist (the Python libraries, the system's own
  folders, the submission's private copy, the worker's bin and scratch folders), less every folder the grader denies
  (the course, the grader's files) except where an allowed folder lies inside one (a virtual environment in the
  repository). Nothing may be written, made or executed; TCP is refused (Landlock ABI 4) and so are signals to other
  processes and their abstract sockets (ABI 6). On a GPU, where CUDA's driver and Triton's compiler need much that
  no list foresees, Landlock only keeps the course's folders unreadable (writing and running stay the audit hook's)
  and lets files move between folders only inside the scratch folder. That last right must be given explicitly:
  Landlock refuses every rename into another folder (EXDEV) unless a rule grants LANDLOCK_ACCESS_FS_REFER there,
  even when nothing else is handled, and Triton's cache writes each compiled file in a temporary folder and
  renames it into place (ABI 2 or later; under ABI 1 no rule can allow it, so a GPU worker goes without Landlock);
* seccomp (CPU only): fork, exec, sockets, ptrace, other processes' memory, io_uring and signals to other processes
  fail with EPERM; clone3 reports ENOSYS, so that the C library starts threads with clone, whose flags can be checked.

Each wall is put up where the kernel offers it and skipped where it does not (an old kernel, a container that
filters the call); `confine` returns the ones that are up. Nothing here imports minillm: the worker loads this
file as a plain module, like minillm/course/guard.py.
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# ---- system calls -----------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # the same on every arch


def _syscall(nr: int, *args) -> int:
    result = _LIBC.syscall(ctypes.c_long(nr), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _prctl(option: int, *args) -> None:
    if _LIBC.prctl(ctypes.c_int(option), *[ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# ---- capabilities -----------------------------------------------------------------------------------

def drop_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (capset, version 3); a no-op for an ordinary user.
    With no_new_privs set, an exec'd program cannot get them back either."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # two halves of {effective, permitted, inheritable}, all zero
    if _LIBC.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# ---- Landlock -----------------------------------------------------------------------------------------

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_MAKE = sum(1 << b for b in range(4, 13))  # remove dir/file, make char/dir/reg/sock/fifo/block/sym
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # what a rule on a file may grant
# what the worker reads besides its libraries: the loader's cache and locale, and the kernel's facts about CPUs
SYSTEM_TREES = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc", "/proc/self",
                "/sys/devices/system/cpu", "/sys/fs/cgroup")
SYSTEM_FILES = ("/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/dev/null", "/dev/zero", "/dev/urandom",
                "/dev/random")


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers (0: none)."""
    try:
        return _syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # ..._VERSION
    except OSError:
        return 0


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def grants(trees: list[str], denied: list[str], explicit: list[str]) -> list[str]:
    """The folders and files to open to the worker: each of `trees` (real paths), less every `denied` folder inside
    it (its siblings are granted one by one instead); a tree inside a denied folder is dropped unless it is one of
    `explicit` (a folder the grader allows by name, such as the virtual environment inside the repository)."""
    out: list[str] = []

    def grant(path: str) -> None:
        inner = [d for d in denied if _inside(d, path) and d != path]
        if not inner:
            out.append(path)
            return
        try:
            children = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            return
        for child in children:
            if child.is_symlink() or child.path in denied:
                continue  # a link grants nothing by itself: its target is allowed or not on its own
            grant(child.path)

    for tree in dict.fromkeys(trees):
        if os.path.exists(tree) and (tree in explicit or not any(_inside(tree, d) for d in denied)):
            grant(tree)
    return out


def _landlock(abi: int, handled: int, rules: list[tuple[str, int]]) -> None:
    """Restrict this process (and what it starts) to `rules` (path, rights) for the file accesses in `handled`;
    TCP and, from ABI 6, signals and abstract sockets of processes outside the sandbox are refused besides."""
    net = 0b11 if abi >= 4 else 0  # bind and connect over TCP
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals of processes outside the sandbox
    attr = struct.pack("<QQQ", handled, net, scoped)[:24 if abi >= 6 else 16 if abi >= 4 else 8]
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _syscall(LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    try:
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                allowed = rights & handled & (FILE_RIGHTS if not os.path.isdir(path) else ~0)
                rule = ctypes.create_string_buffer(struct.pack("<Qi", allowed, fd), 12)
                _syscall(LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), rule, ctypes.c_uint32(0))
            finally:
                os.close(fd)
        _syscall(LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)


def landlock_rules(abi: int, allowed: list[str], libraries: list[str], denied: list[str],
                   gpu: bool, scratch: list[str] = ()) -> tuple[int, list[tuple[str, int]]]:
    """The accesses to handle and the (path, rights) rules. On a CPU: everything handled, reading allowed in the
    allowlist only, writing nowhere but /dev/null. On a GPU, where CUDA's driver and Triton's compiler (ptxas, a C
    compiler) read, write and run much that no list foresees, reading is handled and allowed everywhere but the
    course's folders (writing and running are left to the audit hook, as before), and moving a file into another
    folder is allowed inside `scratch` only, where Triton's cache renames what it compiled into place (Landlock
    refuses such renames wherever no rule grants FS_REFER, handled or not; ABI 1 has no such right: OSError)."""
    real_allowed = [os.path.realpath(p) for p in allowed]
    real_denied = [os.path.realpath(d) for d in denied]
    read = FS_READ_FILE | FS_READ_DIR
    if gpu:
        if abi < 2:
            raise OSError(errno.ENOTSUP, "Landlock ABI 1 refuses every rename between folders, which Triton's cache "
                                         "needs on a GPU")
        return read | FS_REFER, ([(p, read) for p in grants(["/", *real_allowed], real_denied, real_allowed)]
                                 + [(os.path.realpath(p), read | FS_REFER) for p in scratch])
    handled = (FS_EXECUTE | FS_WRITE_FILE | read | FS_MAKE | (FS_REFER if abi >= 2 else 0)
               | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0))
    trees = [os.path.realpath(p) for p in (*allowed, *libraries, *SYSTEM_TREES)]
    files = [os.path.realpath(f) for f in SYSTEM_FILES if os.path.exists(f)]
    return handled, [(p, read) for p in grants(trees, real_denied, real_allowed) + files] + [("/dev/null", FS_WRITE_FILE)]


# ---- seccomp ------------------------------------------------------------------------------------------

SECCOMP_ARCHES = {  # audit arch, then the system calls the worker may not make (EPERM), clone, clone3 and the signals
    "x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "socket": 41, "ptrace": 101,
                            "process_vm_readv": 310, "process_vm_writev": 311, "io_uring_setup": 425,
                            "io_uring_enter": 426, "io_uring_register": 427}, 56, 435, (62, 200, 234)),
    "aarch64": (0xC00000B7, {"execve": 221, "execveat": 281, "socket": 198, "ptrace": 117, "process_vm_readv": 270,
                             "process_vm_writev": 271, "io_uring_setup": 425, "io_uring_enter": 426,
                             "io_uring_register": 427}, 220, 435, (129, 130, 131)),
}
_LD_W_ABS, _JEQ, _JSET, _JGE, _RET = 0x20, 0x15, 0x45, 0x35, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
CLONE_THREAD = 0x00010000


def seccomp_program(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jump if true, jump if false, k) instructions: a foreign architecture's calls, the listed
    calls, clone without CLONE_THREAD (a process) and a signal to any process but this one fail; the rest runs."""
    arch, denied, clone, clone3, signals = SECCOMP_ARCHES[machine]
    eperm, enosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    prog = [(_LD_W_ABS, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, eperm), (_LD_W_ABS, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(_JGE, 0, 1, 0x40000000), (_RET, 0, 0, eperm)]  # the x32 ABI's numbers
    for nr in sorted(denied.values()):
        prog += [(_JEQ, 0, 1, nr), (_RET, 0, 0, eperm)]
    prog += [(_JEQ, 0, 1, clone3), (_RET, 0, 0, enosys)]
    prog += [(_JEQ, 0, 4, clone), (_LD_W_ABS, 0, 0, 16), (_JSET, 0, 1, CLONE_THREAD), (_RET, 0, 0, _ALLOW),
             (_RET, 0, 0, eperm)]
    for nr in signals:  # kill(pid or 0: own group), tkill and tgkill: the first argument must be this process
        prog += [(_JEQ, 0, 5, nr), (_LD_W_ABS, 0, 0, 16), (_JEQ, 2, 0, pid), (_JEQ, 1, 0, 0), (_RET, 0, 0, eperm),
                 (_RET, 0, 0, _ALLOW)]
    return prog + [(_RET, 0, 0, _ALLOW)]


def _seccomp(machine: str) -> None:
    prog = seccomp_program(machine, os.getpid())
    filters = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *ins) for ins in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(filters, ctypes.c_void_p))
    _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog))


# ---- all together -------------------------------------------------------------------------------------

def confine(allowed: list[str], libraries: list[str], denied: list[str], gpu: bool = False,
            scratch: list[str] = ()) -> list[str]:
    """Put up every wall this kernel offers (see the module docstring) and return their names. `allowed`: the folders
    the grader opens by name (they may lie inside a denied folder), `libraries`: sys.path's folders (never inside a
    denied one), `denied`: the course's folders, `scratch`: the worker's writable folder (on a GPU, where Triton's
    cache moves files between its folders). Call it once, single-threaded, before any of the learner's code runs."""
    up = []
    if platform.system() != "Linux":  # Landlock, seccomp and capset are Linux's: elsewhere (macOS) no wall goes up
        return up

    def landlock() -> str:
        abi = landlock_abi()
        if not abi:
            raise OSError(errno.ENOSYS, "no Landlock in this kernel")
        _landlock(abi, *landlock_rules(abi, allowed, libraries, denied, gpu, scratch))
        return f"landlock (ABI {abi})"

    walls = [lambda: _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or "no_new_privs",
             lambda: drop_capabilities() or "capabilities dropped", landlock]
    if not gpu and platform.machine() in SECCOMP_ARCHES:
        walls.append(lambda: _seccomp(platform.machine()) or "seccomp")
    for wall in walls:
        try:
            up.append(wall())
        except (OSError, AttributeError):  # this kernel, container or C library does not offer it (AttributeError:
            pass                             # no such function in libc): the walls before it still stand
    return up
