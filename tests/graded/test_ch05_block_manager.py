"""Graded tests of chapter 5's block bookkeeping: blocks to take when a sequence grows, references to drop
when it finishes. Each exercise is also run inside the scheduler and block manager (a model-free engine whose
shadow KV cache checks every read), where a wrong answer shows up as a wrong slot, a leak or a livelock."""
from __future__ import annotations

import random

import pytest

from minillm.config import EngineConfig
from minillm.course.overrides import use_overrides
from minillm.engine.block_manager import BlockManager
from minillm.engine.scheduler import Scheduler
from minillm.engine.scheduler_sim import SimulatedEngine
from minillm.course.checks import assert_rejects, graded_seed


def simulate(overrides: dict, num_blocks: int, block_size: int = 4, seed: int = 0, n: int = 10) -> tuple:
    """Run n requests of awkward lengths through a tiny pool (preemptions happen); (outputs, step plan, bm)."""
    cfg = EngineConfig(block_size=block_size, max_model_len=64, max_num_batched_tokens=64, max_num_seqs=6)
    bm = BlockManager(num_blocks, block_size)
    engine = SimulatedEngine(Scheduler(cfg, bm))
    rng = random.Random(graded_seed(seed))
    with use_overrides(overrides):
        for _ in range(n):
            engine.add_request([rng.randrange(50) for _ in range(rng.randrange(1, 19))], rng.randrange(1, 12))
        finished = engine.run(max_steps=3000)
    outputs = {s.request_id: (s.finish_reason, s.output_token_ids) for s in finished}
    name = {s.seq_id: s.request_id for s in finished}  # seq ids count up across runs; request ids repeat
    return outputs, [[(name[i], k) for i, k in r.scheduled] for r in engine.scheduler.timeline], bm


# -- blocks_to_append ---------------------------------------------------------------------------------------------
BLOCKS_TO_APPEND_CASES = [  # (num_tokens_now, num_new_tokens, num_blocks_held, block_size)
    (0, 1, 0, 16),  # a one-token prompt
    (0, 16, 0, 16),  # exactly one block
    (0, 17, 0, 16),  # one past a block
    (16, 1, 1, 16),  # a decode step crossing the boundary
    (15, 1, 1, 16),  # a decode step filling the last slot
    (5, 0, 1, 16),  # nothing new
    (3, 4, 3, 3),  # a chunk inside a prompt allocated whole: table already long enough
    (7, 30, 3, 7),  # many blocks, a non-power-of-two block size
    (1, 1, 0, 1),  # block_size 1: every token its own block
]


@pytest.mark.exercise("ch05.blocks_to_append")
@pytest.mark.points(2)
def test_blocks_to_append_matches_solution(impl, ref):
    for now, new, held, block_size in BLOCKS_TO_APPEND_CASES:
        got, want = impl(now, new, held, block_size), ref(now, new, held, block_size)
        assert got == want, (f"blocks_to_append(num_tokens_now={now}, num_new_tokens={new}, num_blocks_held={held}, "
                             f"block_size={block_size}): got {got}, expected {want}")


