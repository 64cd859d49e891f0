"""The paged block manager and the prefix cache (chapter 5): pure bookkeeping, no model.

A ShadowKVCache (minillm.engine.scheduler_sim) stands in for the KV tensors: every slot holds the identity of
the prefix whose K/V it would hold, so the tests check what a sequence would actually *read*, not only counts.
"""
from __future__ import annotations

import random

import pytest

import minillm.engine.prefix_cache as prefix_cache_module
from minillm.engine.block_manager import BlockManager, slot_mapping
from minillm.engine.kv_waste import kv_memory_waste
from minillm.engine.prefix_cache import hash_block
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.scheduler_sim import ShadowKVCache, prefix_identities
from minillm.engine.sequence import Sequence
from minillm.sampling_params import SamplingParams


@pytest.fixture
def make_bm():
    """Build block managers; at teardown each must be consistent and hold no block (no leak)."""
    created: list[BlockManager] = []

    def make(num_blocks: int, block_size: int = 16, **kwargs) -> BlockManager:
        bm = BlockManager(num_blocks, block_size, **kwargs)
        created.append(bm)
        return bm

    yield make
    for bm in created:
        bm.check_invariants()
        assert bm.num_used_blocks == 0, f"{bm.num_used_blocks} device blocks leaked"
        assert bm.num_used_cpu_blocks == 0, f"{bm.num_used_cpu_blocks} CPU blocks leaked"


def new_seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams(max_tokens=4))


def compute(bm: BlockManager, kv: ShadowKVCache, seq: Sequence, n: int | None = None) -> None:
    """What a step does for one sequence: room for n tokens (default: all uncomputed), copies, write, read back."""
    n = seq.num_uncomputed_tokens if n is None else n
    copies = bm.append_slots(seq, n)
    kv.apply(ScheduledBatch(blocks_to_copy=copies))
    ids = prefix_identities(seq.token_ids)
    end = seq.num_computed_tokens + n
    kv.write(seq.block_table, seq.num_computed_tokens, end, ids)
    kv.check(seq, end, ids)
    seq.num_computed_tokens = end
    bm.mark_computed(seq)  # what the scheduler does at the start of the next step


# -- slot_mapping and hash_block -------------------------------------------------------------------------------
def test_slot_mapping_across_block_boundary():
    assert slot_mapping([7, 2], 15, 18, 16) == [7 * 16 + 15, 2 * 16 + 0, 2 * 16 + 1]
    assert slot_mapping([7, 2], 5, 5, 16) == []
    assert slot_mapping([4, 0, 9], 0, 7, 3) == [12, 13, 14, 0, 1, 2, 27]
    assert slot_mapping([5], 0, 1, 1) == [5]
    with pytest.raises(ValueError, match="block table has 2 blocks"):
        slot_mapping([7, 2], 30, 33, 16)
    with pytest.raises(ValueError, match="start"):
        slot_mapping([7, 2], 4, 3, 16)


def test_slot_mapping_is_a_bijection_onto_the_tables_blocks():
    rng = random.Random(5)
    for block_size in (1, 3, 16, 17):
        table = rng.sample(range(40), 6)
        slots = slot_mapping(table, 0, 6 * block_size, block_size)
        assert sorted(slots) == sorted(b * block_size + o for b in table for o in range(block_size))
        start, end = sorted(rng.sample(range(6 * block_size + 1), 2))
        assert slot_mapping(table, start, end, block_size) == slots[start:end]


def test_hash_block_chains_the_prefix():
    a = hash_block(None, (1, 2, 3))
    assert a == hash_block(None, (1, 2, 3)) == hash((0, (1, 2, 3)))
    assert hash_block(a, (4, 5, 6)) != hash_block(hash_block(None, (9, 2, 3)), (4, 5, 6))
    assert hash_block(None, (1, 2, 3)) != hash_block(None, (1, 2, 4))


