"""The prefix cache's CPU tier: evicted KV blocks kept in host memory, still named by their chain hash (chapter 5).

vLLM 0.11+ (`--kv-offloading-size GiB --kv-offloading-backend native`) and LMCache's CPU backend do this. Without
it, a cached block that nobody references stays in the device pool as *evictable* until the allocator needs it,
and then its keys and values are gone: a chat user who comes back after a few other users filled the pool pays
the whole prefill again. With it, the eviction first copies the block to a host pool, and a later prompt whose
chain stops hitting on the device but goes on hitting here gets fresh device blocks *filled from the host*
before its step's forward: those tokens count as computed, no prefill for them. Host memory is ten to a hundred
times the device's, so many more conversations stay warm (chapter 5's P8: multi-turn chat with more users than
the device cache holds keeps most of its time-to-first-token gain).

This module is the tier's bookkeeping only: hash -> host block with the same stored keys as the device cache
(parent hash and token ids, so a collision is a miss), LRU order, the copies queued for the step being planned,
and counters. minillm.engine.block_manager decides when to store (on eviction) and to load (after the device
chain stops hitting); the worker moves the bytes (KVCache.offload / KVCache.reload).

The tier has a host pool of its own, not the swap pool of preemption_mode="swap": a swapped-out sequence must find
its blocks again, while a tier block is only ever a cache entry that may be dropped, so sharing one pool would
either let the cache push out swapped sequences or let swapping starve the cache.

The copies of one step, and the rule that keeps them right. A step is planned first (the scheduler calls the
block manager) and carried out afterwards (the worker copies, then runs the forward). Within one plan:
  * a device block evicted (its store queued) may be handed to a new owner, which writes it: the worker stores
    before anything writes device blocks (ModelRunner.apply_block_ops: swap-outs, stores, swap-ins, copies,
    loads, then the forward);
  * a host block may be stored into and then loaded from (the hash was evicted on the device and asked for
    again in the same step): stores come before loads;
  * a host block loaded from may not be stored into again before the load ran: every host block the plan reads
    or writes is *pinned* until `take_copies` hands the plan's copies to the step; an eviction that finds every
    host block pinned stores nothing (the tier is a cache: the block is lost, as it would be without a tier).
"""
from __future__ import annotations

from collections import OrderedDict, deque

Entry = tuple[int, "int | None", tuple[int, ...]]  # (chain hash, parent hash, token ids): what a lookup compares


class OffloadTier:
    """The host pool's index: hash -> host block, stored keys, LRU order, pinned blocks, queued copies, counters.

    Counters: `stores` blocks copied out, `loads` blocks copied back (the block manager counts their tokens as
    prefix-cache hits, apart as `offload_hits`), `evictions` entries the LRU dropped, `dropped` evicted device
    blocks not stored because every host block was pinned by the step being planned."""

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"OffloadTier num_blocks must be an integer >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._block_of_hash: dict[int, int] = {}
        self._entry_of_block: dict[int, Entry] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # stored host blocks, least recently used first
        self._pinned: set[int] = set()  # host blocks the step being planned reads or writes
        self._stores: list[tuple[int, int]] = []  # (device block, host block), queued for the next step
        self._loads: list[tuple[int, int]] = []  # (host block, device block)
        self.stores = self.loads = self.evictions = self.dropped = 0

    # -- lookup -------------------------------------------------------------------------------------------
    def lookup(self, block_hash: int, parent_hash: int | None, token_ids: tuple[int, ...]) -> int | None:
        """The host block holding exactly these tokens after this parent, or None (a collision is a miss)."""
        block = self._block_of_hash.get(block_hash)
        if block is None or self._entry_of_block[block] != (block_hash, parent_hash, token_ids):
            return None
        return block

    def pin(self, block: int) -> None:
        """Keep a stored host block for the step being planned (a load will read it), as its most recently used."""
        self._pinned.add(block)
        self._lru.move_to_end(block)

    # -- the two copies -----------------------------------------------------------------------------------
    def store(self, device_block: int, entry: Entry) -> None:
        """A registered device block is being evicted: keep its K/V here (queue the device -> host copy). A hash
        already here needs no copy (the same prefix, whose bytes these are; or a colliding one, and then the first
        entry stays, as in the device cache): it only becomes the most recently used."""
        block_hash = entry[0]
        if block_hash in self._block_of_hash:
            self._lru.move_to_end(self._block_of_hash[block_hash])
            return
        host = self._take_host_block()
        if host is None:
            self.dropped += 1
            return
        self._block_of_hash[block_hash] = host
        self._entry_of_block[host] = (block_hash, entry[1], tuple(entry[2]))
        self._lru[host] = None
        self._pinned.add(host)
        self._stores.append((device_block, host))
        self.stores += 1

    def load(self, host_block: int, device_block: int) -> None:
        """Queue the host -> device copy that fills `device_block` with a stored entry (pinned for this step)."""
        self.pin(host_block)
        self._loads.append((host_block, device_block))
        self.loads += 1

    def loading_into(self, device_block: int) -> int | None:
        """The host block a queued load will copy into `device_block` in the step being planned, or None."""
        return next((host for host, dev in self._loads if dev == device_block), None)

    def queued_loads(self) -> list[tuple[int, int]]:
        return list(self._loads)

    def _take_host_block(self) -> int | None:
        if self._free:
            return self._free.popleft()
        victim = next((b for b in self._lru if b not in self._pinned), None)
        if victim is None:
            return None
        del self._lru[victim]
        del self._block_of_hash[self._entry_of_block.pop(victim)[0]]
        self.evictions += 1
        return victim

    def take_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The planned step's (stores, loads), handed to the step; its host blocks are unpinned."""
        stores, loads, self._stores, self._loads = self._stores, self._loads, [], []
        self._free.extend(b for b in sorted(self._pinned) if b not in self._entry_of_block)  # forgotten by reset
        self._pinned.clear()
        return stores, loads

    @property
    def num_stored(self) -> int:
        return len(self._entry_of_block)

    def stored_blocks(self) -> list[int]:
        """Stored host blocks, the next LRU victim first."""
        return list(self._lru)

    def reset(self) -> None:
        """Forget every entry (reset_prefix_cache). Copies already queued still run: their host blocks go back to
        the free list only when take_copies hands them to the step."""
        self._free.extend(b for b in self._lru if b not in self._pinned)
        self._block_of_hash.clear()
        self._entry_of_block.clear()
        self._lru.clear()

    def check(self) -> list[str]:
        """What is inconsistent in the index (empty when nothing): the block manager's check_invariants asks."""
        problems = []
        free, stored = list(self._free), list(self._lru)
        if sorted(stored) != sorted(self._entry_of_block):
            problems.append("the tier's LRU and its entries hold different host blocks")
        if any(self._block_of_hash.get(e[0]) != b for b, e in self._entry_of_block.items()) or \
                len(self._block_of_hash) != len(self._entry_of_block):
            problems.append("a tier entry's hash does not point back at its host block")
        lost = set(range(self.num_blocks)) - set(free) - set(stored) - self._pinned
        if len(set(free)) != len(free) or set(free) & (set(stored) | self._pinned) or lost:
            problems.append(f"host blocks not exactly one of free / stored / pinned (lost: {sorted(lost)[:5]})")
        if {h for _, h in self._stores} - self._pinned or {h for h, _ in self._loads} - self._pinned:
            problems.append("a queued copy's host block is not pinned")
        return problems
