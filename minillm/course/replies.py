"""What comes back from a sandbox worker, as the grading side reads it: plain data, never more than it carries, and
written into the test's own objects only where the exercise writes.

A reply is a length-prefixed pickle from the worker, a process the learner's code controls: it can write any bytes
to its end of the pipe, not only what `sandbox_worker.encode` makes. So the grading side believes none of it:

* the header may announce at most REPLY_CAP bytes (a forged header would have the grader hold gigabytes);
* the pickle may build lists, tuples, dicts, numbers, strings and bytes only (`PlainUnpickler`: no class is named,
  so nothing of the learner's runs here);
* it decodes to no more objects and tensor bytes than it carries (`Budget`): a pickle can name one object many
  times through its memo, and forty nested pairs of one list would decode to a trillion lists;
* it is nested at most MAX_DEPTH levels deep (the grader's decoding recurses), and a tensor's bytes are exactly
  its shape times its dtype's size;
* an argument the learner's function changed in place is written back only if the exercise writes it (the
  registry's `writes`: a kernel's output pointer, the ref counts `free_blocks` decrements). In one process any
  change would show; here a function that zeroes its weight, or rewrites the block table the test checks its answer
  against, fails the call instead of fooling the test's bookkeeping.
"""
from __future__ import annotations

import io
import math
import pickle
from typing import Any

TENSOR_TAG = "__minillm_tensor__"
STORAGE_TAG = "__minillm_storage__"  # the bytes of an argument's whole storage, written back by the caller
REPLY_CAP = 1 << 30  # bytes one reply may announce
MAX_DEPTH = 64  # levels of nesting a reply may have (the worker's encode sends at most 21)


class BadReply(Exception):
    """The reply is not what an honest worker sends (forged, or broken): the submission's process is ended."""


class ArgumentWritten(AssertionError):
    """The learner's function wrote into an argument its exercise only reads (the test keeps the original)."""


class PlainUnpickler(pickle.Unpickler):
    """Builds lists, tuples, dicts, numbers, strings and bytes only: a learner's pickle cannot name a class."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the submission's reply names {module}.{name}; only plain data may come back")


def load(body: bytes) -> Any:
    """The plain data in a reply's body."""
    return PlainUnpickler(io.BytesIO(body)).load()


class Budget:
    """How much a reply may decode to: one unit per object, one per tensor byte, at most the reply's size in bytes
    (an honest pickle spends at least a byte on each object it holds, and carries each tensor's bytes)."""

    def __init__(self, size: int) -> None:
        self.size = self.left = size

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise BadReply(f"its reply of {self.size} bytes decodes to more objects and tensor bytes than it carries "
                           "(one object named many times: a forged reply)")


def _tensor(value: tuple, budget: Budget):
    import torch
    _, dtype_name, shape, raw, device = value
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype):
        raise BadReply(f"it returned a tensor of unknown dtype {dtype_name!r}")
    if not (isinstance(shape, (tuple, list)) and all(type(n) is int and n >= 0 for n in shape)) or \
            not isinstance(raw, bytes):
        raise BadReply(f"it returned a tensor with shape {shape!r} (expected non-negative ints) and "
                       f"{type(raw).__name__} data (expected bytes)")
    size = math.prod(shape) * dtype.itemsize
    if len(raw) != size:
        raise BadReply(f"it returned a {dtype_name} tensor of shape {tuple(shape)} ({size} bytes) carrying "
                       f"{len(raw)} bytes")
    budget.spend(size)
    t = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(tuple(shape)) if raw
         else torch.empty(tuple(shape), dtype=dtype))
    return t.to(device) if str(device).startswith("cuda") and torch.cuda.is_available() else t


def decode(value: Any, budget: Budget | None = None, depth: int = 0) -> Any:
    """The objects `value` (a loaded reply) stands for: tensors rebuilt from their tagged tuples, containers
    copied, within `budget` (None: unbounded, for data the grader made itself) and MAX_DEPTH levels."""
    budget = budget or Budget(math.inf)
    budget.spend(1)
    if depth > MAX_DEPTH:
        raise BadReply(f"its reply is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, tuple) and len(value) == 5 and value[0] == TENSOR_TAG:
        return _tensor(value, budget)
    if isinstance(value, list):
        return [decode(v, budget, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(decode(v, budget, depth + 1) for v in value)
    if isinstance(value, dict):
        return {k: decode(v, budget, depth + 1) for k, v in value.items()}
    return value


def write_back(original: Any, new: Any) -> None:
    """Apply the learner's in-place change of an argument to the caller's object: a tensor's whole storage
    (so that a write past a view's edge shows, as it would in one process), a list's or a dict's content."""
    import torch
    if isinstance(original, torch.Tensor) and isinstance(new, tuple) and new[:1] == (STORAGE_TAG,):
        storage = torch.empty(0, dtype=torch.uint8, device=original.device).set_(original.untyped_storage())
        raw = torch.frombuffer(bytearray(new[1]), dtype=torch.uint8) if new[1] else torch.empty(0, dtype=torch.uint8)
        if raw.numel() != storage.numel():
            raise BadReply(f"it resized an argument's storage ({storage.numel()} -> {raw.numel()} bytes); write into "
                           "the tensors you are given")
        with torch.no_grad():
            storage.copy_(raw.to(storage.device))
    elif isinstance(original, list) and isinstance(new, list):
        original[:] = new
    elif isinstance(original, dict) and isinstance(new, dict):
        original.clear()
        original.update(new)


def check_writes(exercise_id: str, function: str, params: tuple[str, ...] | None, writes: tuple[str, ...],
                 written: list[int]) -> None:
    """Refuse a call that wrote into an argument it may only read. `function` is the name called (the exercise's own,
    whose positional arguments are `params`, or another function of the module, such as a kernel's launcher, which
    may write none), `writes` the exercise's output arguments, `written` the indices the call changed."""
    for i in written:
        name = params[i] if params is not None and i < len(params) else None
        if name is None or name not in writes:
            which = f"{name!r}" if name else f"number {i + 1}"
            may = ", ".join(writes) if writes and params is not None else "none of them"
            raise ArgumentWritten(f"{exercise_id}: {function} wrote into its argument {which}, which it only reads "
                                  f"(it may write: {may}); the test keeps the original: return new values instead")
