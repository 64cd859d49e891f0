"""Async scheduling (minillm/engine/async_step.py): the engine schedules and launches step N+1 before it reads step
N's tokens. On a CPU the overlap is only logical (a launch computes at once), but the code path is the GPU's:
placeholder tokens, the device-side gather of step N's samples into step N+1's input ids, the ring of downloads,
the wasted token of a request that stops. Greedy outputs must be token-identical to synchronous steps for a mixed
workload (lengths, max_tokens, stop strings, stop tokens, EOS, preemption under KV pressure, swaps, chunked
prefill, prefix caching), and no block may leak.
"""
from __future__ import annotations

import random

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.step_buffers import DownloadRing, _words, resolve_deferred_ids
from minillm.llm import _engine_config
from minillm.sampling_params import SamplingParams
from test_engine import tiny_config, tiny_model
from tiny import EOS, ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config(max_position_embeddings=256)
    return tiny_model(config, seed=3), config


def make_engine(model_and_config, **kw) -> LLMEngine:
    model, config = model_and_config
    options = dict(max_model_len=96, max_num_seqs=6, block_size=4, num_kv_blocks=200)
    options.update(kw)
    return LLMEngine(model, ByteTokenizer(), config, EngineConfig(**options))


def workload(n: int = 14, seed: int = 0) -> list[tuple[list[int], dict]]:
    """Prompts of varied lengths (some sharing a prefix) and varied max_tokens."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 250) for _ in range(9)]
    items = []
    for i in range(n):
        prompt = [rng.randrange(3, 250) for _ in range(rng.randint(1, 30))]
        if i % 3 == 0:
            prompt = shared + prompt
        items.append((prompt, dict(temperature=0.0, max_tokens=rng.randint(1, 40))))
    return items


def run(engine: LLMEngine, items, abort_after: dict[str, int] | None = None) -> dict[str, tuple]:
    """Add every request, step to the end; {request_id: (token ids, text, finish reason)}. `abort_after`:
    request id -> the step after which it is aborted."""
    for i, (prompt, params) in enumerate(items):
        engine.add_request(str(i), prompt, SamplingParams(**params))
    done, steps = {}, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        for rid, when in (abort_after or {}).items():
            if when == steps:
                out = engine.abort(rid)
                if out is not None:
                    outs.append(out)
        for out in outs:
            if out.finished:
                assert out.request_id not in done, f"request {out.request_id} finished twice"
                c = out.outputs[0]
                done[out.request_id] = (list(c.token_ids), c.text, c.finish_reason)
        engine.scheduler.check_invariants()
        assert steps < 5000
    bm = engine.scheduler.block_manager
    assert bm.num_used_blocks == 0 and bm.num_used_cpu_blocks == 0, "blocks leaked"
    bm.check_invariants()
    return done


def with_stops(model_and_config, items) -> list[tuple[list[int], dict]]:
    """The workload with stop strings, stop tokens and EOS taken from a synchronous run's own outputs, so that
    they really fire mid-generation."""
    plain = run(make_engine(model_and_config), items)
    out = []
    for i, (prompt, params) in enumerate(items):
        tokens, text, _ = plain[str(i)]
        params = dict(params)
        if i % 4 == 1 and len(text) > 6:
            params["stop"] = [text[3:5]]
        elif i % 4 == 2 and len(tokens) > 4:
            params["stop_token_ids"] = [tokens[3]]
        out.append((prompt, params))
    return out


CONFIGS = {
    "plain": {},
    "kv_pressure_recompute": dict(num_kv_blocks=24),
    "kv_pressure_swap": dict(num_kv_blocks=24, preemption_mode="swap", swap_space=1 << 20),
    "chunked_prefix_cache": dict(enable_chunked_prefill=True, max_num_batched_tokens=16, enable_prefix_caching=True,
                                 num_kv_blocks=60),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_async_outputs_equal_sync_outputs(model_and_config, name):
    items = with_stops(model_and_config, workload())
    sync_engine = make_engine(model_and_config, **CONFIGS[name])
    async_engine = make_engine(model_and_config, async_scheduling=True, **CONFIGS[name])
    assert async_engine.async_steps is not None and sync_engine.async_steps is None
    expected, got = run(sync_engine, items), run(async_engine, items)
    assert got == expected
    reasons = {r for _, _, r in got.values()}
    assert reasons == {"stop", "length"}, reasons
    if name.startswith("kv_pressure"):
        assert async_engine.scheduler.num_preemptions > 0
    assert async_engine.num_steps >= sync_engine.num_steps - 1


def test_eos_and_max_model_len(model_and_config):
    """A request whose greedy continuation hits EOS stops there (EOS taken from the model's own output, by
    declaring that token the model's EOS), and one that reaches max_model_len ends by length, in both modes."""
    model, config = model_and_config
    items = [([7, 8, 9], dict(temperature=0.0, max_tokens=40)), ([11] * 50, dict(temperature=0.0, max_tokens=200))]
    plain = run(make_engine(model_and_config, max_model_len=64), items)
    eos = plain["0"][0][5]
    config_eos = tiny_config(max_position_embeddings=256, eos_token_id=eos)
    results = []
    for async_scheduling in (False, True):
        engine = LLMEngine(model, ByteTokenizer(), config_eos,
                           EngineConfig(max_model_len=64, max_num_seqs=4, block_size=4, num_kv_blocks=100,
                                        async_scheduling=async_scheduling))
        results.append(run(engine, items))
    assert results[0] == results[1]
    assert results[1]["0"][2] == "stop" and results[1]["0"][0][-1] == eos
    assert results[1]["1"][2] == "length" and len(results[1]["1"][0]) == 64 - 50


def test_abort_mid_run(model_and_config):
    """Aborting a request whose step is in flight frees its blocks; the others finish as they would have."""
    items = workload(8, seed=1)
    items = [(p, dict(params, max_tokens=30)) for p, params in items]
    expected = run(make_engine(model_and_config), items)
    got = run(make_engine(model_and_config, async_scheduling=True), items, abort_after={"2": 5, "5": 9})
    assert got["2"][2] == "abort" and got["5"][2] == "abort"
    assert len(got["2"][0]) < 30
    assert got["2"][0] == expected["2"][0][:len(got["2"][0])]
    for rid in expected:
        if rid not in ("2", "5"):
            assert got[rid] == expected[rid]


def test_outputs_come_one_call_later(model_and_config):
    """The first call launches step 1 and returns nothing; the next reads step 1 (the prefill's token)."""
    engine = make_engine(model_and_config, async_scheduling=True)
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3))
    assert engine.step() == [] and engine.async_steps.in_flight
    seq = engine.scheduler.running[0]
    assert seq.token_ids[-1] == -1  # the placeholder for row 0 of step 1
    outs = engine.step()
    assert [len(o.outputs[0].token_ids) for o in outs] == [1] and seq.token_ids[3] >= 0
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine.async_steps.in_flight and seq.num_output_tokens == 3