# -- allocation, growth, copy-on-write ------------------------------------------------------------------------
def test_allocate_append_free_counts(make_bm):
    bm = make_bm(8, 4, watermark=0.0)
    kv = ShadowKVCache(8, 4)
    seq = new_seq(list(range(9)))  # 3 blocks: 4 + 4 + 1
    assert bm.can_allocate(seq)
    assert bm.allocate(seq) == []
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    compute(bm, kv, seq)
    for token in range(10, 14):  # decode 9..12: position 12 crosses into a 4th block
        seq.append_token(token)
        compute(bm, kv, seq, 1)
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 4
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_watermark_blocks_admission_but_not_growth(make_bm):
    bm = make_bm(10, 4, watermark=0.2)  # 2 blocks stay free for admissions
    first = new_seq(list(range(28)))  # 7 blocks: 10 - 7 = 3 >= 2
    assert bm.can_allocate(first)
    bm.allocate(first)
    assert not bm.can_allocate(new_seq(list(range(5))))  # 2 blocks would leave 1 < 2
    first.num_computed_tokens = 28
    first.append_token(1)
    assert bm.can_append(first, 1)  # growth may dip into the watermark
    bm.free(first)


def test_copy_on_write_after_fork(make_bm):
    bm = make_bm(6, 4)
    kv = ShadowKVCache(6, 4)
    parent = new_seq([1, 2, 3, 4, 5, 6])  # block 1 half full
    bm.allocate(parent)
    compute(bm, kv, parent)
    parent.append_token(7)
    child = new_seq(parent.token_ids)
    bm.fork(parent, child)
    assert child.block_table == parent.block_table
    assert [bm.ref_counts[b] for b in parent.block_table] == [2, 2]
    bm.check_invariants()
    child.token_ids[-1] = 8  # the child sampled a different token
    shared = child.block_table[1]
    copies = bm.append_slots(child, 1)
    assert len(copies) == 1 and copies[0][0] == shared and child.block_table[1] != shared
    assert child.block_table[0] == parent.block_table[0]  # the full block stays shared
    kv.apply(ScheduledBatch(blocks_to_copy=copies))
    compute(bm, kv, child, 1)
    compute(bm, kv, parent, 1)  # the parent's block 1 is its own again: written in place
    assert parent.block_table[1] == shared and bm.ref_counts[shared] == 1
    kv.check(parent, 7, prefix_identities(parent.token_ids))
    bm.free(parent)
    bm.free(child)


def test_swap_out_and_in_preserve_contents(make_bm):
    bm = make_bm(4, 4, num_cpu_blocks=3)
    kv = ShadowKVCache(4, 4, 3)
    seq = new_seq(list(range(10)))
    bm.allocate(seq)
    compute(bm, kv, seq)
    assert bm.can_swap_out(seq)
    out = bm.swap_out(seq)
    kv.apply(ScheduledBatch(blocks_to_swap_out=out))
    assert seq.block_table == [] and bm.num_free_blocks == 4 and bm.num_free_cpu_blocks == 0
    other = new_seq([9] * 16)  # scribbles over the device blocks meanwhile
    bm.allocate(other)
    compute(bm, kv, other)
    assert not bm.can_swap_in(seq)
    bm.free(other)
    assert bm.can_swap_in(seq, 1)
    kv.apply(ScheduledBatch(blocks_to_swap_in=bm.swap_in(seq)))
    kv.check(seq, 10, prefix_identities(seq.token_ids))
    bm.free(seq)


def test_bad_arguments_raise(make_bm):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="watermark"):
        BlockManager(4, 16, watermark=1.5)
    bm = make_bm(2, 4, watermark=0.0)
    big = new_seq(list(range(9)))
    assert not bm.can_allocate(big)
    with pytest.raises(RuntimeError, match="needs 3 free blocks"):
        bm.allocate(big)


