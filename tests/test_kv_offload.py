"""The prefix cache's CPU tier (EngineConfig.kv_offloading_size, minillm/engine/offload_tier.py): blocks evicted on
the device are kept in host memory and copied back for a prompt that hits them there.

Three levels: the block manager alone (LRU of the tier, collisions, reset, invariants), the model-free simulated
engine (minillm.engine.scheduler_sim: every slot a sequence reads must hold its own prefix's identity, so a copy
applied in the wrong order shows as a precise error), and the engine on a tiny random model in fp32, whose greedy
tokens and log-probs must equal those of an engine without prefix caching, synchronous and async, across a sleep,
and after a step that failed before its loads; a few random workloads of the differential stress test
(tests/test_engine_stress.py, which draws the tier in half its prefix-caching scenarios) with the tier forced on.
"""
from __future__ import annotations

import math
import os
import random

import pytest

import minillm.engine.prefix_cache as prefix_cache_module
from minillm.config import EngineConfig
from minillm.engine.block_manager import BlockManager
from minillm.engine.block_window import NULL_BLOCK
from minillm.engine.disagg_engine import check_disaggregation
from minillm.engine.scheduler import Scheduler
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.scheduler_sim import ShadowKVCache, SimulatedEngine, prefix_identities
from minillm.engine.sequence import Sequence
from minillm.sampling_params import SamplingParams
from test_engine import make_engine, model_and_config  # noqa: F401  (fixture)
from test_engine_stress import (build_engine, draw_offloading, draw_scenario, head_dirs, reference,  # noqa: F401
                                run_scenario)
from tiny import one_thread, run_to_completion  # noqa: F401  (one_thread: autouse fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
TINY_BLOCK_BYTES = 2 * 2 * 2 * 8 * 4  # per token slot: layers x (K, V) x kv heads x head_dim x fp32 (tiny_config)


def gib_for(num_blocks: int, block_size: int) -> float:
    """kv_offloading_size (GiB) that holds exactly num_blocks blocks of the tiny model in fp32."""
    return num_blocks * TINY_BLOCK_BYTES * block_size / 2**30


def new_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(max_tokens=4))


def run_alone(bm: BlockManager, kv: ShadowKVCache, seq: Sequence) -> list:
    """Allocate seq, apply the step's block operations in the runner's order, compute its prompt and read it back;
    returns the step's batch (its copies)."""
    copies = bm.allocate(seq)
    stores, loads = bm.take_offload_copies()
    batch = ScheduledBatch(blocks_to_copy=copies, blocks_to_offload=stores, blocks_to_onload=loads)
    kv.apply(batch)
    ids = prefix_identities(seq.token_ids)
    kv.write(seq.block_table, seq.num_computed_tokens, seq.num_tokens, ids)
    kv.check(seq, seq.num_tokens, ids)
    seq.num_computed_tokens = seq.num_tokens
    bm.check_invariants()
    return batch


# -- the block manager ------------------------------------------------------------------------------------------
def test_an_evicted_prefix_comes_back_from_the_tier():
    bm = BlockManager(4, 4, enable_prefix_caching=True, num_offload_blocks=8)
    kv = ShadowKVCache(4, 4, num_offload_blocks=8)
    a = new_seq(list(range(12)) + [99])  # 3 full blocks + 1
    run_alone(bm, kv, a)
    bm.free(a)
    b = new_seq(list(range(50, 66)))  # takes all 4 blocks: a's 3 cached ones are evicted, to the tier
    batch = run_alone(bm, kv, b)
    assert len(batch.blocks_to_offload) == 3 and bm.offload.num_stored == 3
    bm.free(b)
    again = new_seq(list(range(12)) + [7, 8])
    batch = run_alone(bm, kv, again)  # b's 4 cached blocks: 3 evicted for the loads (stored in the same step)
    assert again.num_cached_tokens == 12 and bm.offload_hits == 12 and bm.prefix_cache_hits == 12
    assert len(batch.blocks_to_onload) == 3
    stored_now = {dev for dev, _ in batch.blocks_to_offload}
    assert stored_now & {dev for _, dev in batch.blocks_to_onload}, "no block was stored and loaded in one step"
    bm.free(again)
    bm.check_invariants()


