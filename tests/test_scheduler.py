"""The continuous-batching scheduler (chapter 6), driven by a fake model (minillm.engine.scheduler_sim).

The simulated engine checks, every step, that each scheduled sequence reads back the K/V of its own prefix
from every slot of its block table, and its fake "greedy" model makes the next token a function of the
prefix. So under preemption (recompute or swap), chunking and prefix caching the generated tokens must be
exactly those of an unconstrained run.
"""
from __future__ import annotations

import random

import pytest

from minillm.config import EngineConfig
from minillm.engine.block_manager import BlockManager
from minillm.engine.scheduler import Scheduler
from minillm.engine.scheduler_sim import SimulatedEngine
from minillm.engine.sequence import SequenceStatus

BLOCK = 16


@pytest.fixture
def make_engine():
    """Build simulated engines; at teardown nothing may be left unfinished or holding a block."""
    created: list[SimulatedEngine] = []

    def make(num_blocks: int = 256, num_cpu_blocks: int = 0, prefix_caching: bool = False, **config) -> SimulatedEngine:
        config.setdefault("max_model_len", 256)
        config.setdefault("max_num_batched_tokens", 256)
        config.setdefault("max_num_seqs", 64)
        cfg = EngineConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching, **config)
        bm = BlockManager(num_blocks, BLOCK, num_cpu_blocks=num_cpu_blocks, enable_prefix_caching=prefix_caching)
        engine = SimulatedEngine(Scheduler(cfg, bm))
        created.append(engine)
        return engine

    yield make
    for engine in created:
        bm = engine.scheduler.block_manager
        assert not engine.scheduler.has_unfinished()
        bm.check_invariants()
        assert bm.num_used_blocks == 0, f"{bm.num_used_blocks} device blocks leaked"
        assert bm.num_used_cpu_blocks == 0, f"{bm.num_used_cpu_blocks} CPU blocks leaked"