def test_config_and_llm_options():
    assert _engine_config(None, None, None, None, {"async_scheduling": True}).async_scheduling
    from minillm.engine.cache_config import resolve_engine_config
    model_config = tiny_config()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # resolution reads only the device's type

    def resolved(device, **options):
        return resolve_engine_config(EngineConfig(**options), model_config, device).async_scheduling

    # None: on for CUDA where it applies; off on a CPU, for static batching, several ranks. A speculative engine
    # has it on: it steps async while speculation is switched off by batch size (steps_async)
    assert resolved(cuda) is True and resolved(cpu) is False
    assert resolved(cuda, async_scheduling=False) is False and resolved(cpu, async_scheduling=True) is True
    assert resolved(cuda, scheduling="static") is False
    assert resolved(cuda, tensor_parallel_size=2) is False
    assert resolved(cuda, speculative_config={"method": "ngram", "num_speculative_tokens": 3}) is True
    with pytest.raises(TypeError, match="async_scheduling"):
        EngineConfig(async_scheduling="yes")
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling=True, scheduling="static")
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling=True, tensor_parallel_size=2)


def test_a_dropped_async_engine_is_freed_at_once(model_and_config):
    """No reference cycle through the async stepper: a dropped engine (its CUDA graphs, KV cache, pinned
    buffers) is freed when its last reference goes, not whenever the cyclic collector next runs, which can be in
    the middle of another engine's CUDA-graph capture (minillm.kernels.hardware.paused_gc)."""
    import gc
    import weakref

    model, config = model_and_config
    gc.collect()
    gc.disable()
    try:
        engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(block_size=16, num_kv_blocks=32,
                           max_model_len=64, max_num_seqs=2, async_scheduling=True), device="cpu")
        engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.async_steps is not None
        ref = weakref.ref(engine)
        del engine
        assert ref() is None
    finally:
        gc.enable()


