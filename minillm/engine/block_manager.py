"""The paged KV block manager: who owns which KV block, with reference counts (chapter 5).

PagedAttention's idea, borrowed from virtual memory: the KV cache is a pool of fixed-size blocks of
`block_size` token slots, and each sequence has a *block table* mapping its logical block j (tokens
j*block_size .. (j+1)*block_size-1) to any physical block. A sequence takes a block only when it reaches
it, so the only waste is the unfilled tail of its last block (see kv_waste.py), and blocks can be *shared*:
a forked sequence (parallel sampling) or a request with a cached prefix points at the same physical block,
and a reference count says how many block tables hold it.

Block states, always exactly one of:
    free       ref 0, in `free_block_ids`, holds nothing anyone will read
    used       ref >= 1, in at least one block table
    evictable  ref 0, registered in the prefix cache: reusable by a cache hit until evicted (LRU)

Writing is allowed only into a block that is used by exactly one table and not in the prefix cache;
anything else is copied first (copy-on-write) and the (src, dst) pair goes to the runner, which performs
swap-outs, then swap-ins, then copies, before the forward that writes the new tokens (with the CPU tier below, its
stores go right after the swap-outs and its loads right after the copies).

The prefix cache's CPU tier (EngineConfig.kv_offloading_size, offload_tier.py): when an evictable cached block is
evicted, its K/V are first stored in a host pool under the same chain hash; a prompt's lookup takes each block
from the device cache where it is there and from the tier where it is not, and each block found in the tier takes a
fresh device block, filled from the host before the step's forward and registered as computed at once (its tokens
count as cached, `offload_hits` apart).

When do blocks enter the prefix cache? When they are full *and computed*. The engine advances
`seq.num_computed_tokens` after the forward; `mark_computed(seq)` (called by the scheduler for every running
sequence at the start of each step, and by `append_slots`, `swap_out` and `free`) registers the full blocks
below num_computed_tokens. Registering at allocation time instead would let a request in the same step hit a
block whose K/V have not been written yet.

Sliding windows (block_window.py): with `sliding_window` (every layer of the model slides), the blocks wholly
before a sequence's window are given back as it goes (their table entries become NULL_BLOCK) and a prompt is
allocated a chunk at a time, so a sequence holds its window, not its whole context.

The arithmetic (slot mapping, blocks to take, references to drop, swap pairs) lives in block_table.py as plain
functions, the course's exercises; this class calls them through `dispatch`.
"""
from __future__ import annotations

from collections import deque

from minillm.engine.block_invariants import check_block_manager
from minillm.engine.block_swap import SwapSpace
from minillm.engine.block_table import blocks_to_append, free_blocks, slot_mapping
from minillm.engine.block_window import NULL_BLOCK, SlidingWindowBlocks, held_blocks, num_released
from minillm.engine.offload_tier import OffloadTier
from minillm.engine.prefix_cache import PrefixCache, chain_hashes
from minillm.engine.sequence import Sequence
from minillm.hooks import dispatch