def workload(seed: int = 0, n: int = 40) -> list[tuple[list[int], int]]:
    """(prompt, max_tokens) pairs with awkward lengths and a shared system prompt on some."""
    rng = random.Random(seed)
    system = [rng.randrange(50) for _ in range(35)]
    out = []
    for i in range(n):
        own = [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
        out.append(((system if i % 3 == 0 else []) + own, rng.randrange(1, 30)))
    return out


def run(engine: SimulatedEngine, requests) -> dict[str, list[int]]:
    for prompt, max_tokens in requests:
        engine.add_request(prompt, max_tokens)
    finished = engine.run(max_steps=20_000)
    assert all(s.status == SequenceStatus.FINISHED for s in finished)
    return {s.request_id: s.output_token_ids for s in finished}


def blocks_for(requests) -> int:
    return sum(-(-(len(p) + m) // BLOCK) for p, m in requests)


def test_plenty_of_blocks_no_preemption(make_engine):
    requests = workload()
    engine = make_engine(num_blocks=blocks_for(requests) + 8, max_num_seqs=64)
    outputs = run(engine, requests)
    assert [len(outputs[f"req-{i + 1}"]) for i in range(len(requests))] == [m for _, m in requests]
    assert engine.scheduler.num_preemptions == 0
    assert max(r.num_running for r in engine.scheduler.timeline) > 20  # really batched


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_tiny_pool_preempts_and_still_gives_the_same_tokens(make_engine, mode, prefix_caching, chunked):
    requests = workload(seed=1)
    reference = run(make_engine(num_blocks=blocks_for(requests), max_num_seqs=64), requests)
    num_blocks = blocks_for(requests) // 10  # a tenth of what the batch needs
    assert num_blocks >= max(-(-(len(p) + m) // BLOCK) for p, m in requests) + 1  # each request alone fits
    engine = make_engine(num_blocks=num_blocks, num_cpu_blocks=4 * num_blocks, prefix_caching=prefix_caching,
                         preemption_mode=mode, max_num_seqs=64, enable_chunked_prefill=chunked,
                         max_num_batched_tokens=48 if chunked else 256)
    assert run(engine, requests) == reference
    sched = engine.scheduler
    assert sched.num_preemptions > 0
    swaps = sum(len(r.swapped_out) for r in sched.timeline)
    assert (swaps > 0) == (mode == "swap")
    if mode == "swap":
        assert sum(len(r.swapped_in) for r in sched.timeline) == swaps
    if prefix_caching:
        assert sched.block_manager.prefix_cache_hits > 0


def test_swap_falls_back_to_recompute_without_cpu_space(make_engine):
    requests = workload(seed=2, n=20)
    engine = make_engine(num_blocks=blocks_for(requests) // 8, num_cpu_blocks=0, preemption_mode="swap")
    run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    assert not any(r.swapped_out for r in engine.scheduler.timeline)


def test_recompute_preempted_sequence_hits_the_prefix_cache(make_engine):
    engine = make_engine(num_blocks=9, prefix_caching=True, max_num_seqs=8)
    old = engine.add_request(list(range(40)), max_tokens=60)  # grows to 7 blocks
    young = engine.add_request(list(range(100, 140)), max_tokens=40)  # preempted when both need a 5th block
    engine.run()
    assert young.num_preemptions >= 1 and old.num_preemptions == 0
    # the old one's growth evicted the young one's last blocks (LRU, tail first), not its first two
    assert young.num_cached_tokens == 32
    assert len(young.output_token_ids) == 40 and len(old.output_token_ids) == 60


def test_identical_prompt_later_computes_one_token(make_engine):
    engine = make_engine(prefix_caching=True)
    first = engine.add_request(list(range(48)), max_tokens=3)  # exactly 3 blocks
    engine.run()
    second = engine.add_request(list(range(48)), max_tokens=3)
    batch = engine.step()
    assert batch.num_new_tokens == [1] and second.num_cached_tokens == 47
    engine.run()
    assert second.output_token_ids == first.output_token_ids


def test_chunked_prefill_uses_the_budget_exactly(make_engine):
    budget = 37
    engine = make_engine(enable_chunked_prefill=True, max_num_batched_tokens=budget, max_num_seqs=16)
    for prompt, max_tokens in workload(seed=3, n=12):
        engine.add_request(prompt, max_tokens)
    sched = engine.scheduler
    mixed = split = 0
    while sched.has_unfinished():
        pending = sum(s.num_uncomputed_tokens for s in list(sched.waiting) + sched.running)
        batch = engine.step()
        assert batch.num_batched_tokens == min(budget, pending)
        kinds = {n == 1 and not s.is_prefill for s, n in zip(batch.seqs, batch.num_new_tokens)}
        mixed += kinds == {True, False}
        split += any(s.num_computed_tokens < s.num_prompt_tokens for s in batch.seqs)  # a prompt cut short
    assert mixed > 0 and split > 0


def test_without_chunking_prefills_are_whole_and_config_is_checked(make_engine):
    with pytest.raises(ValueError, match="max_num_batched_tokens=100 is smaller than max_model_len=256"):
        Scheduler(EngineConfig(max_model_len=256, max_num_batched_tokens=100, max_num_seqs=8), BlockManager(64, BLOCK))
    engine = make_engine(max_model_len=100, max_num_batched_tokens=100)
    for prompt, max_tokens in workload(seed=4, n=15):
        engine.add_request(prompt, max_tokens)
    while engine.scheduler.has_unfinished():
        batch = engine.step()
        assert batch.num_batched_tokens <= 100
        # every scheduled range reached the end of its sequence (a token was sampled): no partial prefill
        assert all(s.num_computed_tokens == s.num_tokens - 1 for s in batch.seqs)
    assert max(len(b.seqs) for b in engine.batches) > 1


def test_max_num_seqs_respected(make_engine):
    engine = make_engine(max_num_seqs=5)
    run(engine, workload(seed=5, n=20))
    assert max(len(r.scheduled) for r in engine.scheduler.timeline) == 5
    assert max(r.num_running for r in engine.scheduler.timeline) == 5


def test_swapped_sequences_return_before_new_admissions(make_engine):
    requests = workload(seed=6, n=30)
    engine = make_engine(num_blocks=blocks_for(requests) // 6, num_cpu_blocks=200, preemption_mode="swap",
                         max_num_seqs=6)
    for prompt, max_tokens in requests:
        engine.add_request(prompt, max_tokens)
    sched = engine.scheduler
    while sched.has_unfinished():
        never_ran = {s.seq_id for s in sched.waiting if s.first_scheduled_time is None}
        batch = engine.step()
        if sched.swapped or batch.preempted:
            assert not never_ran & {s.seq_id for s in batch.seqs}
        assert len(sched.running) <= 6  # swap-ins count against max_num_seqs too
    assert sum(len(r.swapped_in) for r in sched.timeline) > 0


def test_fcfs_admission_order_and_recompute_victims_go_first(make_engine):
    engine = make_engine(num_blocks=7, max_num_seqs=3)
    seqs = [engine.add_request(list(range(i, i + 20)), max_tokens=30) for i in range(7)]
    sched = engine.scheduler
    first_step: dict[int, int] = {}
    while sched.has_unfinished():
        batch = engine.step()
        for s in batch.seqs:
            first_step.setdefault(s.seq_id, sched.num_steps)
        # recompute victims are next in line, ahead of never-run requests, the earliest arrived first
        k = len(batch.preempted)
        assert list(sched.waiting)[:k] == batch.preempted[::-1]
    order = [first_step[s.seq_id] for s in seqs]
    assert order == sorted(order) and sched.num_preemptions > 0


def test_abort_frees_blocks_wherever_the_request_is(make_engine):
    engine = make_engine(num_blocks=12, num_cpu_blocks=40, preemption_mode="swap", max_num_seqs=4)
    seqs = [engine.add_request(list(range(i, i + 30)), max_tokens=40) for i in range(8)]
    sched = engine.scheduler
    while not sched.swapped:
        engine.step()
    for queue in (sched.waiting, sched.running, sched.swapped):
        victim = queue[-1]
        free_before = sched.num_free_blocks() + len(victim.block_table)
        assert sched.abort(victim.request_id) is victim
        assert victim.finish_reason == "abort" and victim.status == SequenceStatus.FINISHED
        assert victim.block_table == [] and sched.num_free_blocks() == free_before
        sched.block_manager.check_invariants()
    assert sched.abort("no-such-request") is None
    engine.run()
    done = [s for s in seqs if s.finish_reason == "length"]
    assert len(done) == 5 and all(len(s.output_token_ids) == 40 for s in done)


def test_impossible_request_is_rejected_and_others_finish(make_engine):
    engine = make_engine(num_blocks=10, max_model_len=512, max_num_batched_tokens=512)
    ok = [engine.add_request(list(range(20)), max_tokens=5) for _ in range(3)]
    huge = engine.add_request(list(range(300)), max_tokens=5)
    too_long = engine.add_request(list(range(20)), max_tokens=200)  # fits at first, then outgrows the pool
    finished = engine.run()
    assert huge.finish_reason == "error" and "needs 19 KV blocks" in huge.error and "10 blocks" in huge.error
    assert too_long.finish_reason == "error" and "needs 11 KV blocks" in too_long.error
    assert all(s.finish_reason == "length" and len(s.output_token_ids) == 5 for s in ok)
    assert huge in finished and too_long in finished
    assert any(huge.seq_id in r.rejected for r in engine.scheduler.timeline)


def test_prompt_longer_than_max_model_len_is_rejected(make_engine):
    engine = make_engine(max_model_len=64, max_num_batched_tokens=64)
    seq = engine.add_request(list(range(65)), max_tokens=1)
    engine.run()
    assert seq.finish_reason == "error" and "max_model_len=64" in seq.error


def test_priority_policy_orders_admission_and_preemption(make_engine):
    engine = make_engine(num_blocks=6, max_num_seqs=8, scheduling_policy="priority")
    low = engine.add_request(list(range(20)), max_tokens=40, priority=5)
    high = engine.add_request(list(range(50, 70)), max_tokens=40, priority=0)
    first = engine.step()
    assert first.seqs == [high, low]
    engine.run()
    assert low.num_preemptions > 0 and high.num_preemptions == 0
    assert high.finish_time < low.finish_time


def test_timeline_records_every_step(make_engine):
    engine = make_engine(num_blocks=20, max_num_seqs=8)
    run(engine, workload(seed=7, n=10))
    timeline = engine.scheduler.timeline
    assert [r.step for r in timeline] == list(range(1, len(timeline) + 1))
    assert all(a.time <= b.time for a, b in zip(timeline, timeline[1:]))
    assert sum(r.num_batched_tokens for r in timeline) == sum(sum(b.num_new_tokens) for b in engine.batches)
    preempted = [i for r in timeline for i in r.preempted]
    assert len(preempted) == engine.scheduler.num_preemptions > 0


def test_recompute_preemption_keeps_the_generated_tokens(make_engine):
    # A recompute-preempted sequence prefills its prompt AND its output again: tokens a client has seen are never
    # taken back (the fake model is deterministic, so the final outputs alone would not show a lost token).
    engine = make_engine(num_blocks=9, max_num_seqs=8)
    old = engine.add_request(list(range(40)), max_tokens=60)
    young = engine.add_request(list(range(100, 140)), max_tokens=40)
    seen: dict[int, list[int]] = {}
    while engine.scheduler.has_unfinished():
        engine.step()
        for seq in (old, young):
            before = seen.get(seq.seq_id, [])
            assert seq.output_token_ids[:len(before)] == before, f"{seq!r} lost generated tokens"
            seen[seq.seq_id] = list(seq.output_token_ids)
    assert young.num_preemptions >= 1 and len(young.output_token_ids) == 40


def test_blocks_computed_in_a_requests_last_step_are_cached(make_engine):
    # max_tokens=1: the request finishes in the step that computed its prompt, before any later schedule() offers
    # those blocks to the prefix cache; freeing it must offer them.
    engine = make_engine(prefix_caching=True)
    engine.add_request(list(range(48)), max_tokens=1)
    engine.run()
    second = engine.add_request(list(range(48)), max_tokens=1)
    assert engine.step().num_new_tokens == [1] and second.num_cached_tokens == 47
    engine.run()


def first_token_steps(engine: SimulatedEngine, requests) -> list[int]:
    """Run requests to the end; the step at which each one's first output token was sampled, in request order."""
    for i, (prompt, max_tokens) in enumerate(requests):
        engine.add_request(prompt, max_tokens, request_id=str(i))
    first: dict[str, int] = {}
    step = 0
    while engine.scheduler.has_unfinished():
        step += 1
        engine.step()
        for seq in engine.scheduler.running + engine.finished:
            if seq.output_token_ids:
                first.setdefault(seq.request_id, step)
    return [first[str(i)] for i in range(len(requests))]


def test_long_prefill_token_threshold_lets_short_prompts_in_beside_a_long_one(make_engine):
    long_prompt = [i % 50 for i in range(200)]
    requests = [(long_prompt, 4)] + [([7, i, 3, i + 1, 9, 2, i, 5, 1, 4], 4) for i in range(6)]
    plain = make_engine(enable_chunked_prefill=True, max_num_batched_tokens=64)
    capped = make_engine(enable_chunked_prefill=True, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    (long_before, *short_before), (long_after, *short_after) = (first_token_steps(plain, requests),
                                                               first_token_steps(capped, requests))
    # without the cap the long prompt takes every step's whole budget until its last 8 tokens: 4 steps
    assert long_before == 4 and min(short_before) == 4
    # with it the long prompt computes 16 a step (13 steps) and the short ones fill the rest of the budget
    assert short_after[:4] == [1] * 4 and max(short_after) <= 2 and long_after == 13
    for batch in capped.batches:
        assert max(batch.num_new_tokens) <= 16
    assert {s.request_id: s.output_token_ids for s in plain.finished} == \
        {s.request_id: s.output_token_ids for s in capped.finished}


def test_long_prefill_token_threshold_is_checked():
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be an integer >= 0, got -1"):
        EngineConfig(long_prefill_token_threshold=-1, enable_chunked_prefill=True)
    with pytest.raises(ValueError, match="long_prefill_token_threshold must be an integer >= 0, got True"):
        EngineConfig(long_prefill_token_threshold=True, enable_chunked_prefill=True)
    with pytest.raises(ValueError, match="long_prefill_token_threshold=64 cuts prompts into chunks: it needs "
                                         "enable_chunked_prefill=True"):
        EngineConfig(long_prefill_token_threshold=64)
