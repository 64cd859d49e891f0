"""Continuous batching end to end on the bundled SmolLM2 (chapter 6): every scheduler and KV configuration gives
the greedy tokens of chapter 2's static batcher over a contiguous cache, and no configuration leaks a block.

One model is loaded for the module (static + contiguous, the reference); every other configuration is an engine
built around the same weights with `LLM.share_model(...)`. After every test a fixture checks that each engine the
test built holds no device or CPU (swap) block. Torch runs on one thread: the shared machine is oversubscribed.
"""
from __future__ import annotations

import pytest
import torch

from minillm import LLM, SamplingParams
from minillm.bench.timeline import gantt_spans
from minillm.bench.workload import corpus_text
from minillm.engine.kv_waste import kv_memory_waste
from minillm.config import EngineConfig
from tiny import one_thread  # noqa: F401  (one_thread: autouse fixture)

MAX_LEN = 256
PROMPT_LENS = [5, 17, 120, 33, 9, 64, 90, 48]  # varied, unsorted, awkward
MAX_TOKENS = [8, 24, 11, 16, 20, 9, 13, 24]
_BUILT: list[LLM] = []  # engines built by the current test, checked for leaks after it


@pytest.fixture(scope="module")
def base(one_thread) -> LLM:
    return LLM(max_model_len=MAX_LEN, max_num_seqs=8, scheduling="static", kv_layout="contiguous", seed=0)


def blocks_in_use(llm: LLM) -> tuple[int, int]:
    """(device blocks, CPU swap blocks) some sequence still holds."""
    scheduler = llm.llm_engine.scheduler
    bm = getattr(scheduler, "block_manager", None)
    if bm is None:  # the static scheduler: whole slots
        return scheduler.num_blocks - scheduler.num_free_blocks(), 0
    return bm.num_used_blocks, bm.num_used_cpu_blocks


@pytest.fixture(autouse=True)
def no_leaks(base):
    _BUILT.clear()
    yield
    for llm in [base, *_BUILT]:
        assert blocks_in_use(llm) == (0, 0), llm.llm_engine.engine_config
        assert not llm.llm_engine.has_unfinished_requests()
        bm = getattr(llm.llm_engine.scheduler, "block_manager", None)
        if bm is not None:
            bm.check_invariants()
    _BUILT.clear()


def build(base: LLM, **options) -> LLM:
    llm = base.share_model(max_num_seqs=options.pop("max_num_seqs", 8), **options)
    _BUILT.append(llm)
    return llm


@pytest.fixture(scope="module")
def corpus_ids(base) -> list[int]:
    return base.tokenizer.encode(corpus_text(), add_special_tokens=False)


