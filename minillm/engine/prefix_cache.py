"""Prefix caching: reuse the KV blocks another request already computed for the same leading tokens (chapter 5).

Two requests that start with the same system prompt need the same keys and values for it, because a token's
K/V depend only on the tokens before it. So a *full* block can be named by its whole prefix: the chain hash

    h_0 = hash_block(None, tokens of block 0)
    h_j = hash_block(h_{j-1}, tokens of block j)

identifies "these block_size tokens, after exactly that prefix". The cache maps h_j -> physical block id.
A new request walks its prompt block by block and reuses blocks for as long as the chain hits.

Three rules keep it correct:
  * Only full blocks whose tokens are all *computed* (their K/V written) are ever registered. A partial
    block may still be written to, and a block scheduled but not yet run holds garbage.
  * A registered block is read-only: its hash is a promise about its content. Whoever needs to write into
    one (the last token of a fully cached prompt is recomputed to get logits) copies it first (copy-on-write).
  * A hash is a 64-bit summary, so two different prefixes can collide. Each entry keeps (parent_hash,
    token_ids) and a lookup compares them: a collision is a miss, never a wrong reuse.

Blocks nobody references any more stay registered and *evictable*: still hit-able until the allocator runs
out of never-used blocks and takes the least recently freed one (LRU); with EngineConfig.kv_offloading_size
its K/V go to a host tier first, where a later prompt still finds them (minillm/engine/offload_tier.py).
This module is the bookkeeping only (hash map, stored keys, LRU order, hit counters); minillm.engine.block_manager
owns reference counts.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

from minillm.hooks import dispatch


# >>> exercise ch05.hash_block
def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The prefix-cache key of one full KV block: a hash of (the previous block's key, this block's tokens).

    Chaining the parent's hash makes the key depend on *every* token before the block, not only on the
    block_size tokens inside it: the same 16 tokens after a different prefix have different keys and values,
    so they must get a different key. The first block has no parent (parent_hash is None).

    Use Python's built-in `hash` of the tuple (parent, tuple(token_ids)), with parent = 0 for the first block.
    token_ids may arrive as a tuple or a list of ints (a list is unhashable): the key must be the same for both.
    Why 0 and not None: before Python 3.12, hash(None) changes from one process to the next, and a cache
    key (and the numbers a notebook prints) should not. Ints and tuples of ints hash the same in every run.

    Example: hash_block(None, (1, 2)) == hash((0, (1, 2))).
    """
    # >>> solution
    parent = 0 if parent_hash is None else parent_hash
    return hash((parent, tuple(token_ids)))
    # <<< solution
# <<< exercise


def chain_hashes(token_ids: list[int], block_size: int, num_blocks: int,
                 known: list[int] | None = None, salt: int | None = None) -> list[int]:
    """Chain hashes of the first `num_blocks` full blocks of `token_ids`, extending the `known` prefix of them.
    `salt` (Sequence.cache_salt: a request's LoRA adapter and its cache_salt, sequence_salt) stands in as the
    first block's parent, so the same tokens under another adapter, whose keys and values differ, or with
    another salt get other keys."""
    hashes = list(known or [])[:num_blocks]
    hash_fn = dispatch("ch05.hash_block", hash_block)
    for j in range(len(hashes), num_blocks):
        parent = hashes[j - 1] if j else salt
        hashes.append(hash_fn(parent, tuple(token_ids[j * block_size:(j + 1) * block_size])))
    return hashes


def check_cache_salt(cache_salt: object) -> str | None:
    """vLLM's cache_salt: None, or a non-empty string (ValueError / TypeError otherwise)."""
    if cache_salt is None:
        return None
    if not isinstance(cache_salt, str):
        raise TypeError(f"cache_salt must be a non-empty string or None, got {type(cache_salt).__name__}: "
                        f"{cache_salt!r}")
    if not cache_salt:
        raise ValueError("cache_salt must be a non-empty string or None, got ''")
    return cache_salt


def sequence_salt(adapter_salt: int | None, cache_salt: str | None) -> int | None:
    """The first block's parent hash of a request (Sequence.cache_salt): its LoRA adapter's (LoRARequest.cache_salt)
    and its own cache_salt (vLLM's: tenants who must not learn from each other's cache hits, which a timing
    side channel would show, give different salts), both or either. A string's built-in hash changes from one
    process to the next, so the salt's digest is taken instead: the same salt, the same keys in every process."""
    if cache_salt is None:
        return adapter_salt
    digest = int.from_bytes(hashlib.blake2b(cache_salt.encode(), digest_size=8).digest(), "little")
    return digest if adapter_salt is None else hash((adapter_salt, digest))


