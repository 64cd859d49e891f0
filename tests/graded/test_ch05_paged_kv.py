"""Graded tests of chapter 5: slot mapping through a block table, and the chained prefix-cache key."""
from __future__ import annotations

import random

import pytest
from minillm.course.checks import assert_rejects, graded_seed


@pytest.mark.exercise("ch05.slot_mapping")
@pytest.mark.points(1)
@pytest.mark.parametrize("block_size,n_blocks,start,end", [
    (16, 2, 15, 18),  # across one block boundary (the docstring's example)
    (16, 1, 0, 16),  # exactly one block
    (16, 2, 0, 17),  # one past a block
    (1, 7, 2, 7),  # every token its own block (from position 2: from 0 the answer would be the table itself)
    (3, 11, 4, 31),  # many boundaries, a non-power-of-two block size
])
def test_slot_mapping_matches_solution(impl, ref, block_size, n_blocks, start, end):
    rng = random.Random(graded_seed(block_size * 1000 + n_blocks))
    table = rng.sample(range(100), n_blocks)  # physical blocks in no particular order
    got = impl(list(table), start, end, block_size)
    want = ref(list(table), start, end, block_size)
    assert isinstance(got, list), f"slot_mapping returned {type(got).__name__}, expected a list of ints"
    assert got == want, (f"slot_mapping(block_table={table}, start={start}, end={end}, block_size={block_size}): "
                         f"got {got[:8]}{'...' if len(got) > 8 else ''}, expected {want[:8]}{'...' if len(want) > 8 else ''}")


@pytest.mark.exercise("ch05.slot_mapping")
@pytest.mark.points(3)
def test_slot_mapping_properties(impl):
    block_size, table = 4, [9, 0, 5]
    slots = impl(table, 0, 12, block_size)
    assert len(slots) == 12 and len(set(slots)) == 12, f"12 positions must get 12 distinct slots, got {slots}"
    for p, s in enumerate(slots):
        assert s // block_size == table[p // block_size], f"position {p} -> slot {s} is not in block {table[p // block_size]}"
        assert s % block_size == p % block_size, f"position {p} -> slot {s}: wrong offset inside the block"
    assert impl(table, 5, 9, block_size) == slots[5:9], "a sub-range must give the same slots as the full range"
    assert impl(table, 7, 7, block_size) == [], "an empty range (start == end) maps nothing"


@pytest.mark.exercise("ch05.slot_mapping")
@pytest.mark.points(2)
def test_slot_mapping_rejects_bad_ranges(impl, ref):
    valid = ([3, 4], 2, 7, 4)
    assert_rejects(impl, valid, ref(*valid), [([3, 4], 0, 9, 4), ([3], 2, 1, 4), ([3], -1, 2, 4)], "slot_mapping")


@pytest.mark.exercise("ch05.hash_block")
@pytest.mark.points(2)
def test_hash_block_matches_solution(impl, ref):
    rng = random.Random(graded_seed(5))
    parent = None
    for _ in range(6):  # a chain of blocks, each keyed on the previous key
        tokens = tuple(rng.randrange(49152) for _ in range(16))
        got, want = impl(parent, tokens), ref(parent, tokens)
        assert got == want, f"hash_block(parent={parent}, tokens={tokens[:4]}...): got {got}, expected {want}"
        parent = want


@pytest.mark.exercise("ch05.hash_block")
@pytest.mark.points(3)
def test_hash_block_properties(impl):
    a, b = (1, 2, 3, 4), (1, 2, 3, 5)
    assert isinstance(impl(None, a), int), "hash_block must return an int"
    assert impl(None, a) == impl(None, tuple(a)) == impl(None, list(a)), "the key must not depend on the sequence type"
    assert impl(None, a) != impl(None, b), "different tokens must give different keys"
    first = impl(None, a)
    assert impl(first, b) != impl(impl(None, b), b), "the same block after a different prefix needs a different key"
    assert impl(None, a) == impl(0, a), "the first block's parent counts as 0 (hash(None) is not stable across runs)"