def test_a_fully_cached_prompt_from_the_tier_recomputes_its_last_token_in_a_private_block():
    bm = BlockManager(2, 4, enable_prefix_caching=True, num_offload_blocks=4)
    kv = ShadowKVCache(2, 4, num_offload_blocks=4)
    a = new_seq([1, 2, 3, 4, 5, 6, 7, 8])
    run_alone(bm, kv, a)
    bm.free(a)
    b = new_seq([9, 9, 9, 9, 8, 8, 8, 8])
    run_alone(bm, kv, b)
    bm.free(b)
    c = new_seq([1, 2, 3, 4, 5, 6, 7, 8])
    run_alone(bm, kv, c)
    assert c.num_cached_tokens == 7 and bm.offload_hits == 7
    assert not bm.prefix_cache.is_cached(c.block_table[1])  # written again: not vouched for by a hash yet
    bm.free(c)


def test_a_copy_of_a_block_loaded_in_the_same_step_is_a_second_load():
    """Two identical prompts admitted in one step after their prefix went to the tier: the first loads it, the
    second hits those (not yet filled) device blocks, and the copy of its last block must come from the host."""
    bm = BlockManager(4, 4, enable_prefix_caching=True, num_offload_blocks=4)
    kv = ShadowKVCache(4, 4, num_offload_blocks=4)
    a = new_seq([1, 2, 3, 4, 5, 6, 7, 8])
    run_alone(bm, kv, a)
    bm.free(a)
    b = new_seq(list(range(20, 36)))
    run_alone(bm, kv, b)
    bm.free(b)
    first, second = new_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "first"), new_seq([1, 2, 3, 4, 5, 6, 7, 8], "second")
    copies = bm.allocate(first) + bm.allocate(second)
    stores, loads = bm.take_offload_copies()
    assert not copies and len(loads) == 3  # first's 2 loads, and second's last block filled from the host too
    kv.apply(ScheduledBatch(blocks_to_copy=copies, blocks_to_offload=stores, blocks_to_onload=loads))
    for seq in (first, second):
        ids = prefix_identities(seq.token_ids)
        kv.write(seq.block_table, seq.num_computed_tokens, seq.num_tokens, ids)
        kv.check(seq, seq.num_tokens, ids)
    bm.check_invariants()
    bm.free(first)
    bm.free(second)


def test_the_tier_evicts_its_least_recently_used_entry_when_full():
    bm = BlockManager(2, 4, enable_prefix_caching=True, num_offload_blocks=2)
    kv = ShadowKVCache(2, 4, num_offload_blocks=2)
    prompts = [[p] * 4 + [p + 1] * 4 for p in (10, 20, 30)]  # two blocks each: each evicts the one before
    for prompt in prompts:
        seq = new_seq(prompt)
        run_alone(bm, kv, seq)
        bm.free(seq)
    assert bm.offload.num_stored == 2 and bm.offload.evictions == 2  # the first prompt's blocks are gone
    seq = new_seq(prompts[1])  # all in the tier (its last token recomputed)
    run_alone(bm, kv, seq)
    assert seq.num_cached_tokens == 7 and bm.offload_hits == 7
    assert bm.offload.dropped == 2  # prompts[2]'s blocks evicted for it found both host blocks pinned by its loads
    bm.free(seq)
    seq = new_seq(prompts[0])
    run_alone(bm, kv, seq)
    assert seq.num_cached_tokens == 0
    bm.free(seq)


def test_a_colliding_tier_entry_is_a_miss(monkeypatch):
    monkeypatch.setattr(prefix_cache_module, "hash_block", lambda parent_hash, token_ids: 42)
    bm = BlockManager(2, 4, enable_prefix_caching=True, num_offload_blocks=2)
    kv = ShadowKVCache(2, 4, num_offload_blocks=2)
    a = new_seq([1, 2, 3, 4])
    run_alone(bm, kv, a)
    bm.free(a)
    b = new_seq([5, 6, 7, 8, 5, 6, 7])  # takes both device blocks: a's goes to the tier under hash 42
    run_alone(bm, kv, b)
    bm.free(b)
    assert bm.offload.num_stored == 1
    c = new_seq([9, 9, 9, 9, 1])  # hash 42 in both tiers, other tokens: must get neither a's K/V nor b's
    run_alone(bm, kv, c)
    assert c.num_cached_tokens == 0 and bm.offload_hits == 0
    bm.free(c)


