"""Sleep mode (vLLM's LLM.sleep / wake_up): hand the device's memory back while the engine has nothing to do.

In RL from feedback one GPU takes turns: the engine generates rollouts, then the trainer needs the memory to update
the policy, then the engine generates again with the new weights. Tearing the engine down and building it again
costs a checkpoint load, a KV pool allocation and every CUDA graph capture; sleeping costs a copy.

    sleep(level=1)   the weights copied to host memory, the KV pool dropped (its contents are worthless between
                     bursts of work: the prefix cache is reset first); the device memory of both given back
    sleep(level=2)   the weights dropped too: the next thing they receive is new weights anyway
                     (update_weights, or reload_weights from the model's source)
    wake_up(tags)    "weights", "kv_cache" or both (the default): the memory taken again, the weights' values
                     copied back (level 1) or zeroed (level 2, to be loaded), the KV pool zeroed. An RL loop wakes
                     the weights first, loads the new ones, then wakes the KV pool, so the two never peak together

How the memory goes without a single Python object changing: every tensor's storage is resized to zero bytes and
later back to its size. The storage object is the one every parameter, view and layer attribute already refers
to, so they all see the memory again. What does change is the raw address, and a CUDA graph holds raw addresses:
the graphs are dropped at sleep (with their private memory pool) and captured again when the last tag wakes.
(vLLM keeps the addresses instead, with an allocator that unmaps a tensor's physical pages and maps new ones at the
same virtual address, so its graphs survive; the resize needs no allocator of its own and is the same on a CPU,
where level 1 saves only the KV pool, since "host memory" is where the weights already were.)

What level 2 keeps anyway: buffers the checkpoint does not hold (RoPE tables, a quantized layer's scales live
beside its codes and are weights here), LoRA adapter slots, an fp8 KV cache's scales, and a speculative proposer's
own model (a draft model, Medusa / EAGLE / MTP heads): they go to host memory like level 1's weights, so only the
parameters a checkpoint reloads are dropped. A proposer's state is found by walking it (`proposer_state`): its
tensors on the device, its KV pool, and its graphs, dropped at sleep and captured again (a draft runner's at wake
up, the heads' on their next use). Chapter 10 shows it in a cell (no exercise builds it); the engine mixin
EngineTools (engine_tools.py) exposes it, the workers (worker.py) carry it out for the target model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

SLEEP_TAGS = ("weights", "kv_cache")
SLEEP_LEVELS = (1, 2)


class EngineSleepingError(RuntimeError):
    """A request reached an engine that sleeps (LLMEngine.sleep): wake_up() first. The server answers 503."""


class SleepReport(NamedTuple):
    """What one worker's sleep gave back: bytes of device memory freed, bytes it keeps in host memory meanwhile."""

    freed_bytes: int
    host_bytes: int


def check_sleep_level(level: object) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or level not in SLEEP_LEVELS:
        raise ValueError(f"sleep level must be 1 (weights to host memory, KV cache dropped) or 2 (both dropped), "
                         f"got {level!r}")
    return level


def check_wake_tags(tags: Iterable[str] | None) -> tuple[str, ...]:
    """The tags to wake, in SLEEP_TAGS' order (None: all of them)."""
    if tags is None:
        return SLEEP_TAGS
    if isinstance(tags, str):
        tags = [tags]
    tags = list(tags)
    unknown = [t for t in tags if t not in SLEEP_TAGS]
    if unknown or not tags:
        raise ValueError(f"wake_up tags must be a non-empty subset of {list(SLEEP_TAGS)}, got {tags!r}")
    return tuple(t for t in SLEEP_TAGS if t in tags)


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over a whole storage (to copy it as bytes, whatever the element types of its tensors)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


@dataclass
class _Asleep:
    storage: torch.UntypedStorage
    nbytes: int
    backup: torch.Tensor | None  # the bytes in host memory; None: dropped (zeros when it wakes)


