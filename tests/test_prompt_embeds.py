"""Prompts given as embeddings (vLLM's enable_prompt_embeds; minillm/engine/prompt_embeds.py): the token embedding's
own vectors give exactly the tokens of the ids they embed, under chunked prefill, preemption, async scheduling and
beside ordinary prompts; their placeholder ids reach neither the prefix cache nor anything that reads prompt tokens."""
from __future__ import annotations

import asyncio
import base64
import io
import os

import pytest
import torch

from minillm.llm import LLM
from minillm.sampling_params import SamplingParams
from test_engine import make_engine, model_and_config  # noqa: F401  (fixture)
from tiny import one_thread, run_to_completion  # noqa: F401  (one_thread: autouse fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 9, 33, 7, 81, 12, 3, 44, 17, 2, 200], [66, 1, 90], [120], list(range(30, 52))]


def embed(model, ids):
    with torch.inference_mode():
        weight = model.model.embed_tokens.weight
        return model.model.embed_tokens(torch.tensor(ids, device=weight.device)).clone()


PAGED = dict(scheduling="continuous", kv_layout="paged", block_size=4, enable_prompt_embeds=True)


@pytest.mark.parametrize("options", [
    dict(PAGED, num_kv_blocks=64),
    dict(PAGED, num_kv_blocks=64, enable_chunked_prefill=True, max_num_batched_tokens=8),
    dict(PAGED, num_kv_blocks=12, max_num_seqs=4),  # preemption by recompute: the prompt's vectors again
    dict(PAGED, num_kv_blocks=12, max_num_seqs=4, preemption_mode="swap", swap_space=1 << 20),
    dict(PAGED, num_kv_blocks=64, async_scheduling=True),
    dict(scheduling="static", kv_layout="contiguous", enable_prompt_embeds=True),
], ids=["paged", "chunked", "recompute", "swap", "async", "static"])
def test_the_embeddings_of_ids_give_the_tokens_of_those_ids(model_and_config, options):  # noqa: F811
    """Each prompt twice in one batch, as ids and as their embeddings: the same greedy tokens (the placeholders
    are token 0, which none of these prompts holds: a run that ignored the vectors would answer another prompt)."""
    model, _ = model_and_config
    engine = make_engine(model_and_config, **options)
    prompts = PROMPTS + [embed(model, p) for p in PROMPTS]
    outputs = run_to_completion(engine, prompts, GREEDY)
    assert outputs[len(PROMPTS):] == outputs[:len(PROMPTS)]
    if options.get("num_kv_blocks") == 12:
        assert engine.scheduler.num_preemptions > 0
    assert not engine.has_unfinished_requests()


def test_other_vectors_give_other_tokens(model_and_config):  # noqa: F811
    model, _ = model_and_config
    engine = make_engine(model_and_config, **PAGED, num_kv_blocks=64)
    vectors = embed(model, PROMPTS[0])
    shifted = run_to_completion(engine, [vectors, vectors + 0.5 * torch.randn_like(vectors)], GREEDY)
    assert shifted[0] != shifted[1]


def test_the_prefix_cache_keys_embeddings_by_their_vectors(model_and_config):  # noqa: F811
    """The same vectors again share their blocks (a soft prompt reused); the placeholders never make an embeddings
    prompt look like a prompt of token 0s, nor like other vectors of its length; the tokens stay the ids'."""
    model, _ = model_and_config
    engine = make_engine(model_and_config, **PAGED, num_kv_blocks=64, enable_prefix_caching=True)
    bm = engine.scheduler.block_manager
    zeros, vectors = [0] * 12, embed(model, PROMPTS[3][:12])
    want = run_to_completion(engine, [PROMPTS[3][:12]], GREEDY)
    hits = bm.prefix_cache_hits
    assert run_to_completion(engine, [vectors], GREEDY) == want and bm.prefix_cache_hits == hits  # ids' blocks: no
    assert run_to_completion(engine, [zeros, vectors * 1.5], GREEDY) and bm.prefix_cache_hits == hits
    assert run_to_completion(engine, [vectors.clone()], GREEDY) == want
    assert bm.prefix_cache_hits == hits + 11  # the same vectors: all but the last position from the cache
    bm.check_invariants()


def test_llm_generate_takes_embeds_prompts_and_outputs_no_prompt_ids(model_and_config):  # noqa: F811
    model, _ = model_and_config
    llm = LLM.from_engine(make_engine(model_and_config, **PAGED, num_kv_blocks=64))
    outs = llm.generate([{"prompt_embeds": embed(model, PROMPTS[0])}, {"prompt_token_ids": PROMPTS[0]}], GREEDY)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert outs[0].prompt_token_ids == [] and outs[0].prompt is None and outs[1].prompt_token_ids == PROMPTS[0]
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=4, n=2)
    assert len(llm.generate({"prompt_embeds": embed(model, PROMPTS[1])}, sampled)[0].outputs) == 2
    with pytest.raises(ValueError, match="not taken here"):
        llm.embed({"prompt_embeds": embed(model, PROMPTS[1])})