def test_reset_empties_the_tier_unless_asked_to_keep_it():
    bm = BlockManager(2, 4, enable_prefix_caching=True, num_offload_blocks=2)
    kv = ShadowKVCache(2, 4, num_offload_blocks=2)
    for prompt in (list(range(1, 9)), list(range(11, 19))):
        seq = new_seq(prompt)
        run_alone(bm, kv, seq)
        bm.free(seq)
    assert bm.reset_prefix_cache(keep_offloaded=True) and bm.offload.num_stored == 2  # (sleep mode's reset)
    assert bm.prefix_cache.entries() == {}
    assert bm.reset_prefix_cache() and bm.offload.num_stored == 0
    bm.check_invariants()
    seq = new_seq(list(range(1, 9)))
    run_alone(bm, kv, seq)
    assert seq.num_cached_tokens == 0
    bm.free(seq)


@pytest.mark.parametrize("seed", range(50))
def test_random_workloads_read_only_their_own_keys_and_values(seed):
    """Model-free (about 20 ms a seed): tight pools, a few shared prefixes over a 5-token vocabulary (identical
    prompts in one step), swap and recompute preemption, chunked prefill, speculative drafts; every read checked
    after every step (SimulatedEngine), every invariant too. Without the second load of _copy_block seed 46 fails,
    without the tier's pins seed 1."""
    rng = random.Random(seed)
    block, blocks = rng.choice([2, 4]), rng.randint(8, 20)
    config = EngineConfig(max_model_len=40, max_num_batched_tokens=rng.choice([3, 8, 40]),
                          max_num_seqs=rng.randint(1, 5), block_size=block, enable_prefix_caching=True,
                          enable_chunked_prefill=True, preemption_mode=rng.choice(["recompute", "swap"]))
    bm = BlockManager(blocks, block, num_cpu_blocks=rng.choice([0, 4, 16]), enable_prefix_caching=True,
                      num_offload_blocks=rng.choice([1, 2, 3, 12, 40]))
    drafts = random.Random(seed)
    propose = (lambda seq: [drafts.randrange(5) for _ in range(drafts.randint(0, 3))]) if rng.random() < 0.3 else None
    engine = SimulatedEngine(Scheduler(config, bm), vocab_size=5, propose=propose)
    prefixes = [[rng.randrange(5) for _ in range(rng.randint(4, 20))] for _ in range(rng.randint(2, 8))]
    for _ in range(40):
        prompt = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randint(0, 6))]
        engine.add_request(prompt[:30], max_tokens=rng.randint(1, 8))
    engine.run(max_steps=5000)
    assert bm.offload.stores > 0 and bm.num_used_blocks == 0


def test_a_window_hit_takes_each_block_from_the_device_or_the_tier():
    """Under a sliding window a finished sequence's oldest blocks were released first, so they go to the tier
    first; a prompt with its prefix then hits every block its window sees, some still on the device, some in the
    tier (loaded), and none before the window."""
    bm = BlockManager(16, 4, sliding_window=17, enable_prefix_caching=True, num_offload_blocks=16)
    kv = ShadowKVCache(16, 4, num_offload_blocks=16)
    first = new_seq(list(range(100, 140)), "first")
    ids = prefix_identities(first.token_ids)
    for start in range(0, 40, 8):  # chunks of 8; the blocks before the window go back as it slides
        if start:
            bm.release_out_of_window(first)
        copies = bm.append_slots(first, 8) if start else bm.allocate(first, 8)
        stores, loads = bm.take_offload_copies()
        kv.apply(ScheduledBatch(blocks_to_copy=copies, blocks_to_offload=stores, blocks_to_onload=loads))
        kv.write(first.block_table, start, start + 8, ids)
        first.num_computed_tokens = start + 8
        bm.check_invariants()
    bm.free(first)  # its 10 full blocks cached: 0-5 released while it ran, then 6-9 (tail first)
    other = new_seq(list(range(500, 548)), "other")  # 12 blocks: the 6 free ones, then 6 of first's, to the tier
    run_alone(bm, kv, other)
    bm.free(other)
    assert bm.offload.num_stored == 6
    hits, _ = bm._match_prefix(new_seq(first.token_ids + [7, 8]))
    assert [kind for kind, _ in hits[6:]] == ["device", "device", "host", "host"]
    again = new_seq(first.token_ids + [7, 8], "again")
    assert bm.num_cached_tokens_on_allocate(again) == 40
    copies = bm.allocate(again, 2)
    stores, loads = bm.take_offload_copies()
    kept = (40 - 17 + 1) // 4  # the window of the query at position 40 starts in block 6
    assert again.block_table[:kept] == [NULL_BLOCK] * kept and len(again.block_table) == 11
    assert again.num_computed_tokens == 40 and len(loads) == 2 and bm.offload_hits == 8
    kv.apply(ScheduledBatch(blocks_to_copy=copies, blocks_to_offload=stores, blocks_to_onload=loads))
    ids = prefix_identities(again.token_ids)
    kv.write(again.block_table, 40, 42, ids)
    kv.check(again, 42, ids, start=40 - 17 + 1)
    bm.check_invariants()
    bm.free(again)