@pytest.mark.exercise("ch05.blocks_to_append")
@pytest.mark.points(2)
def test_blocks_to_append_properties(impl, ref):
    rng = random.Random(graded_seed(1))
    for _ in range(300):
        bs = rng.choice([1, 3, 4, 16])
        now, new = rng.randrange(0, 60), rng.randrange(0, 40)
        held = -(-now // bs) + rng.choice([0, 0, 1, 3])  # what a real table could hold
        k = impl(now, new, held, bs)
        assert isinstance(k, int) and k >= 0, f"blocks_to_append({now}, {new}, {held}, {bs}) = {k!r}: need an int >= 0"
        assert (held + k) * bs >= now + new, (f"after taking {k} blocks, {held + k} blocks of {bs} cannot hold "
                                              f"{now + new} tokens")
        if k > 0:
            assert (held + k - 1) * bs < now + new, f"blocks_to_append({now}, {new}, {held}, {bs}) = {k}: one too many"
    valid = (16, 1, 1, 16)
    assert_rejects(impl, valid, ref(*valid), [(-1, 1, 0, 16), (0, -1, 0, 16), (0, 1, -1, 16), (0, 1, 0, 0)],
                   "blocks_to_append")


@pytest.mark.exercise("ch05.blocks_to_append")
@pytest.mark.points(1)
def test_blocks_to_append_inside_the_engine(impl):
    want = simulate({}, num_blocks=12)
    got = simulate({"ch05.blocks_to_append": impl}, num_blocks=12)
    assert got[0] == want[0], "with your blocks_to_append the engine generated different tokens"
    assert got[1] == want[1], "with your blocks_to_append the scheduler made different decisions"


# -- free_blocks --------------------------------------------------------------------------------------------------
@pytest.mark.exercise("ch05.free_blocks")
@pytest.mark.points(2)
def test_free_blocks_matches_solution(impl, ref):
    for seed in range(6):
        check_free_blocks_case(impl, ref, random.Random(graded_seed(seed)))


def check_free_blocks_case(impl, ref, rng: random.Random) -> None:
    num_blocks = rng.randrange(4, 30)
    counts = [rng.randrange(0, 4) for _ in range(num_blocks)]
    held = [b for b in range(num_blocks) if counts[b] > 0]
    table = rng.sample(held, rng.randrange(0, len(held) + 1))  # physical blocks in no particular order
    got_counts, want_counts = list(counts), list(counts)
    got, want = impl(list(table), got_counts), ref(list(table), want_counts)
    assert got == want, f"free_blocks(block_table={table}, ref_counts={counts}): returned {got}, expected {want}"
    assert got_counts == want_counts, (f"free_blocks(block_table={table}): ref_counts became {got_counts}, "
                                       f"expected {want_counts}")


@pytest.mark.exercise("ch05.free_blocks")
@pytest.mark.points(2)
def test_free_blocks_properties(impl):
    counts = [0, 2, 1, 1, 3, 1]
    assert impl([5], counts) == [5] and counts[5] == 0, "the only holder of a block frees it"
    counts = [0, 2, 1, 1, 3, 0]
    assert impl([1, 2], counts) == [2], f"a block another table still holds (ref 2) is not free; counts {counts}"
    assert counts[:3] == [0, 1, 0], f"each block of the table loses exactly one reference; counts {counts}"
    counts = [1, 1, 1, 1]
    assert impl([0, 3, 1], counts) == [1, 3, 0], "blocks are released from the table's last block to its first"
    assert impl([], counts) == [], "an empty table frees nothing"
    for table in ([0, 1], [1, 2, 0]):  # block 1 is held by nobody: a double free, met first or last (tail first)
        counts = [1, 0, 1]
        try:
            impl(list(table), counts)
        except ValueError:
            pass
        else:
            raise AssertionError(f"free_blocks({table}, ref_counts=[1, 0, 1]) must raise ValueError: block 1 has no "
                                 "holder left (a double free)")
        assert counts == [1, 0, 1], (f"free_blocks({table}, ref_counts=[1, 0, 1]): a rejected double free must change "
                                     f"nothing, but the counts became {counts} (check every block before any "
                                     "decrement)")


@pytest.mark.exercise("ch05.free_blocks")
@pytest.mark.points(1)
def test_free_blocks_inside_the_engine(impl):
    want = simulate({}, num_blocks=12, seed=3)
    got = simulate({"ch05.free_blocks": impl}, num_blocks=12, seed=3)
    assert got[0] == want[0], "with your free_blocks the engine generated different tokens"
    assert got[2].num_used_blocks == 0, f"{got[2].num_used_blocks} blocks still held after every request finished"
    got[2].check_invariants()