def bad_cases(model):
    vectors = embed(model, PROMPTS[1])
    return [
        (vectors[None], ValueError, r"shape \[num_positions >= 1, hidden_size=\d+\], got \[1, 3, \d+\]"),
        (vectors[:, :5], ValueError, r"hidden_size=\d+\], got \[3, 5\]"),
        (vectors[:0], ValueError, "got \\[0, "),
        (torch.ones(3, vectors.shape[1], dtype=torch.long), TypeError, "floating-point tensor, got torch.int64"),
        (torch.full_like(vectors, float("nan")), ValueError, "NaN or infinite"),
        (vectors.tolist(), TypeError, "must be a torch.Tensor"),
    ]


def test_bad_embeddings_and_unsupported_options_are_refused_by_name(model_and_config):  # noqa: F811
    model, _ = model_and_config
    off = LLM.from_engine(make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4))
    with pytest.raises(ValueError, match="enable_prompt_embeds=True"):
        off.generate({"prompt_embeds": embed(model, PROMPTS[1])}, GREEDY)
    engine = make_engine(model_and_config, **PAGED, num_kv_blocks=64)
    llm = LLM.from_engine(engine)
    for value, error, message in bad_cases(model):
        with pytest.raises(error, match=message):
            llm.generate([PROMPTS[0], {"prompt_embeds": value}], GREEDY)
    vectors = embed(model, PROMPTS[1])
    for params, message in ((SamplingParams(max_tokens=2, prompt_logprobs=1), "prompt_logprobs=1"),
                            (SamplingParams(max_tokens=2, repetition_penalty=1.2), "repetition_penalty=1.2")):
        with pytest.raises(ValueError, match=message):
            engine.add_request(None, vectors, params)
    with pytest.raises(ValueError, match="disaggregation"):
        from minillm.config import EngineConfig
        from minillm.engine.disagg_engine import check_disaggregation
        check_disaggregation(EngineConfig(enable_prompt_embeds=True))
    assert not engine.has_unfinished_requests()
    assert run_to_completion(engine, [vectors], GREEDY)  # the engine serves on


def test_a_speculating_engine_refuses_embeds_prompts(model_and_config):  # noqa: F811
    model, _ = model_and_config
    engine = make_engine(model_and_config, **PAGED, num_kv_blocks=64,
                         speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="speculative decoding"):
        engine.add_request(None, embed(model, PROMPTS[1]), GREEDY)


def test_async_llm_and_the_server_take_embeddings(model_and_config):  # noqa: F811
    import httpx
    from serve_tiny import tiny_app, tiny_engine
    engine = tiny_engine(enable_prompt_embeds=True)
    app, llm = tiny_app(engine)
    model = engine.runner.model
    ids = [40, 50, 60, 70, 80]
    buffer = io.BytesIO()
    torch.save(embed(model, ids), buffer)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    transport = httpx.ASGITransport(app=app)

    async def main():
        async with app.router.lifespan_context(app):
            async for out in llm.generate(embed(model, ids), GREEDY):
                pass
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
                by_ids = await c.post("/v1/completions", json={**body, "prompt": ids})
                by_embeds = await c.post("/v1/completions", json={**body, "prompt_embeds": encoded})
                both = await c.post("/v1/completions", json={**body, "prompt_embeds": [encoded, encoded]})
                garbage = await c.post("/v1/completions", json={**body, "prompt_embeds": "bm90IGEgdGVuc29y"})
        return out, by_ids, by_embeds, both, garbage
    out, by_ids, by_embeds, both, garbage = asyncio.run(main())
    assert by_ids.status_code == by_embeds.status_code == both.status_code == 200, by_embeds.text
    text = by_ids.json()["choices"][0]["text"]
    assert by_embeds.json()["choices"][0]["text"] == text == engine.tokenizer.decode(out.outputs[0].token_ids)
    assert [c["text"] for c in both.json()["choices"]] == [text, text]
    assert by_embeds.json()["usage"]["prompt_tokens"] == len(ids)
    assert garbage.status_code == 400 and "prompt_embeds" in garbage.json()["error"]["message"]


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)],
                         ids=["tp2", "pp2"])
