"""Copies between the device's KV pool and a host pool (swap space, the prefix cache's CPU tier) that never make
the host wait for the GPU (chapter 6).

A device-to-host copy the plain way, `host[:, :, dst] = storage[:, :, src].to("cpu")`, returns only when the bytes
are on the host, which is after *every* kernel queued before it has run. Under async scheduling that is the whole
step in flight: the host, which should be preparing the next step meanwhile, stands still. A host-to-device copy
from pageable memory waits the same way (the driver synchronizes the stream before it starts). So on a GPU:

    store (device -> host)   gather the blocks on the device (one indexing kernel), copy them into a pinned
                             staging buffer with non_blocking=True and record an event behind the copy. The
                             host pool is written later, by `settle`: the staged bytes are scattered into it
                             once the event has passed (usually long before anyone asks).
    load (host -> device)    settle first (a load may read a block a store is still bringing), gather the blocks
                             on the host into a pinned buffer, copy it to the device with non_blocking=True and
                             scatter it into the pool there. PyTorch's pinned allocator keeps the buffer until
                             that copy has run.

Ordering is the stream's: a store queued after the forward that wrote its blocks copies what that forward wrote;
a device block a store reads and a later load (or forward) writes are ordered on the same stream. Anything that
reads a host pool on the host must `settle` first (KVCache's cpu_storage / offload_storage properties do).

On a CPU every copy is immediate (the same code, nothing to wait for). `defer` makes a CPU store wait for
`settle` too, so the tests exercise the deferred path's ordering without a GPU; `wait` makes a GPU store land
before it returns, as the plain copy did (benchmarks/bench_kv_offload.py times both).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _PendingStore:
    staged: torch.Tensor  # [2, num_layers, n, *block_shape]: the device blocks' bytes, on the host once `done`
    pool: torch.Tensor  # the host pool they belong in
    dst: torch.Tensor  # their host block ids (CPU, long)
    done: Any  # a torch.cuda.Event recorded behind the copy; None: deferred on a CPU, lands only when settled

    def ready(self) -> bool:
        return self.done is not None and self.done.query()

    def land(self) -> None:
        if self.done is not None:
            self.done.synchronize()  # passed already unless the step that wrote the blocks still runs
        self.pool[:, :, self.dst] = self.staged


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """fp8 pools moved as their bytes (indexing a CPU float8 tensor is not implemented everywhere)."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


class HostTransfers:
    """The stores in flight between a device pool and its host pools, landed in the order they were made."""

    def __init__(self, device: torch.device, defer: bool = False, wait: bool = False) -> None:
        self.on_cuda = torch.device(device).type == "cuda"
        self.defer = defer
        self.wait = wait  # a store lands before it returns, as a plain `.to("cpu")` would (the benchmark's baseline)
        self._pending: list[_PendingStore] = []

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def store(self, storage: torch.Tensor, src: torch.Tensor, pool: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy device blocks `src` of `storage` into host blocks `dst` of `pool` (long tensors: src on the
        storage's device, uploaded without waiting as KVCache._device_ids does; dst on the host)."""
        self._land_ready()
        storage, pool = _as_bytes(storage), _as_bytes(pool)
        gathered = storage[:, :, src]
        if self.on_cuda:
            staged = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=True)
            staged.copy_(gathered, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending.append(_PendingStore(staged, pool, dst, done))
            if self.wait:
                self.settle()
        elif self.defer:
            self._pending.append(_PendingStore(gathered, pool, dst, None))  # (indexing made a copy)
        else:
            pool[:, :, dst] = gathered

    def load(self, pool: torch.Tensor, src: torch.Tensor, storage: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy host blocks `src` of `pool` into device blocks `dst` of `storage` (src on the host, dst on the
        storage's device)."""
        storage, pool = _as_bytes(storage), _as_bytes(pool)
        self.settle(pool, src)  # a store still bringing one of these blocks lands first
        if not self.on_cuda:
            storage[:, :, dst] = pool[:, :, src]
            return
        staged = torch.empty((*pool.shape[:2], len(src), *pool.shape[3:]), dtype=pool.dtype, pin_memory=True)
        torch.index_select(pool, 2, src, out=staged)
        storage[:, :, dst] = staged.to(storage.device, non_blocking=True)

    def settle(self, pool: torch.Tensor | None = None, blocks: torch.Tensor | None = None) -> None:
        """Land pending stores, oldest first, waiting where needed: all of them, or (given a pool and block ids)
        those up to the last one that writes any of those blocks; the others wait for a later call."""
        last = len(self._pending) - 1
        if pool is not None:
            wanted, address = set(blocks.tolist()), _as_bytes(pool).data_ptr()
            last = max((i for i, p in enumerate(self._pending)
                        if p.pool.data_ptr() == address and wanted.intersection(p.dst.tolist())), default=-1)
        for pending in self._pending[:last + 1]:
            pending.land()
        del self._pending[:last + 1]
        self._land_ready()

    def _land_ready(self) -> None:
        """Land the oldest stores whose copies have finished, without waiting (keeps the staging memory small)."""
        while self._pending and self._pending[0].ready():
            self._pending.pop(0).land()