def test_resolve_deferred_ids_and_download_ring():
    ids = torch.tensor([5, -1, 7, -3, 0])
    resolve_deferred_ids(ids, torch.tensor([40, 41, 42]))
    assert ids.tolist() == [5, 40, 7, 42, 0]
    with pytest.raises(ValueError, match="sampled nothing"):
        resolve_deferred_ids(torch.tensor([-1]), None)
    ring = DownloadRing(torch.device("cpu"), num_slots=2)
    first = ring.start([torch.tensor([1, 2, 3]), torch.tensor([0.5, -1.0])])
    second = ring.start([torch.tensor([9])])
    tokens, floats = first.wait()
    assert tokens.tolist() == [1, 2, 3] and tokens.dtype == torch.int64 and floats.tolist() == [0.5, -1.0]
    ring.start([torch.tensor([4])])  # takes the first slot again
    with pytest.raises(RuntimeError, match="reused"):
        first.wait()
    assert second.wait()[0].tolist() == [9]
    # a step's tokens alone go as their own bits (no narrowing or concatenating kernel), large values included
    tokens = torch.tensor([[3, 1 << 40], [-2, 7]])
    assert _words([tokens]).data_ptr() == tokens.data_ptr()
    got = ring.start([tokens]).wait()[0]
    assert got.dtype == torch.int64 and torch.equal(got, tokens)
    ring.start([torch.tensor([0, 0])]), ring.start([torch.tensor([0, 0])])  # both slots rewritten
    assert torch.equal(got, tokens)  # what wait() returned is the caller's, not a view of the ring