class PrefixCache:
    """hash -> block map with stored keys, the LRU set of evictable (unreferenced) cached blocks, and counters.

    Counters are in *tokens*: `queries` adds each allocated sequence's length, `hits` the tokens it found in
    the cache (its num_cached_tokens), so hits / queries is the fraction of prefill work saved.
    """

    def __init__(self) -> None:
        self._block_of_hash: dict[int, int] = {}
        # block -> (its hash, parent hash, token ids): what a lookup compares, to survive hash collisions
        self._entry_of_block: dict[int, tuple[int, int | None, tuple[int, ...]]] = {}
        # cached blocks with reference count 0, least recently freed first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.hits = 0
        self.offload_hits = 0  # of hits, the tokens loaded back from the CPU tier (minillm.engine.offload_tier)
        self.queries = 0
        self.evictions = 0

    # -- lookup and registration --------------------------------------------------------------------------
    def lookup(self, block_hash: int, parent_hash: int | None, token_ids: tuple[int, ...]) -> int | None:
        """The cached block holding exactly these tokens after this parent, or None."""
        block = self._block_of_hash.get(block_hash)
        if block is None:
            return None
        _, stored_parent, stored_tokens = self._entry_of_block[block]
        if stored_parent != parent_hash or stored_tokens != token_ids:
            return None  # a hash collision: same 64 bits, different prefix
        return block

    def insert(self, block: int, block_hash: int, parent_hash: int | None, token_ids: tuple[int, ...]) -> bool:
        """Register a full, computed block. False (and nothing changes) when the hash is already taken, by an
        identical block computed by another sequence or by a colliding prefix: the first entry stays."""
        if block_hash in self._block_of_hash or block in self._entry_of_block:
            return False
        self._block_of_hash[block_hash] = block
        self._entry_of_block[block] = (block_hash, parent_hash, tuple(token_ids))
        return True

    def is_cached(self, block: int) -> bool:
        return block in self._entry_of_block

    def entries(self) -> dict[int, int]:
        """A copy of the hash -> block map (for invariant checks and notebooks)."""
        return dict(self._block_of_hash)

    def block_hash_of(self, block: int) -> int:
        return self._entry_of_block[block][0]

    # -- the evictable set --------------------------------------------------------------------------------
    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def evictable_blocks(self) -> list[int]:
        """Evictable blocks, the next victim first."""
        return list(self._evictable)

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def make_evictable(self, block: int) -> None:
        """A cached block's reference count dropped to 0: it becomes the most recently used evictable block."""
        self._evictable[block] = None

    def reuse(self, block: int) -> None:
        """A lookup hit an evictable block: it is referenced again, so it may not be evicted."""
        del self._evictable[block]

    def evict(self) -> int | None:
        """Take the least recently freed cached block out of the cache (forgetting its hash), or None."""
        victim = self.evict_entry()
        return None if victim is None else victim[0]

    def evict_entry(self) -> tuple[int, tuple[int, int | None, tuple[int, ...]]] | None:
        """`evict`, also returning what the block was registered as, (hash, parent hash, token ids): the CPU tier
        (minillm.engine.offload_tier) keeps the block's K/V under that name."""
        if not self._evictable:
            return None
        block, _ = self._evictable.popitem(last=False)
        entry = self._entry_of_block.pop(block)
        del self._block_of_hash[entry[0]]
        self.evictions += 1
        return block, entry

    def forget(self, block: int) -> None:
        """Unregister one block whose contents are not what its hash promises (a failed step may never have filled
        it); it leaves the evictable set too, so the caller frees it if nobody holds it."""
        entry = self._entry_of_block.pop(block, None)
        if entry is not None:
            del self._block_of_hash[entry[0]]
            self._evictable.pop(block, None)

    def reset(self) -> list[int]:
        """Forget every cached block (vLLM's reset_prefix_cache); return the evictable ones, now plain free
        blocks. Blocks still referenced stay with their sequences, no longer shareable; the counters stay."""
        freed = list(self._evictable)
        self._block_of_hash.clear()
        self._entry_of_block.clear()
        self._evictable.clear()
        return freed

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
