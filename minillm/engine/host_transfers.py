"""Copies between the device's KV pool and a host pool (swap space, the prefix cache's CPU tier) that never make
the host wait for the GPU, and never touch the bytes on the host (chapter 6).

A device-to-host copy the plain way, `host[:, :, dst] = storage[:, :, src].to("cpu")`, returns only when the bytes
are on the host, which is after *every* kernel queued before it has run. Under async scheduling that is the whole
step in flight: the host, which should be preparing the next step meanwhile, stands still. A host-to-device copy
from pageable memory waits the same way (the driver synchronizes the stream before it starts). And gathering or
scattering blocks on the host is a memcpy by the CPU: for an 8B model's 2 MB blocks, a prefix of 128 of them is
268 MB, a tenth of a second of one core per direction, longer than the H100 takes to recompute it.

So a host pool is *block-major*, [num_blocks, 2, num_layers, block_size, kv_heads, head_dim], and pinned on a GPU
machine: each host block is one contiguous run of bytes, and DMA moves it without the CPU.

    store (device -> host)   gather the blocks on the device into one block-major tensor (one indexing kernel),
                             then one asynchronous copy per run of consecutive host blocks straight into the pinned
                             pool; an event behind the last copy says when the bytes are there.
    load (host -> device)    one asynchronous copy per run of consecutive host blocks straight out of the pool into
                             a device tensor, then one indexing kernel scatters it into the pool's blocks.

Ordering is the stream's: a store queued after the forward that wrote its blocks copies what that forward wrote, and
a load queued after a store of the same host block reads what the store wrote, though the host never waited for
either. Only a reader on the host must `settle` first (KVCache's cpu_storage / offload_storage properties do).

On a CPU every copy is immediate (the same code, nothing to wait for). `defer` makes CPU stores wait until the next
load or `settle`, in order, as the stream runs them, so the tests exercise that ordering without a GPU; `wait` makes
a GPU store finish before it returns, as the plain copy did (benchmarks/bench_kv_offload.py times both).
"""
from __future__ import annotations

from typing import Any

import torch


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """fp8 pools moved as their bytes (indexing a CPU float8 tensor is not implemented everywhere)."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 else tensor


def block_runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(first id, first index, length) of each run of consecutive ids: [7, 8, 9, 2, 3] -> [(7, 0, 3), (2, 3, 2)].
    A run of host blocks is one contiguous range of the pool: one copy."""
    runs: list[tuple[int, int, int]] = []
    for i, block in enumerate(ids):
        if runs and block == runs[-1][0] + runs[-1][2]:
            first, index, length = runs[-1]
            runs[-1] = (first, index, length + 1)
        else:
            runs.append((block, i, 1))
    return runs


class HostTransfers:
    """Block copies between a device pool [2, num_layers, num_blocks, ...] and block-major host pools [num_blocks,
    2, num_layers, ...]; the host waits for none of them."""

    def __init__(self, device: torch.device, defer: bool = False, wait: bool = False) -> None:
        self.on_cuda = torch.device(device).type == "cuda"
        self.defer = defer
        self.wait = wait  # a store finishes before it returns, as a plain `.to("cpu")` would (the benchmark's baseline)
        self._last_store: Any = None  # a torch.cuda.Event behind the newest store's copies
        self._deferred: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []  # CPU, defer: (pool, blocks, dst)

    @property
    def num_pending(self) -> int:
        """Stores whose bytes may not be in their host pool yet (on a GPU: 1 while the newest one runs)."""
        if self.on_cuda:
            return int(self._last_store is not None and not self._last_store.query())
        return len(self._deferred)

    def store(self, storage: torch.Tensor, src: torch.Tensor, pool: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy device blocks `src` of `storage` into host blocks `dst` of `pool` (long tensors: src on the
        storage's device, uploaded without waiting as KVCache._device_ids does; dst on the host)."""
        storage, pool = _as_bytes(storage), _as_bytes(pool)
        gathered = storage[:, :, src].movedim(2, 0)  # [n, 2, num_layers, ...]: block-major, as the pool
        if not self.on_cuda:
            if self.defer:
                self._deferred.append((pool, gathered.contiguous(), dst.tolist()))
            else:
                pool[dst] = gathered
            return
        gathered = gathered.contiguous()
        for first, index, length in block_runs(dst.tolist()):
            pool[first:first + length].copy_(gathered[index:index + length], non_blocking=True)
        self._last_store = torch.cuda.Event()
        self._last_store.record()
        if self.wait:
            self._last_store.synchronize()

    def load(self, pool: torch.Tensor, src: torch.Tensor, storage: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy host blocks `src` of `pool` into device blocks `dst` of `storage` (src on the host, dst on the
        storage's device). A store of those host blocks still in flight is ahead of this copy on the stream."""
        storage, pool = _as_bytes(storage), _as_bytes(pool)
        if not self.on_cuda:
            self.settle()  # the deferred stores first, as the stream would run them
            storage[:, :, dst] = pool[src].movedim(0, 2)
            return
        staged = torch.empty((len(src), *pool.shape[1:]), dtype=pool.dtype, device=storage.device)
        for first, index, length in block_runs(src.tolist()):
            staged[index:index + length].copy_(pool[first:first + length], non_blocking=True)
        storage[:, :, dst] = staged.movedim(0, 2)

    def settle(self) -> None:
        """Make every store so far visible on the host (wait for the newest copy; land the deferred ones)."""
        if self._last_store is not None:
            self._last_store.synchronize()
            self._last_store = None
        for pool, blocks, dst in self._deferred:
            pool[dst] = blocks
        self._deferred.clear()
