"""Graded tests of chapter 6: the scheduler's admit-or-preempt decision and the swap-out block pairs.

Besides direct checks, each exercise runs inside the continuous-batching scheduler driven by a model-free engine
(minillm.engine.scheduler_sim): its shadow KV cache checks that every sequence reads back its own prefix from
every slot, and its fake greedy model makes each token a function of the prefix, so preemption by swap or by
recompute must give exactly the tokens, and here the same step-by-step plan, as the reference scheduler."""
from __future__ import annotations

import itertools
import random

import pytest

from minillm.config import EngineConfig
from minillm.course.overrides import use_overrides
from minillm.engine.block_manager import BlockManager
from minillm.engine.scheduler import Scheduler
from minillm.engine.scheduler_sim import SimulatedEngine
from minillm.course.checks import assert_rejects, graded_seed


def simulate(overrides: dict, num_blocks: int, num_cpu_blocks: int = 0, mode: str = "recompute",
             chunked: bool = False, seed: int = 0, n: int = 10) -> tuple:
    """n requests of awkward lengths through a tiny pool of 4-token blocks: (outputs, step plans, scheduler)."""
    cfg = EngineConfig(block_size=4, max_model_len=64, max_num_batched_tokens=24 if chunked else 64, max_num_seqs=5,
                       preemption_mode=mode, enable_chunked_prefill=chunked)
    bm = BlockManager(num_blocks, 4, num_cpu_blocks=num_cpu_blocks, watermark=0.1)
    engine = SimulatedEngine(Scheduler(cfg, bm))
    rng = random.Random(graded_seed(seed))
    with use_overrides(overrides):
        for _ in range(n):
            engine.add_request([rng.randrange(50) for _ in range(rng.randrange(1, 23))], rng.randrange(1, 14))
        finished = engine.run(max_steps=3000)
    outputs = {s.request_id: (s.finish_reason, s.output_token_ids) for s in finished}
    name = {s.seq_id: s.request_id for s in finished}  # seq ids count up across runs; request ids repeat
    plan = [([(name[i], k) for i, k in r.scheduled], [name[i] for i in r.preempted],
             [name[i] for i in r.swapped_out], [name[i] for i in r.swapped_in]) for r in engine.scheduler.timeline]
    return outputs, plan, engine.scheduler


# -- admit_or_preempt ---------------------------------------------------------------------------------------------
@pytest.mark.exercise("ch06.admit_or_preempt")
@pytest.mark.points(4)
def test_admit_or_preempt_matches_solution(impl, ref):
    cases = itertools.product([True, False], [0, 1, 3, 4], [0, 3, 4, 7], [0, 1, 2], [0, 4, 5], [5])
    for running, needed, free, watermark, num_running, max_seqs in cases:
        args = (running, needed, free, watermark, num_running, max_seqs)
        got, want = impl(*args), ref(*args)
        assert got == want, (f"admit_or_preempt(is_running={running}, num_blocks_needed={needed}, "
                             f"num_free_blocks={free}, watermark_blocks={watermark}, num_running={num_running}, "
                             f"max_num_seqs={max_seqs}): got {got!r}, expected {want!r}")


@pytest.mark.exercise("ch06.admit_or_preempt")
@pytest.mark.points(2)
def test_admit_or_preempt_properties(impl):
    assert impl(True, 3, 3, 1, 4, 4) == "run", "a running sequence may take the very last free blocks"
    assert impl(True, 4, 3, 0, 1, 4) == "preempt", "a running sequence that does not fit needs a preemption"
    assert impl(True, 0, 0, 2, 1, 4) == "run", "a running sequence needing no block always runs"
    assert impl(False, 3, 4, 1, 0, 4) == "admit", "exactly the watermark left free is allowed"
    assert impl(False, 3, 3, 1, 0, 4) == "wait", "admitting must leave the watermark free"
    assert impl(False, 1, 100, 0, 4, 4) == "wait", "a full batch (num_running == max_num_seqs) admits nobody"
    for args in itertools.product([0, 2, 9], [0, 1, 9], [0, 1], [0, 3], [3]):
        answer = impl(False, *args)
        assert answer in ("admit", "wait"), f"a waiting sequence never preempts anyone; got {answer!r} for {args}"
    assert_rejects(impl, (False, 3, 4, 1, 0, 4), "admit",
                   [(True, -1, 3, 0, 0, 4), (False, 1, -1, 0, 0, 4), (False, 1, 3, -1, 0, 4), (False, 1, 3, 0, -1, 4),
                    (False, 1, 3, 0, 0, 0)], "admit_or_preempt")