@pytest.mark.parametrize("seed", range(30))
def test_random_sliding_window_workloads_with_the_tier_read_only_their_own_keys_and_values(seed):
    """As above with a sliding window in every layer: blocks given back as sequences slide, window hits from the
    device and the tier mixed, every read from each step's first window key checked (SimulatedEngine)."""
    rng = random.Random(seed)
    block, window = rng.choice([2, 4]), rng.randint(3, 12)
    config = EngineConfig(max_model_len=40, max_num_batched_tokens=rng.choice([3, 8, 40]),
                          max_num_seqs=rng.randint(1, 5), block_size=block, enable_prefix_caching=True,
                          enable_chunked_prefill=True, preemption_mode=rng.choice(["recompute", "swap"]))
    bm = BlockManager(rng.randint(10, 24), block, num_cpu_blocks=rng.choice([0, 16]), enable_prefix_caching=True,
                      num_offload_blocks=rng.choice([2, 12, 40]), sliding_window=window)
    engine = SimulatedEngine(Scheduler(config, bm), vocab_size=5)
    prefixes = [[rng.randrange(5) for _ in range(rng.randint(8, 30))] for _ in range(rng.randint(2, 6))]
    for _ in range(30):
        prompt = rng.choice(prefixes) + [rng.randrange(5) for _ in range(rng.randint(0, 6))]
        engine.add_request(prompt[:34], max_tokens=rng.randint(1, 6))
    engine.run(max_steps=5000)
    assert bm.num_used_blocks == 0


# -- configuration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [-1.0, math.nan, math.inf, True, "1"])
def test_a_bad_size_is_named(size):
    with pytest.raises(ValueError, match=r"kv_offloading_size must be None or a finite number of GiB >= 0, got"):
        EngineConfig(kv_offloading_size=size, enable_prefix_caching=True)


def test_the_tier_needs_prefix_caching_and_paged_blocks():
    with pytest.raises(ValueError, match=r"kv_offloading_size=1 GiB .* needs enable_prefix_caching=True"):
        EngineConfig(kv_offloading_size=1)
    with pytest.raises(ValueError, match=r"kv_offloading_size=1 needs the paged KV layout"):
        EngineConfig(kv_offloading_size=1, enable_prefix_caching=True, kv_layout="contiguous")
    with pytest.raises(ValueError, match=r"num_offload_blocks=2 needs enable_prefix_caching=True"):
        BlockManager(4, 4, num_offload_blocks=2)
    with pytest.raises(ValueError, match=r"kv_offloading_size=.* not supported with disaggregation"):
        check_disaggregation(EngineConfig(kv_offloading_size=1, enable_prefix_caching=True,
                                          async_scheduling=False))
    EngineConfig(kv_offloading_size=0)  # 0 is off, with or without prefix caching


def test_a_tier_too_small_for_one_block_is_refused(model_and_config):  # noqa: F811
    with pytest.raises(ValueError, match=r"holds no block of this model's KV cache \(4096 bytes per block"):
        make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=16, num_kv_blocks=8,
                    enable_prefix_caching=True, kv_offloading_size=1e-9)