@pytest.mark.parametrize("graphs", [False, True])
def test_async_step_keeps_one_upload_one_download_no_sync(graphs):
    """An async step (launch N+1, then read N) makes the transfers of a synchronous one: one packed upload and one
    download, and no sync: the gather of step N's tokens into step N+1's inputs stays on the device. Counted on
    the virtual device of minillm.bench.step_transfers; with graphs, the decode replays (host stand-in) graphs."""
    from minillm.bench.step_transfers import STEP_BUDGET, VIRTUAL_DEVICE, StepTransfers, attach_host_graphs, tiny_llama
    from minillm.loader.no_tokenizer import NoTokenizer
    model, config = tiny_llama()
    with StepTransfers(model) as counter:
        engine = LLMEngine(model, NoTokenizer(), config,
                           EngineConfig(max_model_len=128, max_num_seqs=4, block_size=16, num_kv_blocks=40,
                                        async_scheduling=True), device=VIRTUAL_DEVICE)
        if graphs:
            attach_host_graphs(engine)
        for i in range(3):
            engine.add_request(str(i), [(7 * i + j) % 256 for j in range(9 + 3 * i)],
                               SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        for _ in range(3):  # the prefill's launch, then decodes that take their input ids from the device
            engine.step()
        counter.reset()
        engine.step()
    assert counter.counts() == STEP_BUDGET, counter.report()
    assert engine.async_steps.in_flight_step.launched.step.deferred_input_ids
    assert all(t >= 0 for seq in engine.scheduler.running for t in seq.token_ids[:-1])


def count_launches(engine: LLMEngine) -> list[int]:
    """[async steps launched]: a counter around the engine's AsyncSteps.step."""
    count, inner = [0], engine.async_steps.step

    def step():
        count[0] += 1
        return inner()
    engine.async_steps.step = step
    return count


def test_speculative_engine_verifies_synchronously(model_and_config):
    """A proposer that always drafts (here a one-layer self-speculative draft) and no disable_by_batch_size: every
    step synchronous (a verify step's token count is not known before its tokens are). Same outputs as without
    the flag."""
    items = workload(6, seed=2)
    spec = {"method": "self_speculative", "num_speculative_tokens": 2, "draft_num_layers": 1}
    plain = make_engine(model_and_config, speculative_config=spec)
    flagged = make_engine(model_and_config, speculative_config=spec, async_scheduling=True)
    launches = count_launches(flagged)
    assert run(flagged, items) == run(plain, items)
    assert launches == [0] and flagged.speculative.metrics.num_verify_steps > 0


def repetitive_workload(n: int = 8, seed: int = 7) -> list[tuple[list[int], dict]]:
    """Prompts that repeat short phrases (so prompt lookup finds matches now and then) and varied max_tokens."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        phrases = [[rng.randrange(3, 250) for _ in range(rng.randint(2, 4))] for _ in range(3)]
        prompt = [t for _ in range(rng.randint(2, 5)) for t in rng.choice(phrases)] + [rng.randrange(3, 250)]
        items.append((prompt, dict(temperature=0.0, max_tokens=rng.randint(8, 40))))
    return items


@pytest.mark.parametrize("config", ["plain", "kv_pressure_recompute", "chunked_prefix_cache"])
@pytest.mark.parametrize("method, lookup_min", [("ngram", 1), ("ngram", 2), ("ngram_tree", 1)])
def test_ngram_steps_without_drafts_run_async(model_and_config, config, method, lookup_min):
    """Prompt lookup predicts when its next step will carry no drafts (predicts_drafts of NGramProposer and
    NGramTreeProposer, one token behind while a step is in flight): those steps run async, the others verify in
    sync after reading the step in flight (a tree step leaving KV moves keeps the next one in sync too). Greedy
    outputs equal plain decoding's; both kinds of step happen; no block leaks (run)."""
    items = with_stops(model_and_config, repetitive_workload())
    expected = run(make_engine(model_and_config, **CONFIGS[config]), items)
    spec = {"method": method, "num_speculative_tokens": 3, "prompt_lookup_min": lookup_min}
    engine = make_engine(model_and_config, speculative_config=spec, async_scheduling=True, **CONFIGS[config])
    launches = count_launches(engine)
    assert run(engine, items) == expected
    assert launches[0] > 0 and engine.speculative.metrics.num_verify_steps > 0


def test_prompt_lookup_drafts_one_token_behind():
    """With the last token in flight (a placeholder < 0), propose looks up the known suffix and skips the
    continuation's first token (its guess for the token in flight): the drafts are the tokens after it. The index
    and a learner's scan through the hook agree."""
    from minillm.speculative.proposer import NGramProposer
    from solutions.ch09_speculative import propose_prompt_lookup
    from minillm.hooks import overriding
    from types import SimpleNamespace
    tokens = [1, 2, 3, 9, 4, 1, 2, -1]  # [1, 2] occurred before, followed by 3 (the guess), then 9, 4, 1
    seq = SimpleNamespace(request_id="r", token_ids=tokens, num_tokens=len(tokens))
    assert NGramProposer(3, 1).propose([seq], [2]) == [[9, 4]]
    with overriding({"ch09.ngram_lookup": propose_prompt_lookup}):
        assert NGramProposer(3, 1).propose([seq], [2]) == [[9, 4]]
    known = SimpleNamespace(request_id="s", token_ids=tokens[:-1], num_tokens=len(tokens) - 1)
    assert NGramProposer(3, 1).propose([known], [2]) == [[3, 9]]  # every token known: no guess to skip
    short = SimpleNamespace(request_id="t", token_ids=[5, 1, 2, 3, 1, 2, -1], num_tokens=7)
    assert NGramProposer(3, 1).propose([short], [3]) == [[1, 2]]  # the continuation stops at the known tokens


def test_predicts_drafts_matches_prompt_lookup():
    """predicts_drafts (of the chain and the tree proposer) against the scan (propose_prompt_lookup): with every
    token known, whether it drafts at all; with the last token in flight (a placeholder), whether the known
    tokens' lookup yields two tokens or more.
    Sequences are grown step by step (the index is incremental), with and without a placeholder at the end, and
    the same answers come from a learner's scan plugged in through the exercise hook."""
    from types import SimpleNamespace
    from minillm.hooks import overriding
    from minillm.speculative.ngram import propose_prompt_lookup
    from minillm.speculative.proposer import NGramProposer
    from minillm.speculative.tree_proposers import NGramTreeProposer
    rng, trees = random.Random(11), {}
    for trial in range(40):
        lo, hi = rng.choice([(1, 3), (2, 3), (2, 2), (1, 1)])
        proposer, tokens = NGramProposer(hi, lo), []
        for step in range(60):
            tokens.append(rng.randrange(0, 6))
            in_flight = rng.random() < 0.5
            ids = tokens + [-1] if in_flight else list(tokens)
            seq = SimpleNamespace(request_id="r", token_ids=ids, num_tokens=len(ids))
            want = len(tokens) >= 2 and len(propose_prompt_lookup(tokens, 2, hi, lo)) > int(in_flight)
            assert proposer.predicts_drafts([seq]) == want, (trial, step, lo, hi, ids)
            with overriding({"ch09.ngram_lookup": propose_prompt_lookup}):
                assert NGramProposer(hi, lo).predicts_drafts([seq]) == want
            # the tree proposer branches over every earlier occurrence (not only the latest): its own reference is
            # the continuations of a fresh index, against the one it extends step by step
            tree_want = len(tokens) >= 2 and any(len(c) > int(in_flight) for c in NGramTreeProposer(hi, lo)
                                                 .continuations(tokens, 1 + int(in_flight)))
            assert trees.setdefault((trial, lo, hi), NGramTreeProposer(hi, lo)).predicts_drafts([seq]) == tree_want


SWITCHED = {
    # prompt_lookup_min 1 (not the default 2): the short random workload must give both switches drafts to verify
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1},
    "ngram_tree": {"method": "ngram_tree", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
    "self_speculative": {"method": "self_speculative", "num_speculative_tokens": 2, "draft_num_layers": 1},
}


@pytest.mark.parametrize("method", list(SWITCHED))
@pytest.mark.parametrize("config", ["plain", "kv_pressure_recompute"])
def test_switched_off_speculation_steps_async(model_and_config, method, config):
    """With disable_by_batch_size, the steps with more requests running than the limit run async (as an engine
    without speculation would), the others propose and verify in sync after reading the step in flight: greedy
    outputs equal plain decoding's through both switches, under KV pressure too, and no block leaks (run)."""
    items = with_stops(model_and_config, workload(10, seed=4))
    expected = run(make_engine(model_and_config, **CONFIGS[config]), items)
    spec = dict(SWITCHED[method], disable_by_batch_size=2)
    engine = make_engine(model_and_config, speculative_config=spec, async_scheduling=True, **CONFIGS[config])
    launches = count_launches(engine)
    assert run(engine, items) == expected
    assert launches[0] > 0 and engine.speculative.metrics.num_verify_steps > 0
    assert engine.speculative.proposer.active_requests() == set()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_async_equals_sync_with_cuda_graphs():
    """On the GPU, decode steps replayed by CUDA graphs (and piecewise graphs for prefill steps), the deferred ids
    gathered into the graphs' static inputs: the tokens must equal synchronous steps'. In fp32: the two modes do not
    make the same batches step for step (on the H200 this workload took 81 synchronous steps and 83 async ones), and
    in bf16 a row's rounding depends on its batch, so 2 of the 24 requests flipped a near-tie there (every request
    equal in fp32, eager or graphed). Then with stop tokens (the wasted-token path): each request ends at its stop
    token or at max_tokens, with no placeholder left in its output."""
    from minillm.engine.worker import RandomWeights
    config = tiny_config(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=512, max_position_embeddings=512)
    model = RandomWeights(seed=3)(config, torch.device("cuda"), torch.float32)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(5, 120))] for _ in range(24)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 60), ignore_eos=True) for _ in prompts]

    def run_engine(async_scheduling, params, **options):
        options = dict(dict(block_size=16, kv_cache_memory=64 << 20, max_model_len=256, max_num_seqs=16), **options)
        engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(async_scheduling=async_scheduling, **options),
                           device="cuda", dtype=torch.float32)
        assert engine.runner.cuda_graphs is not None
        ids = [engine.add_request(None, p, s) for p, s in zip(prompts, params)]
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        assert engine.scheduler.block_manager.num_used_blocks == 0
        return [done[i].outputs[0] for i in ids]

    sync, asynchronous = run_engine(False, params), run_engine(True, params)
    assert [o.token_ids for o in asynchronous] == [o.token_ids for o in sync]
    # a speculative engine: async steps over the limit, verify graphs (q_len 1 + k) in sync below it
    for spec in ({"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 4},
                 {"method": "ngram_tree", "num_speculative_tokens": 3, "disable_by_batch_size": 4}):
        switched = run_engine(True, params, speculative_config=spec)
        assert [o.token_ids for o in switched] == [o.token_ids for o in sync], spec["method"]
    # prompt lookup without a limit on prompts that repeat themselves: async steps where no draft is expected,
    # drains, padded verify graphs, one request at a time (batch 1) and all together
    prompts[:] = [prompt for prompt, _ in repetitive_workload(8, seed=5)]
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for _ in prompts]
    sync = run_engine(False, params)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2}
    assert [o.token_ids for o in run_engine(True, params, speculative_config=spec)] == [o.token_ids for o in sync]
    assert [o.token_ids for o in run_engine(True, params, speculative_config=spec, max_num_seqs=1)] == \
        [o.token_ids for o in sync]
    stops = [SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True,
                            stop_token_ids=[o.token_ids[len(o.token_ids) // 2]])
             for p, o in zip(params, sync)]
    for out, stop in zip(run_engine(True, stops), stops):
        assert all(0 <= t < config.vocab_size for t in out.token_ids)
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in stop.stop_token_ids
        else:
            assert out.finish_reason == "length" and len(out.token_ids) == stop.max_tokens


def test_disaggregation_refuses_async_scheduling():
    from minillm.engine.disagg_engine import check_disaggregation
    with pytest.raises(ValueError, match="async_scheduling"):
        check_disaggregation(EngineConfig(async_scheduling=True))


def test_logprobs_and_prompt_logprobs_with_chunked_prefill(model_and_config):
    """Log-probs of sampled tokens and of prompt tokens (scored chunk by chunk, read one step late) equal a
    synchronous engine's."""
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(1, 40))] for _ in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2, prompt_logprobs=1)

    def outputs(**kw):
        engine = make_engine(model_and_config, enable_chunked_prefill=True, max_num_batched_tokens=16, **kw)
        ids = [engine.add_request(None, p, params) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        return [(done[i].outputs[0].token_ids, done[i].outputs[0].logprobs, done[i].prompt_logprobs) for i in ids]

    expected, got = outputs(), outputs(async_scheduling=True)
    assert got == expected
    assert all(len(p) == len(prompt) for (_, _, p), prompt in zip(got, prompts))


def test_seeded_sampling_matches(model_and_config):
    """A request with its own seed draws from its own generator, once per step it samples: the same draws in both
    modes (only a finished request's wasted token draws once more, after its end)."""
    items = [(p, dict(temperature=0.9, top_p=0.9, seed=11 * i, max_tokens=params["max_tokens"]))
             for i, (p, params) in enumerate(workload(10, seed=7))]
    items = with_stops(model_and_config, items)
    assert run(make_engine(model_and_config, async_scheduling=True), items) == run(make_engine(model_and_config), items)


def test_sampling_graphs_equal_eager_steps(model_and_config, monkeypatch):
    """Decode graphs that also run the LM head, the greedy argmax and async scheduling's gather of deferred ids
    (DecodeCUDAGraphs(sample=True); host stand-in graphs over the Triton kernels, interpreted): synchronous and
    async, greedy, seeded-sampling and log-prob requests in one batch, chunked prefills between the decodes (the
    runner refills the graphs' token buffer after those eager steps), batches that change bucket: the tokens of
    eager synchronous steps, log-probs up to rounding. And no all-greedy step replayed that way samples on the host."""
    from minillm.bench.step_transfers import attach_host_graphs
    model, _ = model_and_config
    monkeypatch.setattr(model, "attention_backend", "triton")  # graphs read no per-step Python lists
    rng = random.Random(6)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    params = [SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=rng.randint(1, 8)) if i % 3 == 1 else
              SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 14), logprobs=2 if i % 3 == 2 else None)
              for i in range(len(prompts))]

    def outputs(graphs, **kw):
        engine = make_engine(model_and_config, enable_chunked_prefill=True, max_num_batched_tokens=24, **kw)
        if graphs:
            attach_host_graphs(engine)
            sampled = engine.runner.cuda_graphs.sampled  # every graph's logits: rows of one shared buffer
            assert len(sampled) > 2 and len({logits.data_ptr() for logits, _ in sampled.values()}) == 1
        host_samples, replayed = [], [False]  # (in a step replayed by a decode graph, every row greedy)
        runner, sample, forward = engine.runner, engine.runner._sample_on_device, engine.runner.forward
        monkeypatch.setattr(runner, "forward", lambda prepared: replayed.__setitem__(
            0, prepared.graph is not None and prepared.graph[1] == 1) or forward(prepared))
        monkeypatch.setattr(runner, "_sample_on_device", lambda logits, specs, params, *rest: host_samples.append(
            (replayed[0], params is None)) or sample(logits, specs, params, *rest))
        ids = [engine.add_request(None, p, s) for p, s in zip(prompts, params)]
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        assert engine.scheduler.block_manager.num_used_blocks == 0
        counts = engine.runner.forward_counts
        if graphs:  # no all-greedy replayed step sampled on the host, and there were such steps
            assert (True, True) not in host_samples
            assert counts["graph"] - host_samples.count((True, False)) > 2
        return [done[i].outputs[0] for i in ids]

    expected = outputs(False)
    for async_scheduling in (False, True):
        for out, ref in zip(outputs(True, async_scheduling=async_scheduling), expected, strict=True):
            assert out.token_ids == ref.token_ids, async_scheduling
            for mine, theirs in zip(out.logprobs or [], ref.logprobs or [], strict=True):
                assert mine.keys() == theirs.keys()
                assert all(abs(mine[t].logprob - theirs[t].logprob) < 1e-5 for t in mine)