@pytest.mark.exercise("ch06.admit_or_preempt")
@pytest.mark.points(2)
@pytest.mark.parametrize("mode,chunked", [("recompute", False), ("swap", True)])
def test_admit_or_preempt_inside_the_scheduler(impl, mode, chunked):
    for seed in range(7, 57):  # fresh inputs each run, but only a workload that really preempts tests preemption
        kwargs = dict(num_blocks=14, num_cpu_blocks=40, mode=mode, chunked=chunked, seed=seed)
        want = simulate({}, **kwargs)
        if want[2].num_preemptions > 0:
            break
    assert want[2].num_preemptions > 0, "the workload is meant to preempt (test setup)"
    got = simulate({"ch06.admit_or_preempt": impl}, **kwargs)
    assert got[0] == want[0], "with your admit_or_preempt the engine generated different tokens"
    first = next((i for i, (g, w) in enumerate(zip(got[1], want[1])) if g != w), None)
    assert first is None and len(got[1]) == len(want[1]), (
        f"with your admit_or_preempt the scheduler's plan differs from step {first}: "
        f"(scheduled, preempted, swapped out, swapped in) = {got[1][first] if first is not None else '...'}, "
        f"expected {want[1][first] if first is not None else '...'}")


# -- swap_out_mapping ---------------------------------------------------------------------------------------------
@pytest.mark.exercise("ch06.swap_out_mapping")
@pytest.mark.points(2)
def test_swap_out_mapping_matches_solution(impl, ref):
    for n_blocks, n_free in [(1, 1), (3, 7), (5, 5), (0, 2), (9, 12)]:  # exactly enough, plenty, nothing to move
        rng = random.Random(graded_seed(n_blocks * 10 + n_free))
        table = rng.sample(range(40), n_blocks)
        free = rng.sample(range(20), n_free)
        got, want = impl(list(table), list(free)), ref(list(table), list(free))
        assert [tuple(p) for p in got] == want, (f"swap_out_mapping(block_table={table}, free_cpu_blocks={free}): "
                                                 f"got {got}, expected {want}")


@pytest.mark.exercise("ch06.swap_out_mapping")
@pytest.mark.points(2)
def test_swap_out_mapping_properties(impl):
    table, free = [7, 2, 9, 4], [3, 0, 5, 1, 8]
    pairs = [tuple(p) for p in impl(table, free)]
    assert table == [7, 2, 9, 4] and free == [3, 0, 5, 1, 8], "the arguments must not be modified"
    assert [d for d, _ in pairs] == table, f"every device block, in table order, gets one pair; got {pairs}"
    cpu = [c for _, c in pairs]
    assert len(set(cpu)) == len(cpu) and set(cpu) <= set(free), f"distinct CPU blocks from the free list; got {pairs}"
    assert cpu == free[:4], f"CPU blocks come from the front of the free list, in order; got {cpu}"
    # not enough swap space: the sequence must be recomputed instead
    assert_rejects(impl, ([], [3]), [], [([1, 2, 3], [0, 1])], "swap_out_mapping")


@pytest.mark.exercise("ch06.swap_out_mapping")
@pytest.mark.points(1)
def test_swap_out_mapping_inside_the_engine(impl):
    for seed in range(5, 55):  # fresh inputs each run, but only a workload that really swaps tests swapping
        kwargs = dict(num_blocks=14, num_cpu_blocks=40, mode="swap", seed=seed)
        want = simulate({}, **kwargs)
        if sum(len(p[2]) for p in want[1]) > 0:
            break
    assert sum(len(p[2]) for p in want[1]) > 0, "the workload is meant to swap (test setup)"
    got = simulate({"ch06.swap_out_mapping": impl}, **kwargs)
    assert got[0] == want[0], "with your swap_out_mapping the swapped sequences came back with different K/V or tokens"
    assert got[2].block_manager.num_used_cpu_blocks == 0, "CPU blocks leaked"