# -- the engine -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_engine_outputs_with_the_tier_equal_those_without_prefix_caching(model_and_config,  # noqa: F811
                                                                        async_scheduling):
    """A pool of 10 blocks of 4 (one request at a time): the first prompt's blocks are evicted by the next two, so
    its second run finds its prefix in the tier; the step that loads it also stores the blocks it evicts for the
    loads, the third prompt's, which the fifth then loads (in a runner that loaded before storing, they would hold
    the first prompt's K/V: its log-probs show it)."""
    rng = random.Random(0)
    first = [rng.randrange(256) for _ in range(24)]
    third = [rng.randrange(256) for _ in range(24)]
    # the fourth finds the first's prefix in the tier; the fifth the third's, which the fourth's step stored
    prompts = [first, [rng.randrange(256) for _ in range(24)], third, first + [5], third + [6]]
    common = dict(scheduling="continuous", kv_layout="paged", block_size=4, max_model_len=32, max_num_seqs=1,
                  async_scheduling=async_scheduling)
    plain = make_engine(model_and_config, num_kv_blocks=10, **common)
    engine = make_engine(model_and_config, num_kv_blocks=10, enable_prefix_caching=True,
                         kv_offloading_size=gib_for(16, 4), **common)
    bm = engine.scheduler.block_manager
    assert engine.cache_config.num_offload_blocks == 16 and bm.num_offload_blocks == 16
    batches = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: batches.append(schedule()) or batches[-1]

    def run(llm_engine, prompt):  # greedy tokens and each one's log-prob, stepping with invariant checks
        request_id = llm_engine.add_request(None, prompt, GREEDY)
        while llm_engine.has_unfinished_requests():
            for out in llm_engine.step():
                if out.finished and out.request_id == request_id:
                    done = out.outputs[0]
            llm_engine.scheduler.block_manager.check_invariants()
        return done.token_ids, [lp[t].logprob for t, lp in zip(done.token_ids, done.logprobs)]

    for prompt in prompts:  # one after another: each evicts what the one before cached
        (tokens, logprobs), (want, want_logprobs) = run(engine, prompt), run(plain, prompt)
        assert tokens == want and logprobs == pytest.approx(want_logprobs, abs=1e-4)
    assert bm.offload_hits == 36 and bm.prefix_cache_hits == 48  # the fourth prompt's 6 blocks, the fifth's last 3
    assert any({d for d, _ in b.blocks_to_offload} & {d for _, d in b.blocks_to_onload} for b in batches), \
        "no step stored a block and loaded another prefix into it"


# -- random workloads against requests run alone ----------------------------------------------------------------
# seeds whose scenario loads blocks from the tier, 5 to 15 of them (about one scenario in four loads any; 200 seeds
# clean on 2026-12-06)
SEEDS = [0, 31, 40, 55, 82, 146]


@pytest.mark.parametrize("seed", range(int(os.environ["MINILLM_OFFLOAD_STRESS_SEEDS"]))
                         if "MINILLM_OFFLOAD_STRESS_SEEDS" in os.environ else SEEDS)
def test_random_engine_workloads_with_the_tier_match_requests_run_alone(model_and_config, head_dirs,  # noqa: F811
                                                                       reference, seed):  # noqa: F811
    """tests/test_engine_stress.py's scenarios (chunked prefill, swap, async scheduling, speculation, fp8, poisoned
    requests, as each seed draws them) with prefix caching and the tier forced on (draw_offloading), judged by the
    same differential checks. A longer hunt: MINILLM_OFFLOAD_STRESS_SEEDS=300."""
    scenario = draw_scenario(seed, reference, lora=False)
    scenario.options["enable_prefix_caching"] = True
    draw_offloading(random.Random(f"forced offload {seed}"), scenario.options, reference.config, always=True)
    engine = build_engine(model_and_config, head_dirs, scenario)
    run_scenario(engine, scenario, reference)


def test_llm_and_serve_take_the_option():
    import argparse

    from minillm.llm import _engine_config
    from minillm.serve.cli import add_engine_flags, engine_options
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    options = engine_options(parser.parse_args(["--kv-offloading-size", "2.5", "--enable-prefix-caching"]))
    assert options == {"kv_offloading_size": 2.5, "enable_prefix_caching": True}
    assert _engine_config(None, None, None, None, options).kv_offloading_size == 2.5