def test_llm_generate_and_stream_with_the_bundled_model():
    """LLM(..., async_scheduling=True) on SmolLM2: generate() and generate_stream() give the synchronous engine's
    texts (real tokenizer, chat-length prompts, a stop string)."""
    from minillm import LLM
    base = LLM(max_model_len=128, max_num_seqs=4, seed=0)
    fast = base.share_model(max_num_seqs=4, async_scheduling=True)
    assert fast.llm_engine.async_steps is not None
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,"]
    params = [SamplingParams(temperature=0, max_tokens=10), SamplingParams(temperature=0, max_tokens=14, stop=["\n"]),
              SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=0, max_tokens=12)]
    expected = [(o.outputs[0].text, o.outputs[0].finish_reason) for o in base.generate(prompts, params)]
    assert [(o.outputs[0].text, o.outputs[0].finish_reason) for o in fast.generate(prompts, params)] == expected
    streamed = "".join(delta.outputs[0].text for delta in fast.generate_stream(prompts[0], params[0]))
    assert streamed == expected[0][0]
    assert fast.llm_engine.scheduler.block_manager.num_used_blocks == 0



def test_steps_async_rule(model_and_config):
    """SpeculativeDecoder.steps_async: async over the limit; below it only where the proposer expects no draft for
    any decoding sequence; never while a token tree's KV slot moves wait for the next step (an async step would not
    carry them: the next verify would read stale K/V)."""
    from types import SimpleNamespace

    def decoding(tokens):  # a sequence about to decode, its last token sampled
        return SimpleNamespace(request_id=str(tokens), token_ids=tokens, num_tokens=len(tokens), is_prefill=False,
                               num_uncomputed_tokens=1, num_output_tokens=1,
                               sampling_params=SimpleNamespace(max_tokens=50))
    repeating, novel = decoding([5, 6, 7, 5, 6, 7, 5]), decoding([5, 6, 7, 8])
    spec = {"method": "ngram_tree", "num_speculative_tokens": 3, "disable_by_batch_size": 2}
    decoder = make_engine(model_and_config, speculative_config=spec, async_scheduling=True).speculative
    batch = lambda *seqs: SimpleNamespace(running=list(seqs))
    assert decoder.steps_async(batch(novel, novel, novel))  # over the limit
    assert not decoder.steps_async(batch(repeating, novel)) and decoder.steps_async(batch(novel))
    decoder.tree._pending_copies = [(17, 12)]
    assert not decoder.steps_async(batch(novel, novel, novel)) and not decoder.steps_async(batch(novel))
    assert decoder.tree.has_pending_moves
    unlimited = make_engine(model_and_config, speculative_config={"method": "self_speculative", "draft_num_layers": 1,
                                                                  "num_speculative_tokens": 3},
                            async_scheduling=True).speculative
    assert not unlimited.steps_async(batch(novel))  # a proposer without predicts_drafts: always in sync