# -- resolve_deferred_ids -------------------------------------------------------------------------------------------
def _deferred_case(gen, n: int, s: int) -> tuple:
    """n input ids, about half of them placeholders -(r + 1) for rows r of s previous tokens, in shuffled order
    (row r is not sequence r: batches change between steps)."""
    import torch
    previous = torch.randint(0, 50_000, (s,), generator=gen)
    ids = torch.randint(0, 50_000, (n,), generator=gen)
    rows = torch.randint(0, s, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < 0.5, -1 - rows, ids), previous


@pytest.mark.exercise("ch06.resolve_deferred_ids")
@pytest.mark.points(2)
def test_resolve_deferred_ids_matches_solution(impl, ref):
    import torch
    gen = torch.Generator().manual_seed(graded_seed(6))
    for n, s in ((1, 1), (5, 3), (16, 16), (17, 4), (64, 63)):
        ids, previous = _deferred_case(gen, n, s)
        got, want = ids.clone(), ids.clone()
        impl(got, previous.clone())
        ref(want, previous.clone())
        assert torch.equal(got, want), (f"input_ids {ids.tolist()}, previous_tokens {previous.tolist()}: got "
                                        f"{got.tolist()}, expected {want.tolist()} (in place)")


@pytest.mark.exercise("ch06.resolve_deferred_ids")
@pytest.mark.points(2)
def test_resolve_deferred_ids_properties(impl):
    """In place, through a view; real ids kept; a clear error without previous tokens. (Every call of yours, in
    every test, runs with the host reads of device values trapped: .tolist(), .item(), bool(), int(), ...)"""
    import torch
    buffer = torch.tensor([9, 9, 5, -1, 7, -3, 0, 9])  # the ids are a view of a larger buffer (the step's upload)
    impl(buffer[2:7], torch.tensor([40, 41, 42]))
    assert buffer.tolist() == [9, 9, 5, 40, 7, 42, 0, 9], \
        f"got {buffer.tolist()}: write into the view, and only there"
    stale = torch.tensor([5, -1, -5])  # row 4 of 3: the caller's bug; clamped to a valid row, not a crash
    impl(stale, torch.tensor([40, 41, 42]))
    assert stale[:2].tolist() == [5, 40] and int(stale[2]) in (40, 41, 42), \
        f"input_ids [5, -1, -5] with previous_tokens [40, 41, 42] became {stale.tolist()}: clamp the row"
    kept = torch.tensor([3, 0, 2])
    impl(kept, torch.tensor([8]))
    assert kept.tolist() == [3, 0, 2], \
        f"input_ids [3, 0, 2] with previous_tokens [8] became {kept.tolist()}: ids >= 0 are real tokens, keep them"
    assert_rejects(impl, (torch.tensor([3]), torch.tensor([8])), None,
                   [(torch.tensor([-1]), None), (torch.tensor([-1]), torch.tensor([], dtype=torch.int64))],
                   "resolve_deferred_ids")


@pytest.mark.exercise("ch06.resolve_deferred_ids")
@pytest.mark.points(1)
def test_resolve_deferred_ids_inside_the_async_engine(impl):
    """A tiny model under async scheduling on the CPU: with your gather, the tokens of synchronous steps."""
    import torch
    from minillm.engine.llm_engine import LLMEngine
    from minillm.sampling_params import SamplingParams
    from test_engine import tiny_config, tiny_model
    from tiny import ByteTokenizer
    config = tiny_config(max_position_embeddings=128)
    model = tiny_model(config, seed=graded_seed(8) % 1000)
    rng = random.Random(graded_seed(9))
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(1, 12))] for _ in range(5)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(2, 12)) for _ in prompts]

    def tokens(async_scheduling: bool) -> list:
        engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(
            max_model_len=64, max_num_seqs=3, block_size=4, num_kv_blocks=64, async_scheduling=async_scheduling))
        ids = [engine.add_request(None, p, s) for p, s in zip(prompts, params)]
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        return [done[i] for i in ids]

    want = tokens(False)
    with use_overrides({"ch06.resolve_deferred_ids": impl}):
        got = tokens(True)
    assert got == want, "with your gather the async engine's tokens differ from synchronous steps'"