def test_embeddings_prompts_under_parallelism_match_their_ids_in_one_process(parallel):
    """The step's vectors travel to every worker (StepInput.prompt_embeds): with the vocabulary split across ranks
    (TP) or the embedding on the first stage only (PP), chunked prefill on, the ids' tokens of one process."""
    from test_parallel import _engine
    options = dict(max_model_len=64, max_num_seqs=4, block_size=4, num_kv_blocks=48, enable_prompt_embeds=True,
                   enable_chunked_prefill=True, max_num_batched_tokens=8)
    one = _engine(options)
    prompts = [p for p in PROMPTS if max(p) < 256]
    want = run_to_completion(one, prompts, GREEDY)
    vectors = [embed(one.runner.model, p) for p in prompts]
    engine = _engine(options, **parallel)
    try:
        assert run_to_completion(engine, vectors + prompts[:1], GREEDY) == want + want[:1]
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_a_gpu_embeddings_steps_run_eagerly_beside_graph_steps():
    """With CUDA graphs on (decode graphs, piecewise and prompt graphs), a step with embeddings rows runs eagerly
    and every later decode step may replay: the ids' tokens, in one batch with the ids themselves."""
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from test_engine import tiny_config, tiny_model
    from tiny import ByteTokenizer
    config = tiny_config()
    model = tiny_model(config).to("cuda")
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(max_model_len=64, max_num_seqs=8, block_size=16,
                       num_kv_blocks=64, enable_prompt_embeds=True), device=torch.device("cuda"), dtype=torch.float32)
    assert engine.runner.cuda_graphs is not None
    prompts = PROMPTS + [embed(model, p) for p in PROMPTS]
    outputs = run_to_completion(engine, prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert outputs[len(PROMPTS):] == outputs[:len(PROMPTS)]
    assert engine.runner.forward_counts["graph"] > 0 and engine.runner.forward_counts["eager"] > 0


def test_truncate_prompt_tokens_keeps_the_prompts_end(model_and_config):  # noqa: F811
    """SamplingParams.truncate_prompt_tokens (vLLM's): the last k tokens, the same tokens as that tail given alone;
    -1 keeps max_model_len of them; an embeddings prompt keeps its last k vectors; bad values are named."""
    model, _ = model_and_config
    engine = make_engine(model_and_config, **PAGED, num_kv_blocks=64, max_model_len=32)
    llm = LLM.from_engine(engine)
    long = list(range(3, 43))  # 40 tokens: more than max_model_len
    keep = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=10)
    outs = llm.generate([long, {"prompt_embeds": embed(model, long)}, long[-10:]], [keep, keep, GREEDY])
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids[:4]
    assert outs[0].prompt_token_ids == long[-10:]
    whole = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, truncate_prompt_tokens=-1)
    assert llm.generate([long], whole)[0].prompt_token_ids == long[-32:]
    with pytest.raises(ValueError, match="max_model_len=32"):  # without truncation the prompt is refused
        llm.generate([long], GREEDY)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens must be an integer >= 1, -1"):
            SamplingParams(truncate_prompt_tokens=bad)


@pytest.mark.parametrize("seed", range(int(os.environ.get("MINILLM_EMBEDS_STRESS_SEEDS", 8))))
def test_random_workloads_of_embeddings_and_ids_match_each_prompt_alone(model_and_config, seed):  # noqa: F811
    """Random engines (pool size, chunked prefill, swap or recompute, async scheduling, prefix caching and its CPU
    tier) over a random mix of ids and embeddings prompts, some of them repeated (prefix hits on vectors): every
    request's greedy tokens equal its ids' tokens run alone on a roomy engine. A longer hunt:
    MINILLM_EMBEDS_STRESS_SEEDS=300."""
    import random
    from test_kv_offload import gib_for
    model, _ = model_and_config
    rng = random.Random(seed)
    caching = rng.random() < 0.7
    options = dict(PAGED, num_kv_blocks=rng.choice([10, 14, 24]), max_num_seqs=rng.choice([2, 4]),
                   preemption_mode=rng.choice(["recompute", "swap"]), swap_space=1 << 20,
                   async_scheduling=rng.random() < 0.5, enable_prefix_caching=caching)
    if rng.random() < 0.5:
        options.update(enable_chunked_prefill=True, max_num_batched_tokens=rng.choice([6, 8, 16]))
    if caching and rng.random() < 0.5:
        options["kv_offloading_size"] = gib_for(32, 4)
    engine = make_engine(model_and_config, **options)
    alone = make_engine(model_and_config, **PAGED, num_kv_blocks=64)
    pool = [[rng.randrange(1, 256) for _ in range(rng.randint(1, 20))] for _ in range(5)]
    ids = [rng.choice(pool) for _ in range(10)]
    as_embeds = [rng.random() < 0.6 for _ in ids]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 8), ignore_eos=True) for _ in ids]
    prompts = [embed(model, p) if e else p for p, e in zip(ids, as_embeds)]
    got = run_to_completion(engine, prompts, params)
    want = [run_to_completion(alone, [p], [sp])[0] for p, sp in zip(ids, params)]
    assert got == want, options
    engine.scheduler.block_manager.check_invariants()
    assert engine.scheduler.block_manager.num_used_blocks == 0