# -- prefix caching -------------------------------------------------------------------------------------------
def test_fully_cached_prompt_recomputes_its_last_token(make_bm):
    bm = make_bm(8, 4, enable_prefix_caching=True)
    kv = ShadowKVCache(8, 4)
    prompt = list(range(100, 108))  # exactly 2 blocks
    a = new_seq(prompt)
    bm.allocate(a)
    compute(bm, kv, a)
    b = new_seq(prompt)
    copies = bm.allocate(b)
    assert b.num_computed_tokens == b.num_cached_tokens == 7  # the last token still runs, for its logits
    assert b.block_table[0] == a.block_table[0]  # shared read-only
    assert copies == [(a.block_table[1], b.block_table[1])]  # the block it writes into is a private copy
    kv.apply(ScheduledBatch(blocks_to_copy=copies))
    compute(bm, kv, b)
    assert bm.prefix_cache_hits == 7 and bm.prefix_cache_queries == 16
    bm.free(a)
    bm.free(b)


def test_reset_prefix_cache_forgets_every_block_and_keeps_the_ones_in_use(make_bm):
    """reset_prefix_cache: evictable blocks become free, a running sequence keeps its (now private) blocks and
    writes on correctly, and an identical prompt after the reset computes everything again."""
    bm = make_bm(8, 4, enable_prefix_caching=True)
    kv = ShadowKVCache(8, 4)
    prompt = list(range(100, 108))
    done, running = new_seq(prompt), new_seq(list(range(200, 208)))
    for seq in (done, running):
        bm.allocate(seq)
        compute(bm, kv, seq)
    bm.free(done)
    assert bm.prefix_cache.num_evictable == 2 and len(bm.prefix_cache.entries()) == 4
    free_before = len(bm.free_block_ids)
    assert bm.reset_prefix_cache()
    assert bm.prefix_cache.entries() == {} and bm.prefix_cache.num_evictable == 0
    assert len(bm.free_block_ids) == free_before + 2 and bm.num_used_blocks == 2
    again = new_seq(prompt)
    bm.allocate(again)
    assert again.num_computed_tokens == 0  # nothing cached survives
    compute(bm, kv, again)
    running.append_token(300)
    compute(bm, kv, running)  # its unregistered blocks are its own: it writes on
    bm.check_invariants()
    for seq in (again, running):
        bm.free(seq)
    assert not make_bm(4, 4).reset_prefix_cache()  # no prefix cache: nothing to reset


def test_partial_hit_and_only_computed_blocks_are_cached(make_bm):
    bm = make_bm(16, 4, enable_prefix_caching=True)
    kv = ShadowKVCache(16, 4)
    a = new_seq(list(range(10)))
    bm.allocate(a)
    early = new_seq(list(range(10)))
    assert bm.num_cached_tokens_on_allocate(early) == 0  # allocated but not computed: nothing to share yet
    compute(bm, kv, a, 6)  # blocks 0 computed, block 1 half
    b = new_seq(list(range(9)) + [55, 56])  # shares 9 tokens: 2 full blocks by content, 1 cached so far
    bm.allocate(b)
    assert b.num_computed_tokens == 4 and b.block_table[0] == a.block_table[0]
    compute(bm, kv, a)
    compute(bm, kv, b)
    c = new_seq(list(range(9)) + [77])  # a's second block is computed and cached by now
    bm.allocate(c)
    assert c.num_cached_tokens == 8  # now both of a's full blocks are cached
    compute(bm, kv, c)
    assert bm.prefix_cache_hits == 4 + 8
    assert bm.prefix_cache_queries == 10 + 11 + 10
    for s in (a, b, c):
        bm.free(s)


def test_hash_collision_is_a_miss_not_a_wrong_reuse(make_bm, monkeypatch):
    monkeypatch.setattr(prefix_cache_module, "hash_block", lambda parent_hash, token_ids: 42)
    bm = make_bm(8, 4, enable_prefix_caching=True)
    kv = ShadowKVCache(8, 4)
    a = new_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(a)
    compute(bm, kv, a)
    bm.free(a)
    b = new_seq([9, 9, 9, 9, 5, 6, 7, 8])  # same hash for every block, different tokens
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    compute(bm, kv, b)
    c = new_seq([1, 2, 3, 4, 9, 9, 9, 9])  # block 0 really matches; block 1 collides with block 0's entry
    bm.allocate(c)
    assert c.num_cached_tokens == 4
    compute(bm, kv, c)
    bm.free(b)
    bm.free(c)