def test_a_failing_draft_prediction_costs_the_overlap_not_requests(model_and_config, monkeypatch, caplog):
    """predicts_drafts raising (a proposer bug, or a learner's lookup through the hook) is counted and logged
    once, the step runs synchronously (propose decides there), and every request still gets plain decoding's
    tokens."""
    from minillm.speculative.proposer import NGramProposer

    def broken(self, seqs):
        raise RuntimeError("prediction bug")
    monkeypatch.setattr(NGramProposer, "predicts_drafts", broken)
    items = repetitive_workload(4, seed=9)
    expected = run(make_engine(model_and_config), items)
    engine = make_engine(model_and_config, speculative_config={"method": "ngram", "num_speculative_tokens": 3},
                         async_scheduling=True)
    assert run(engine, items) == expected
    assert engine.speculative.num_propose_errors > 0 and caplog.text.count("could not predict its drafts") == 1


def test_a_step_that_cannot_be_read_fails_its_requests_without_placeholders(model_and_config, caplog):
    """Reading a launched step fails (the download, say): that step's requests finish with 'error', their
    outputs hold no placeholder (a token never read is dropped, as abort drops it), no block leaks, and the other
    requests end as in a synchronous run."""
    items = workload(8, seed=3)
    expected = run(make_engine(model_and_config), items)
    engine = make_engine(model_and_config, async_scheduling=True)
    inner, calls = engine.executor.collect_model, [0]

    def collect(launched):
        calls[0] += 1
        if calls[0] == 6:
            raise RuntimeError("download lost")
        return inner(launched)
    engine.executor.collect_model = collect
    got = run(engine, items)
    failed = {rid for rid, (_, _, reason) in got.items() if reason == "error"}
    assert failed and "download lost" in caplog.text
    assert all(t >= 0 for tokens, _, _ in got.values() for t in tokens)
    assert {rid: out for rid, out in got.items() if rid not in failed} == \
        {rid: out for rid, out in expected.items() if rid not in failed}