def test_sleep_keeps_the_tier_and_a_reset_empties_it(model_and_config):  # noqa: F811
    """Sleep drops the device pool (and its cached blocks) but not the host copies, computed with the weights the
    engine wakes with: the prefix comes back from the tier after wake_up. reset_prefix_cache (as update_weights and
    reload_weights call it) empties the tier too."""
    rng = random.Random(1)
    prompts = [[rng.randrange(256) for _ in range(24)] for _ in range(3)]
    common = dict(scheduling="continuous", kv_layout="paged", block_size=4, max_model_len=32, max_num_seqs=1,
                  num_kv_blocks=10)
    plain = make_engine(model_and_config, **common)
    engine = make_engine(model_and_config, enable_prefix_caching=True, kv_offloading_size=gib_for(16, 4), **common)
    bm = engine.scheduler.block_manager
    for prompt in prompts:
        run_to_completion(engine, [prompt], GREEDY)
    stored = bm.offload.num_stored
    assert stored >= 6
    engine.sleep(level=1)
    assert bm.prefix_cache.entries() == {} and bm.offload.num_stored == stored
    engine.wake_up()
    again = prompts[0] + [5]
    assert run_to_completion(engine, [again], GREEDY) == run_to_completion(plain, [again], GREEDY)
    assert bm.offload_hits == 24
    assert engine.reset_prefix_cache() and bm.offload.num_stored == 0
    bm.check_invariants()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_step_that_fails_before_its_loads_leaves_no_hash_on_unfilled_blocks(model_and_config,  # noqa: F811
                                                                              async_scheduling, monkeypatch):
    """The blocks a step fills from the tier are registered when planned. If the step fails before its loads ran,
    its requests end in "error" and those blocks must not be hit later: the same prompt again loads them anew."""
    from minillm.engine.model_runner import ModelRunner
    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(24)] for _ in range(3)]
    common = dict(scheduling="continuous", kv_layout="paged", block_size=4, max_model_len=32, max_num_seqs=1,
                  num_kv_blocks=10, async_scheduling=async_scheduling)
    plain = make_engine(model_and_config, **common)
    engine = make_engine(model_and_config, enable_prefix_caching=True, kv_offloading_size=gib_for(16, 4), **common)
    for prompt in prompts:
        run_to_completion(engine, [prompt], GREEDY)
    apply = ModelRunner.apply_block_ops

    def fail_before_loads(runner, step):
        if step.blocks_to_onload:
            raise RuntimeError("a step that fails before its loads")
        apply(runner, step)

    monkeypatch.setattr(ModelRunner, "apply_block_ops", fail_before_loads)
    request_id = engine.add_request(None, prompts[0] + [5], GREEDY)
    finished = []
    while engine.has_unfinished_requests():
        finished += [out for out in engine.step() if out.finished]
    assert [(out.request_id, out.outputs[0].finish_reason) for out in finished] == [(request_id, "error")]
    monkeypatch.setattr(ModelRunner, "apply_block_ops", apply)
    bm = engine.scheduler.block_manager
    bm.check_invariants()
    loads = bm.offload.loads
    again = prompts[0] + [6]
    assert run_to_completion(engine, [again], GREEDY) == run_to_completion(plain, [again], GREEDY)
    assert bm.offload.loads > loads  # from the tier again, not from the device blocks the failed step never filled


def test_the_tier_and_the_prefix_cache_are_on_metrics(model_and_config):  # noqa: F811
    """/metrics carries the prefix cache's queries and hits and the tier's stores, loads, evictions and used blocks
    (serve/metrics.py), from the engine's snapshot: each counter equals the engine's total, reset or not."""
    from prometheus_client.parser import text_string_to_metric_families
    from minillm.engine.async_llm import take_snapshot
    from minillm.serve.metrics import ServerMetrics
    rng = random.Random(3)
    prompts = [[rng.randrange(256) for _ in range(24)] for _ in range(3)]
    engine = make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4,
                         max_model_len=32, max_num_seqs=1, num_kv_blocks=10, enable_prefix_caching=True,
                         kv_offloading_size=gib_for(4, 4))
    metrics = ServerMetrics("tiny", offload=True)
    bm = engine.scheduler.block_manager
    for prompt in prompts + [prompts[0] + [1], prompts[1] + [2]]:
        run_to_completion(engine, [prompt], GREEDY)
        metrics.on_step([], take_snapshot(engine))
    engine.reset_prefix_cache()
    metrics.on_step([], take_snapshot(engine))
    samples = {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode())
               for s in f.samples}
    tier = bm.offload
    assert tier.evictions > 0 and bm.offload_hits > 0  # the workload reached every counter
    assert samples["minillm:prefix_cache_queries_total"] == bm.prefix_cache_queries
    assert samples["minillm:prefix_cache_hits_total"] == bm.prefix_cache_hits
    assert samples["minillm:prefix_cache_offload_hits_total"] == bm.offload_hits
    assert samples["minillm:kv_offload_store_blocks_total"] == tier.stores
    assert samples["minillm:kv_offload_load_blocks_total"] == tier.loads
    assert samples["minillm:kv_offload_evicted_blocks_total"] == tier.evictions
    assert samples["minillm:kv_offload_used_blocks"] == 0  # emptied by the reset