@pytest.fixture(scope="module")
def workload(corpus_ids) -> tuple[list[list[int]], list[SamplingParams]]:
    """Token prompts of 5..120 tokens, each a different window of real text, and 8..24 greedy tokens each."""
    prompts = [corpus_ids[97 * i: 97 * i + n] for i, n in enumerate(PROMPT_LENS)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    return prompts, params


def tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def expected(base, workload) -> list[list[int]]:
    out = tokens(base, *workload)
    assert [len(t) for t in out] == MAX_TOKENS
    return out


def pool_at_fraction(prompts, params, block_size: int, fraction: float) -> int:
    """Blocks for `fraction` of what the whole batch needs at its end, but never fewer than the longest single
    request needs (a pool that cannot hold one request rejects it instead of preempting others)."""
    need = [-(-(len(p) + s.max_tokens) // block_size) for p, s in zip(prompts, params)]
    return max(-(-int(fraction * sum(need) * 100) // 100), max(need))


# -- the default and the comparison baseline ---------------------------------------------------------------
def test_continuous_paged_is_the_default_and_matches_static(base, workload, expected):
    assert EngineConfig().scheduling == "continuous"
    llm = build(base)
    config = llm.llm_engine.engine_config
    assert (config.scheduling, config.kv_layout) == ("continuous", "paged")
    assert (base.llm_engine.engine_config.scheduling, base.llm_engine.engine_config.kv_layout) == \
        ("static", "contiguous")
    assert tokens(llm, *workload) == expected
    # continuous batching admitted everyone at once: fewer steps than static batching needs
    assert llm.llm_engine.num_steps == max(MAX_TOKENS)


def test_prefix_caching_hits_on_a_shared_prefix(base, corpus_ids):
    prefix = corpus_ids[2000:2083]  # 83 tokens: 5 full blocks of 16 and a partial one
    suffixes = [corpus_ids[3000 + 50 * i: 3000 + 50 * i + n] for i, n in enumerate([5, 12, 1, 20, 7, 16])]
    prompts = [prefix + s for s in suffixes]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (8, 12, 16, 9, 10, 14)]
    want = tokens(base, prompts, params)
    llm = build(base, enable_prefix_caching=True)
    bm = llm.llm_engine.scheduler.block_manager
    # round 1: the first request computes the prefix; the rest may or may not hit depending on admission
    assert tokens(llm, prompts[:1], params[:1]) == want[:1]
    hits_before = bm.prefix_cache_hits
    assert tokens(llm, prompts[1:], params[1:]) == want[1:]
    assert bm.prefix_cache_hits - hits_before >= 5 * 16 * 5  # five prompts each reuse >= 5 cached blocks
    # round 2: everything again, now served from the cache (prompt and generated blocks alike)
    hits_before = bm.prefix_cache_hits
    assert tokens(llm, prompts, params) == want
    assert bm.prefix_cache_hits - hits_before >= sum(len(p) // 16 * 16 for p in prompts) - 6 * 16


def test_chunked_prefill_with_a_small_token_budget(base, workload, expected):
    llm = build(base, enable_chunked_prefill=True, max_num_batched_tokens=32)
    assert tokens(llm, *workload) == expected
    timeline = llm.llm_engine.scheduler.timeline
    assert max(r.num_batched_tokens for r in timeline) == 32
    # prefill chunks and decodes shared a step
    assert any(r.prefill_ids and len(r.prefill_ids) < len(r.scheduled) for r in timeline)
    # the Gantt data: each sequence prefills over ceil(len / 32)-ish steps, then decodes max_tokens - 1 steps
    spans = gantt_spans(timeline)
    assert len(spans) == len(PROMPT_LENS)
    for (seq_id, runs), n, m in zip(spans.items(), PROMPT_LENS, MAX_TOKENS):
        kinds = [k for _, _, k in runs]
        assert kinds[0] == "prefill" and "preempted" not in kinds, runs
        prefill_steps = sum(b - a + 1 for a, b, k in runs if k == "prefill")
        decode_steps = sum(b - a + 1 for a, b, k in runs if k == "decode")
        assert prefill_steps >= -(-n // 32) and decode_steps == m - 1, (seq_id, runs)


def test_long_prefill_token_threshold_caps_every_chunk_and_keeps_the_tokens(base, workload, expected):
    llm = build(base, enable_chunked_prefill=True, max_num_batched_tokens=48, long_prefill_token_threshold=12,
                enable_prefix_caching=True)
    assert tokens(llm, *workload) == expected
    timeline = llm.llm_engine.scheduler.timeline
    assert max(n for r in timeline for _, n in r.scheduled) == 12
    # the 120-token prompt shared its steps with other prompts' chunks instead of taking 48 tokens a step
    assert sum(len(r.prefill_ids) > 1 for r in timeline) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_pool_at_a_tenth_of_the_batch_preempts_and_still_matches(base, workload, expected, mode):
    prompts, params = workload
    block_size = 8
    num_blocks = pool_at_fraction(prompts, params, block_size, 0.10)
    llm = build(base, block_size=block_size, num_kv_blocks=num_blocks, preemption_mode=mode,
                swap_space=32 << 20)
    scheduler = llm.llm_engine.scheduler
    assert tokens(llm, prompts, params) == expected
    assert scheduler.num_preemptions > 0
    swapped = sum(len(r.swapped_out) for r in scheduler.timeline)
    assert (swapped > 0) == (mode == "swap")
    assert not any(r.rejected for r in scheduler.timeline)
    kinds = {k for runs in gantt_spans(scheduler.timeline).values() for _, _, k in runs}
    assert kinds == {"prefill", "decode", "preempted"}


# -- freeing -----------------------------------------------------------------------------------------------
def test_abort_and_stream_close_free_every_block(base, workload):
    llm = build(base, enable_prefix_caching=True, block_size=4)
    engine = llm.llm_engine
    initial = engine.scheduler.num_free_blocks()
    prompts, _ = workload
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    stream = llm.generate_stream(prompts[2], params)
    ids = [engine.add_request(None, p, params) for p in prompts[:2]]
    for _ in range(3):
        next(stream)
    assert engine.scheduler.num_free_blocks() < initial
    stream.close()
    assert engine.get_num_unfinished_requests() == 2
    for request_id in ids:
        assert llm.abort(request_id).outputs[0].finish_reason == "abort"
    assert engine.scheduler.num_free_blocks() == initial
    assert llm.abort("no-such-request") is None


def test_cpu_pool_sizing_and_a_pool_too_small(base):
    from minillm.engine.kv_cache import CPU_DEFAULT_KV_MEMORY, kv_bytes_per_block
    llm = build(base, max_num_seqs=3)
    per_block = kv_bytes_per_block(base.llm_engine.model_config, 16, torch.float32)
    want = min(3 * MAX_LEN // 16, CPU_DEFAULT_KV_MEMORY // per_block)
    assert llm.llm_engine.scheduler.block_manager.num_blocks == want
    llm = build(base, kv_cache_memory=40 * per_block + 7)
    assert llm.llm_engine.scheduler.block_manager.num_blocks == 40
    with pytest.raises(ValueError, match=r"holds 3 blocks of 16 tokens.*max_model_len=256 needs 16"):
        base.share_model(kv_cache_memory=3 * per_block)


# -- memory waste on a real run ----------------------------------------------------------------------------
def test_paged_memory_waste_on_a_real_run(base, workload):
    prompts, params = workload
    llm = build(base)
    outs = llm.generate(prompts, params)
    # tokens whose K/V the cache holds at the end: the last sampled token is never fed back
    seq_lens = [len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs]
    block_size = llm.llm_engine.scheduler.block_size
    waste = kv_memory_waste(seq_lens, block_size, MAX_LEN)
    assert waste["tokens"] == sum(seq_lens)
    assert waste["paged_waste"] < block_size * len(seq_lens)  # at most one partial block per sequence
    assert waste["contiguous_waste_fraction"] > 0.7 and waste["paged_waste_fraction"] < 0.2
    # the engine's real peak: all ran at once, the short ones ended (and freed their blocks) first, so the peak
    # is at most what kv_memory_waste counts and at least the blocks of the prompts alone
    pool = llm.llm_engine.scheduler.block_manager.num_blocks
    peak_used = pool - min(r.num_free_blocks for r in llm.llm_engine.scheduler.timeline)
    assert sum(-(-len(p) // block_size) for p in prompts) <= peak_used <= waste["paged_blocks"]
    # and the static engine reserved a whole max_model_len region per slot
    static_slots = base.llm_engine.runner.kv_cache.num_blocks * base.llm_engine.runner.kv_cache.block_size
    assert static_slots == 8 * MAX_LEN >= waste["contiguous_slots"]