def test_lru_evicts_least_recently_freed_tail_first(make_bm):
    bm = make_bm(4, 4, enable_prefix_caching=True, watermark=0.0)
    kv = ShadowKVCache(4, 4)
    a, b = new_seq(list(range(8))), new_seq(list(range(50, 58)))
    for s in (a, b):
        bm.allocate(s)
        compute(bm, kv, s)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.prefix_cache.evictable_blocks() == a_blocks[::-1] + b_blocks[::-1]
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 0
    c = new_seq([90, 91, 92])  # needs one fresh block: a's tail goes first
    bm.allocate(c)
    assert c.block_table == [a_blocks[1]]
    d = new_seq(list(range(8)))
    assert bm.num_cached_tokens_on_allocate(d) == 4  # a's head survived
    e = new_seq(list(range(50, 58)) + [1])
    bm.allocate(e)
    # evictable blocks came back into use, and the last evictable one became e's fresh block
    assert e.num_cached_tokens == 8 and e.block_table == b_blocks + [a_blocks[0]]
    assert bm.prefix_cache.evictable_blocks() == [] and bm.num_free_blocks == 0
    for s in (c, e):
        bm.free(s)


def test_recomputed_sequence_hits_its_own_blocks(make_bm):
    bm = make_bm(8, 4, enable_prefix_caching=True)
    kv = ShadowKVCache(8, 4)
    seq = new_seq(list(range(6)))
    bm.allocate(seq)
    compute(bm, kv, seq)
    for token in (40, 41, 42, 43):
        seq.append_token(token)
        compute(bm, kv, seq, 1)
    seq.append_token(44)  # 11 tokens, 10 computed
    bm.free(seq)  # preempted by recompute
    seq.num_computed_tokens = 0
    bm.allocate(seq)
    assert seq.num_computed_tokens == 8  # two full blocks of prompt + generated tokens come from the cache
    compute(bm, kv, seq)
    bm.free(seq)


# -- the randomized property test -----------------------------------------------------------------------------
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_random_operations_keep_invariants_and_contents(make_bm, prefix_caching):
    rng = random.Random(1234 + prefix_caching)
    block_size, num_blocks = 3, 23
    bm = make_bm(num_blocks, block_size, num_cpu_blocks=11, enable_prefix_caching=prefix_caching)
    kv = ShadowKVCache(num_blocks, block_size, 11)
    stems = [[rng.randrange(6) for _ in range(12)] for _ in range(3)]  # shared prefixes make cache hits
    on_device: list[Sequence] = []
    swapped: list[Sequence] = []
    weights = {"allocate": 3, "compute": 6, "fork": 1, "free": 3, "swap_out": 1, "swap_in": 3}
    counts = dict.fromkeys(weights, 0)
    for _ in range(2000):
        op = rng.choices(list(weights), list(weights.values()))[0]
        if op == "allocate":
            seq = new_seq(rng.choice(stems)[: rng.randrange(0, 13)] + [rng.randrange(6) for _ in range(rng.randrange(1, 5))])
            if bm.can_allocate(seq):
                kv.apply(ScheduledBatch(blocks_to_copy=bm.allocate(seq)))
                on_device.append(seq)
            else:
                continue
        elif not on_device and op != "swap_in" or op == "swap_in" and not swapped:
            continue
        elif op == "compute":
            seq = rng.choice(on_device)
            if seq.num_uncomputed_tokens == 0:
                seq.append_token(rng.randrange(6))
            n = rng.randint(1, seq.num_uncomputed_tokens)
            if not bm.can_append(seq, n):
                continue
            compute(bm, kv, seq, n)
        elif op == "fork":
            parent = rng.choice(on_device)
            child = new_seq(parent.token_ids)
            bm.fork(parent, child)
            on_device.append(child)
        elif op == "free":
            pool = rng.choice([p for p in (on_device, swapped) if p])
            bm.free(pool.pop(rng.randrange(len(pool))))
        elif op == "swap_out":
            seq = rng.choice(on_device)
            if not bm.can_swap_out(seq):
                continue
            kv.apply(ScheduledBatch(blocks_to_swap_out=bm.swap_out(seq)))
            on_device.remove(seq)
            swapped.append(seq)
        elif op == "swap_in":
            seq = rng.choice(swapped)
            if not bm.can_swap_in(seq):
                continue
            kv.apply(ScheduledBatch(blocks_to_swap_in=bm.swap_in(seq)))
            swapped.remove(seq)
            on_device.append(seq)
        counts[op] += 1
        bm.check_invariants()
        for seq in on_device:
            kv.check(seq, seq.num_computed_tokens, prefix_identities(seq.token_ids))
    assert all(c >= 25 for c in counts.values()), str(counts)  # every kind of operation really ran
    if prefix_caching:
        assert bm.prefix_cache_hits > 0
    for seq in on_device + swapped:
        bm.free(seq)