class BlockManager(SwapSpace, SlidingWindowBlocks):
    """Allocates device (and CPU swap) KV blocks to sequences; optional prefix caching, with a CPU tier; with
    `sliding_window`, gives back the blocks that slid out of every layer's window."""

    def __init__(self, num_blocks: int, block_size: int, num_cpu_blocks: int = 0, watermark: float = 0.01,
                 enable_prefix_caching: bool = False, num_offload_blocks: int = 0,
                 sliding_window: int | None = None) -> None:
        for name, value, low in (("num_blocks", num_blocks, 1), ("block_size", block_size, 1),
                                 ("num_cpu_blocks", num_cpu_blocks, 0), ("num_offload_blocks", num_offload_blocks, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BlockManager {name} must be an integer >= {low}, got {value!r}")
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"BlockManager sliding_window must be an integer >= 1 or None, got {sliding_window!r}")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark must be a fraction in [0, 1), got {watermark!r}")
        if num_offload_blocks and not enable_prefix_caching:
            raise ValueError(f"num_offload_blocks={num_offload_blocks} needs enable_prefix_caching=True: the CPU tier "
                             f"keeps evicted prefix-cache blocks")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_cpu_blocks = num_cpu_blocks
        self.sliding_window = sliding_window  # every layer's window: blocks before it are given back (None: kept)
        # Admissions keep this many blocks free, so that running sequences can still grow without an
        # immediate preemption right after a new request came in.
        self.watermark_blocks = int(watermark * num_blocks)
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.free_cpu_block_ids: deque[int] = deque(range(num_cpu_blocks))
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None
        # the prefix cache's CPU tier (EngineConfig.kv_offloading_size): evicted cached blocks kept in host memory
        self.num_offload_blocks = num_offload_blocks
        self.offload = OffloadTier(num_offload_blocks) if num_offload_blocks else None
        self._on_device: dict[int, Sequence] = {}  # seq_id -> sequence holding device blocks
        self._cpu_tables: dict[int, list[int]] = {}  # seq_id -> CPU blocks of a swapped-out sequence
        self._num_offered: dict[int, int] = {}  # seq_id -> leading blocks already offered to the prefix cache
        self._hashes: dict[int, list[int]] = {}  # seq_id -> chain hashes of its leading full blocks

    # -- counts -------------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: never-used ones plus evictable cached ones."""
        return len(self.free_block_ids) + (self.prefix_cache.num_evictable if self.prefix_cache else 0)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_free_cpu_blocks(self) -> int:
        return len(self.free_cpu_block_ids)

    @property
    def num_used_cpu_blocks(self) -> int:
        return self.num_cpu_blocks - self.num_free_cpu_blocks

    @property
    def prefix_cache_hits(self) -> int:
        """Prompt tokens served from the prefix cache (not recomputed), summed over allocations."""
        return self.prefix_cache.hits if self.prefix_cache else 0

    @property
    def offload_hits(self) -> int:
        """Of prefix_cache_hits, the tokens whose K/V came back from the CPU tier (copied, not recomputed)."""
        return self.prefix_cache.offload_hits if self.prefix_cache else 0

    @property
    def prefix_cache_queries(self) -> int:
        """Tokens of every allocated sequence, summed: the denominator of the hit rate."""
        return self.prefix_cache.queries if self.prefix_cache else 0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def max_blocks_per_seq(self) -> int:
        """The most blocks one sequence can ever hold: the whole pool minus the watermark kept free."""
        return self.num_blocks - self.watermark_blocks

    def is_writable(self, block: int) -> bool:
        """May a step write K/V into this block in place? Only if one table holds it and no hash vouches for it."""
        return self.ref_counts[block] == 1 and not (self.prefix_cache and self.prefix_cache.is_cached(block))

    # -- single blocks ------------------------------------------------------------------------------------
    def _take_block(self) -> int:
        if self.free_block_ids:
            block = self.free_block_ids.popleft()
        else:
            victim = self.prefix_cache.evict_entry() if self.prefix_cache else None
            if victim is None:
                raise RuntimeError(f"out of KV blocks: all {self.num_blocks} are in use (check can_allocate / "
                                   "can_append before allocating)")
            block = victim[0]
            if self.offload is not None:  # its K/V go to host memory first (stored before anything writes it)
                self.offload.store(*victim)
        self.ref_counts[block] = 1
        return block

    def _copy_block(self, src: int, dst: int, copies: list[tuple[int, int]]) -> None:
        """Queue the copy-on-write src -> dst. A src being filled from the CPU tier in this very step is not there
        yet when copies run (before the tier's loads): dst is filled from the same host block instead."""
        host = self.offload.loading_into(src) if self.offload is not None else None
        if host is None:
            copies.append((src, dst))
        else:
            self.offload.load(host, dst)

    def _hold_cached(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.prefix_cache.reuse(block)
        self.ref_counts[block] += 1

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each of `blocks` (tail first); unreferenced ones become free or evictable."""
        for block in dispatch("ch05.free_blocks", free_blocks)(blocks, self.ref_counts):
            if self.prefix_cache and self.prefix_cache.is_cached(block):
                self.prefix_cache.make_evictable(block)
            else:
                self.free_block_ids.append(block)

    def reset_prefix_cache(self, keep_offloaded: bool = False) -> bool:
        """Forget every cached prefix (after new weights, or between benchmark runs): evictable blocks become
        free, blocks in use stay with their sequences but are no longer offered to others; the CPU tier is emptied
        too, unless `keep_offloaded` (sleep mode drops the device pool, but the weights, which the host copies were
        computed with, stay until new ones come, which reset everything). False when this manager has no prefix
        cache."""
        if self.prefix_cache is None:
            return False
        self.free_block_ids.extend(self.prefix_cache.reset())
        if self.offload is not None and not keep_offloaded:
            self.offload.reset()
        return True

    def forget_unfilled(self, loads: list[tuple[int, int]], swap_ins: list[tuple[int, int]] = ()) -> None:
        """A step failed, maybe before its copies into device blocks ran: those blocks may hold anything, so no
        hash may vouch for them. CPU-tier loads (host, device) were registered when planned: unregister them.
        Swap-ins (cpu, device) are not registered yet, but their sequence would offer them to the prefix cache
        when it is freed (mark_computed): count them as offered already, so they never are."""
        for _, block in loads:
            if self.prefix_cache is not None and self.prefix_cache.is_cached(block):
                unreferenced = self.prefix_cache.is_evictable(block)
                self.prefix_cache.forget(block)
                if unreferenced:
                    self.free_block_ids.append(block)
        unfilled = {block for _, block in swap_ins}
        for seq_id, seq in self._on_device.items():
            if unfilled.intersection(seq.block_table):
                self._num_offered[seq_id] = len(seq.block_table)

    def take_offload_copies(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The CPU tier's copies queued since the last call, ((device, host) stores, (host, device) loads): the
        scheduler hands them to the step it planned. Its host blocks are free to be reused by the next plan."""
        return self.offload.take_copies() if self.offload is not None else ([], [])

    # -- new sequences ------------------------------------------------------------------------------------
    def _match_prefix(self, seq: Sequence) -> tuple[list[tuple[str, int] | None], list[int]]:
        """(hits, chain hashes). hits: one entry per leading full block of seq that a new allocation takes from the
        cache: ("device", block) for a block cached in the device pool (preferred), ("host", host block) for one
        kept in the CPU tier; None for a block before a sliding window (never taken). Without a window, the run
        from block 0 until the first block found in neither (vLLM: the GPU's hits, then the offloading
        connector's); with one, see _window_hits."""
        if self.prefix_cache is None:
            return [], []
        if seq.reads_every_prompt_row:  # prompt_logprobs, MEAN / CLS pooling: a cached prefix has no output rows
            return [], []
        keys, bs = seq.cache_keys, self.block_size  # token ids (an embeddings prompt's: keys of its vectors)
        hashes = chain_hashes(keys, bs, seq.num_tokens // bs, salt=seq.cache_salt)
        found: list[tuple[str, int] | None] = []
        for j, h in enumerate(hashes):
            entry = (h, hashes[j - 1] if j else seq.cache_salt, tuple(keys[j * bs:(j + 1) * bs]))
            block = self.prefix_cache.lookup(*entry)
            host = self.offload.lookup(*entry) if block is None and self.offload is not None else None
            found.append(("device", block) if block is not None else ("host", host) if host is not None else None)
            if found[-1] is None and self.sliding_window is None:
                break
        if self.sliding_window is not None:
            return self._window_hits(seq, found), hashes
        return found[:-1] if found and found[-1] is None else found, hashes

    def _window_hits(self, seq: Sequence, found: list[tuple[str, int] | None]) -> list[tuple[str, int] | None]:
        """Under a sliding window a prefix hit needs only the blocks its next query can see: those before its window
        may have been released and evicted long ago (the oldest go first, to the CPU tier and then out of it)
        without costing the hit (vLLM's sliding-window lookup). `found`: every full block's cache entry or None.
        Returns the longest prefix whose window blocks are all found, as allocate reads hits: None for each block
        before the window, then the found entries (from the device or the tier, in any mix)."""
        run, best = 0, []  # run: found blocks in a row ending at block n - 1
        for n in range(1, len(found) + 1):
            run = run + 1 if found[n - 1] is not None else 0
            computed = n * self.block_size - (n * self.block_size == seq.num_tokens)  # a full hit: last token again
            kept = self.first_kept_block(computed)
            if run and n - run <= kept:
                best = [None] * kept + found[kept:n]
        return best

    def _allocation_cost(self, seq: Sequence, num_new_tokens: int | None = None,
                         hits: list[tuple[str, int] | None] | None = None) -> tuple[int, int]:
        """(free blocks that allocate(seq, num_new_tokens) would consume, tokens it would find cached). A block
        found in the CPU tier costs a fresh device block, as an uncached one does, but its tokens count as cached;
        a cached device block costs one only if nobody holds it (it is evictable); with a sliding window, blocks
        before the window cost nothing (they are not taken)."""
        if hits is None:  # (allocate passes the lookup it goes on to use)
            hits, _ = self._match_prefix(seq)
        cached = len(hits) * self.block_size
        full = cached > 0 and cached == seq.num_tokens  # the last block is copied (or loaded), not held
        cached -= full
        kept = self.first_kept_block(cached)
        blocks = self.blocks_needed(self.covered_tokens(seq.num_tokens, cached, num_new_tokens))
        held_already = sum(hit[0] == "device" and self.ref_counts[hit[1]] > 0 for hit in hits[kept:len(hits) - full])
        return blocks - kept - held_already, cached

    def num_cached_tokens_on_allocate(self, seq: Sequence) -> int:
        """What allocate(seq) would set num_computed_tokens to (the prefix-cache hit), without allocating."""
        return self._allocation_cost(seq)[1]

    def num_blocks_to_allocate(self, seq: Sequence, num_new_tokens: int | None = None) -> int:
        """Free blocks allocate(seq, num_new_tokens) would consume (cached prefix blocks that are held already cost
        nothing)."""
        return self._allocation_cost(seq, num_new_tokens)[0]

    def can_allocate(self, seq: Sequence, num_new_tokens: int | None = None) -> bool:
        """Could allocate(seq, num_new_tokens) succeed now and leave the watermark free?"""
        return self.num_free_blocks - self.num_blocks_to_allocate(seq, num_new_tokens) >= self.watermark_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int | None = None) -> list[tuple[int, int]]:
        """Give a new (or recomputed) sequence blocks for all its tokens, reusing cached prefix blocks.

        Sets seq.num_computed_tokens = seq.num_cached_tokens = the cached prefix length. A hit on the device is held
        as it is; a hit in the CPU tier takes a fresh device block, filled from the host before the step's forward
        (a queued load) and registered in the device cache at once, as computed: a request later in the same step
        that hits it reads it after the load, and a copy of it is redirected to the host block (_copy_block). If
        the WHOLE sequence is cached, its last token is left uncomputed so the step still produces logits; that
        token's block stays private: copied into a fresh block (the (src, dst) pair is returned) or loaded into
        one and not registered. With a sliding window (block_window.py), num_new_tokens (this step's chunk) limits
        the blocks taken to the cached prefix plus the chunk (later chunks take theirs through append_slots), and
        the cached blocks before the window are not taken: their entries are NULL_BLOCK."""
        if seq.block_table or seq.seq_id in self._on_device or seq.seq_id in self._cpu_tables:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks {seq.block_table}; free it first")
        if seq.num_tokens < 1:
            raise ValueError(f"sequence {seq.seq_id} has no tokens to allocate blocks for")
        if num_new_tokens is not None and num_new_tokens < 1:
            raise ValueError(f"num_new_tokens must be >= 1 (or None: all of them), got {num_new_tokens}")
        hits, hashes = self._match_prefix(seq)
        cost, _ = self._allocation_cost(seq, num_new_tokens, hits)
        if cost > self.num_free_blocks:
            raise RuntimeError(f"allocate needs {cost} free blocks, {self.num_free_blocks} are free")
        num_hit, bs, keys = len(hits), self.block_size, seq.cache_keys
        full = num_hit > 0 and num_hit * bs == seq.num_tokens
        computed = seq.num_tokens - 1 if full else num_hit * bs
        kept = self.first_kept_block(computed)  # blocks before it lie before the window: not taken
        taken = hits[kept:]
        last = taken.pop() if full else None
        # before any take: no eviction may hand out a device hit, nor store into a host block this plan reads
        for kind, block in taken + ([last] if full else []):
            if kind == "host":
                self.offload.pin(block)
        for kind, block in taken:
            if kind == "device":
                self._hold_cached(block)
        copies: list[tuple[int, int]] = []
        table = [NULL_BLOCK] * kept
        if last is not None:  # first, while its source is surely still cached (it is not held)
            kind, src = last
            dst = self._take_block()
            if kind == "host":
                self.offload.load(src, dst)
            elif dst != src:  # if the source was evicted to become dst itself, its content is already there
                self._copy_block(src, dst, copies)
            last = dst
        for j, (kind, block) in enumerate(taken, start=kept):
            if kind == "host":
                host, block = block, self._take_block()
                self.offload.load(host, block)
                self.prefix_cache.insert(block, hashes[j], hashes[j - 1] if j else seq.cache_salt,
                                         tuple(keys[j * bs:(j + 1) * bs]))
            table.append(block)
        if last is not None:
            table.append(last)
        while len(table) < self.blocks_needed(self.covered_tokens(seq.num_tokens, computed, num_new_tokens)):
            table.append(self._take_block())
        seq.block_table = table
        seq.num_computed_tokens = computed
        seq.num_cached_tokens = seq.num_computed_tokens
        self._on_device[seq.seq_id] = seq
        self._num_offered[seq.seq_id] = num_hit - 1 if full else num_hit  # (a full hit's last block: private)
        self._hashes[seq.seq_id] = hashes
        if self.prefix_cache:
            loaded = sum(kind == "host" for kind, _ in hits[kept:])
            self.prefix_cache.queries += seq.num_tokens
            self.prefix_cache.hits += seq.num_cached_tokens
            self.prefix_cache.offload_hits += loaded * bs - (1 if full and hits[-1][0] == "host" else 0)
        return copies

    # -- growing ------------------------------------------------------------------------------------------
    def _write_plan(self, seq: Sequence, num_new_tokens: int) -> tuple[list[int], int]:
        """(logical blocks to copy before writing, blocks to add) for computing num_new_tokens more tokens."""
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        table = seq.block_table
        last = min(len(table), self.blocks_needed(end))
        to_copy = [j for j in range(start // self.block_size, last) if not self.is_writable(table[j])]
        return to_copy, dispatch("ch05.blocks_to_append", blocks_to_append)(start, num_new_tokens, len(table),
                                                                           self.block_size)

    def num_blocks_to_append(self, seq: Sequence, num_new_tokens: int = 1) -> int:
        """Free blocks append_slots(seq, num_new_tokens) would consume: new blocks plus copy-on-write copies."""
        to_copy, new = self._write_plan(seq, num_new_tokens)
        return len(to_copy) + new

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        return self.num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def write_plan(self, seq: Sequence, num_new_tokens: int = 1) -> tuple[list[int], int]:
        """(logical blocks to copy, blocks to add) that append_slots(seq, num_new_tokens) would act on now; hand
        it to append_slots(plan=...) when nothing has changed in between (the scheduler's decide-then-append:
        one plan per sequence per step instead of two)."""
        return self._write_plan(seq, num_new_tokens)

    def append_slots(self, seq: Sequence, num_new_tokens: int = 1,
                     plan: tuple[list[int], int] | None = None) -> list[tuple[int, int]]:
        """Make seq's block table cover tokens up to num_computed_tokens + num_new_tokens, across block
        boundaries; shared or cached blocks in the written range are copied first. Returns (src, dst) copies.
        `plan`: this sequence's `write_plan` for the same num_new_tokens, made since the last change to it or to
        the pool (else it is made here)."""
        if seq.seq_id not in self._on_device:
            raise ValueError(f"sequence {seq.seq_id} holds no device blocks (allocate or swap it in first)")
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        self.mark_computed(seq)
        to_copy, new = plan if plan is not None else self._write_plan(seq, num_new_tokens)
        if len(to_copy) + new > self.num_free_blocks:
            raise RuntimeError(f"append_slots needs {len(to_copy) + new} free blocks, {self.num_free_blocks} are free")
        copies = []
        for j in to_copy:
            src, dst = seq.block_table[j], self._take_block()  # take before release: dst != src
            self._copy_block(src, dst, copies)
            seq.block_table[j] = dst
            self._release([src])
        for _ in range(new):
            seq.block_table.append(self._take_block())
        return copies

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Roll seq's block table back to the blocks its first num_tokens tokens need, releasing the rest.

        Speculative decoding reserves slots for k draft tokens; when only some are accepted, the blocks that
        held nothing but rejected drafts go back (a shared one just loses this table's reference). The K/V
        written for rejected drafts inside a kept block sit above num_computed_tokens: the next step
        overwrites them, and nothing above num_computed_tokens is ever offered to the prefix cache (see
        mark_computed), so a rejected token can never be cached. num_tokens may not cut computed tokens."""
        if seq.seq_id not in self._on_device:
            raise ValueError(f"sequence {seq.seq_id} holds no device blocks to truncate")
        if not seq.num_computed_tokens <= num_tokens <= len(seq.block_table) * self.block_size:
            raise ValueError(f"sequence {seq.seq_id}: can truncate to {seq.num_computed_tokens}.."
                             f"{len(seq.block_table) * self.block_size} tokens (computed .. slots held), "
                             f"got {num_tokens}")
        keep = self.blocks_needed(num_tokens)
        tail = seq.block_table[keep:]
        if tail:
            del seq.block_table[keep:]
            self._release(tail)

    def mark_computed(self, seq: Sequence) -> None:
        """Offer seq's full, computed blocks to the prefix cache (idempotent; cheap when nothing is new)."""
        if self.prefix_cache is None or seq.seq_id not in self._on_device:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        start = self._num_offered.get(seq.seq_id, 0)
        if num_full <= start:
            return
        keys = seq.cache_keys
        hashes = self._hashes[seq.seq_id] = chain_hashes(keys, self.block_size, num_full,
                                                         self._hashes.get(seq.seq_id), salt=seq.cache_salt)
        bs = self.block_size
        for j in range(max(start, num_released(seq.block_table)), num_full):  # (released ones: offered before)
            self.prefix_cache.insert(seq.block_table[j], hashes[j], hashes[j - 1] if j else seq.cache_salt,
                                     tuple(keys[j * bs:(j + 1) * bs]))
        self._num_offered[seq.seq_id] = num_full

    # -- sharing and freeing ------------------------------------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let child share all of parent's blocks (ref++); the caller gives child the parent's tokens.
        The first write into a shared block copies it (see append_slots)."""
        if parent.seq_id not in self._on_device:
            raise ValueError(f"parent sequence {parent.seq_id} holds no device blocks")
        if child.block_table or child.seq_id in self._on_device or child.seq_id in self._cpu_tables:
            raise ValueError(f"child sequence {child.seq_id} already holds blocks")
        n = parent.num_computed_tokens
        if child.token_ids[:n] != parent.token_ids[:n]:
            raise ValueError(f"child sequence {child.seq_id} must start with the parent's {n} computed tokens")
        child.block_table = list(parent.block_table)
        for block in held_blocks(child.block_table):
            self.ref_counts[block] += 1
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        self._on_device[child.seq_id] = child
        self._num_offered[child.seq_id] = self._num_offered.get(parent.seq_id, 0)
        self._hashes[child.seq_id] = list(self._hashes.get(parent.seq_id, []))

    def free(self, seq: Sequence) -> None:
        """Return all of seq's device and CPU blocks. Its computed full blocks stay in the prefix cache as
        evictable; they are released tail first, so eviction takes a prefix's end before its start."""
        if seq.seq_id in self._on_device:
            self.mark_computed(seq)
            self._release(held_blocks(seq.block_table))
            del self._on_device[seq.seq_id]
        self.free_cpu_block_ids.extend(held_blocks(self._cpu_tables.pop(seq.seq_id, [])))
        seq.block_table = []
        self._num_offered.pop(seq.seq_id, None)
        self._hashes.pop(seq.seq_id, None)

    # -- checking -----------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (used by tests after every operation)."""
        check_block_manager(self)