class SleepingTensors:
    """The storages one process has put to sleep, by tag. Each storage is handled once, however many tensors
    (views, tied weights) share it; `keep` wins where a storage is both kept and dropped."""

    def __init__(self) -> None:
        self._asleep: dict[str, list[_Asleep]] = {}

    def is_asleep(self, tag: str) -> bool:
        return tag in self._asleep

    def put_to_sleep(self, tag: str, keep: Iterable[torch.Tensor], drop: Iterable[torch.Tensor] = ()) -> SleepReport:
        """Free the memory of `keep` (its bytes copied to host memory first) and of `drop` (its bytes lost)."""
        if tag in self._asleep:
            raise RuntimeError(f"{tag!r} is asleep already")
        storages: dict[int, tuple[torch.UntypedStorage, bool]] = {}
        for kept, tensors in ((False, drop), (True, keep)):
            for tensor in tensors:
                storage = tensor.untyped_storage()
                if storage.nbytes() == 0 or not storage.resizable():  # (numpy- or mmap-backed: left in place)
                    continue
                storages[storage.data_ptr()] = (storage, kept or storages.get(storage.data_ptr(), (None, False))[1])
        asleep, freed, host = [], 0, 0
        for storage, kept in storages.values():
            backup = None
            if kept:
                backup = torch.empty(storage.nbytes(), dtype=torch.uint8,
                                     pin_memory=storage.device.type == "cuda")
                backup.copy_(_bytes_of(storage), non_blocking=True)
                host += backup.numel()
            asleep.append(_Asleep(storage, storage.nbytes(), backup))
        if any(storage.device.type == "cuda" for storage, _ in storages.values()):
            torch.cuda.synchronize()  # the copies to host memory have landed before the device memory goes
        for entry in asleep:
            entry.storage.resize_(0)
            freed += entry.nbytes
        self._asleep[tag] = asleep
        return SleepReport(freed, host)

    def wake(self, tag: str) -> None:
        """Take the memory of `tag` again: the kept bytes copied back, the dropped ones zeroed."""
        for entry in self._asleep.pop(tag, []):
            entry.storage.resize_(entry.nbytes)
            memory = _bytes_of(entry.storage)
            if entry.backup is None:
                memory.zero_()
            else:
                memory.copy_(entry.backup, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # (the pinned backups are freed when this returns)


class ProposerState(NamedTuple):
    """What a speculative proposer holds on the device (proposer_state)."""

    tensors: list[torch.Tensor]  # its weights, packed copies, static buffers: kept in host memory while asleep
    kv_pools: list[torch.Tensor]  # a draft model's KV pool: dropped
    graph_holders: list[Any]  # objects with release_graphs(): a draft ModelRunner, the heads' DraftGraphs


def proposer_state(root: Any, device: torch.device) -> ProposerState:
    """Walk `root` (a SpeculativeDecoder) through attributes of minillm's objects, containers and nn.Modules,
    collecting the tensors on `device`'s type, the KV pools of the runners it owns and the graph holders. The
    target's own tensors that a proposer shares (EAGLE reads its embedding and LM head; a self-speculative draft
    is its first layers) are the workers' to handle: the engine sleeps the workers first, so their storages are
    empty by then and SleepingTensors passes them by."""
    tensors, pools, holders, seen, stack = [], [], [], set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == device.type:
                tensors.append(obj)
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, nn.Module) or type(obj).__module__.startswith("minillm."):
            if callable(getattr(obj, "release_graphs", None)):
                holders.append(obj)
            kv = getattr(obj, "kv_cache", None)
            if kv is not None and isinstance(getattr(kv, "storage", None), torch.Tensor):
                pools.append(kv.storage)
            stack.extend(getattr(obj, "__dict__", {}).values())
    pool_ptrs = {p.untyped_storage().data_ptr() for p in pools}
    kept = [t for t in tensors if t.untyped_storage().data_ptr() not in pool_ptrs]
    return ProposerState(kept, pools, holders)


def give_back_device_memory(device: torch.device) -> None:
    """Return the caching allocator's free blocks to the driver, so another process (a trainer) can have them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