# -- memory waste ---------------------------------------------------------------------------------------------
def test_kv_memory_waste():
    w = kv_memory_waste([1, 16, 17], block_size=16, max_model_len=64)
    assert w["tokens"] == 34 and w["paged_blocks"] == 4 and w["paged_slots"] == 64
    assert w["paged_waste"] == 30 and w["contiguous_slots"] == 192 and w["contiguous_waste"] == 158
    assert w["paged_waste_fraction"] == pytest.approx(30 / 64)
    big = kv_memory_waste([100 + 37 * i for i in range(50)], 16, 4096)
    assert big["paged_waste"] <= 50 * 15 and big["contiguous_waste_fraction"] > 0.5
    assert kv_memory_waste([], 16, 64)["paged_waste_fraction"] == 0.0
    with pytest.raises(ValueError, match="max_model_len=64"):
        kv_memory_waste([65], 16, 64)


def test_swapped_in_blocks_are_offered_to_the_prefix_cache_again(make_bm):
    bm, kv = make_bm(4, block_size=4, num_cpu_blocks=4, enable_prefix_caching=True), ShadowKVCache(4, 4, 4)
    seq = new_seq(list(range(8)))
    bm.allocate(seq)
    compute(bm, kv, seq)  # two full computed blocks, cached
    bm.swap_out(seq)
    filler = new_seq(list(range(100, 116)))
    bm.allocate(filler)  # takes the whole pool: both cached blocks are evicted
    bm.free(filler)
    bm.swap_in(seq)  # fresh device blocks with the same contents: they are the cached copy now
    bm.mark_computed(seq)
    bm.free(seq)
    assert bm.num_cached_tokens_on_allocate(new_seq(list(range(8)))) == 7


def test_swapped_in_blocks_of_a_failed_step_are_never_offered(make_bm):
    """A step that fails may never have run its swap-in copies (engine/step_isolation.py): the fresh device blocks
    hold whatever they held before, so the request that ends in "error" must not leave them hit-able."""
    bm, kv = make_bm(4, block_size=4, num_cpu_blocks=4, enable_prefix_caching=True), ShadowKVCache(4, 4, 4)
    seq = new_seq(list(range(8)))
    bm.allocate(seq)
    compute(bm, kv, seq)
    bm.swap_out(seq)
    filler = new_seq(list(range(100, 116)))
    bm.allocate(filler)  # both cached blocks are evicted: only the swap-in could bring the prefix back
    bm.free(filler)
    mapping = bm.swap_in(seq)
    bm.forget_unfilled([], mapping)  # the step with these copies failed
    bm.free(seq)
    assert bm.num_cached_tokens_on_allocate(new_seq(list(range(8)))) == 0
    bm.check_invariants()
