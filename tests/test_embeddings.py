"""Embedding requests (minillm/pooling.py; LLMEngine.add_request(pooling_params=), LLM.embed): the vector pools
the final hidden states of the prompt (its last token, their mean, or its first) exactly as one full forward
does, whatever path its prefill takes (chunked, prefix-cached, async scheduling, beside generating requests,
recomputed after preemption, alone after a failed step), and bad requests are refused alone."""
from __future__ import annotations

import pytest
import torch

from minillm.llm import LLM
from minillm.pooling import PoolingParams
from minillm.sampling_params import ParamError, SamplingParams
from test_engine import greedy_reference, make_engine, model_and_config, run  # noqa: F401  (fixture)
from tiny import one_thread  # noqa: F401  (autouse fixture)

PROMPTS = [[5, 9, 200], [17] * 11, list(range(40, 59)), [3], list(range(40, 52)) + [7, 7]]


def reference(model, prompt: list[int], pooling_type: str = "LAST") -> torch.Tensor:
    """The pooled final hidden states by one full forward, no KV cache."""
    with torch.inference_mode():
        hidden = model(torch.tensor(prompt), torch.arange(len(prompt))).float()
    return {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling_type]


def embed(engine, prompts, pooling=None, generate=()):
    """Embeddings of `prompts` (and the token ids of generation requests for `generate`, run beside them)."""
    pooling = pooling or PoolingParams()
    ids = [engine.add_request(None, p, pooling_params=pooling) for p in prompts]
    gen = [engine.add_request(None, p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)) for p in generate]
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[i].embedding for i in ids], [done[i].outputs[0].token_ids for i in gen]


@pytest.mark.parametrize("options", [
    dict(),
    dict(scheduling="continuous", kv_layout="paged", block_size=4),
    dict(scheduling="continuous", kv_layout="paged", block_size=4, enable_chunked_prefill=True,
         max_num_batched_tokens=6),
    dict(scheduling="continuous", kv_layout="paged", block_size=4, enable_prefix_caching=True),
    dict(scheduling="continuous", kv_layout="paged", block_size=4, async_scheduling=True),
], ids=["static", "continuous", "chunked", "prefix_cached", "async"])
@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN", "CLS"])
def test_an_embedding_pools_the_prompts_hidden_states(model_and_config, options, pooling_type):
    model, _ = model_and_config
    engine = make_engine(model_and_config, **options)
    plain = make_engine(model_and_config, **options)
    got, generated = embed(engine, PROMPTS + PROMPTS[:2], PoolingParams(pooling_type=pooling_type.lower()),
                           generate=PROMPTS[:2])  # the repeats: prefix-cache hits, which MEAN and CLS must skip
    for prompt, vector in zip(PROMPTS + PROMPTS[:2], got):
        want = torch.nn.functional.normalize(reference(model, prompt, pooling_type), dim=0)
        torch.testing.assert_close(torch.tensor(vector), want, atol=2e-5, rtol=1e-4)
    assert generated == embed(plain, [], generate=PROMPTS[:2])[1]  # generating beside embeddings changes nothing
    assert engine.scheduler.block_manager.num_used_blocks == 0 if hasattr(engine.scheduler, "block_manager") else True


def test_raw_and_truncated_vectors(model_and_config):
    model, config = model_and_config
    engine = make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4)
    raw, _ = embed(engine, PROMPTS[:2], PoolingParams(normalize=False))
    short, _ = embed(engine, PROMPTS[:2], PoolingParams(dimensions=8))
    for prompt, r, s in zip(PROMPTS, raw, short):
        torch.testing.assert_close(torch.tensor(r), reference(model, prompt), atol=2e-5, rtol=1e-4)
        assert len(r) == config.hidden_size and len(s) == 8
        torch.testing.assert_close(torch.tensor(s), torch.nn.functional.normalize(torch.tensor(r[:8]), dim=0))


def test_llm_embed(model_and_config):
    model, _ = model_and_config
    llm = LLM.from_engine(make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4))
    outs = llm.embed(PROMPTS[:3])
    assert [o.prompt_token_ids for o in outs] == PROMPTS[:3] and all(o.finished for o in outs)
    cos = torch.tensor(outs[0].outputs.embedding) @ torch.tensor(outs[1].outputs.embedding)
    want = torch.nn.functional.cosine_similarity(reference(model, PROMPTS[0]), reference(model, PROMPTS[1]), dim=0)
    assert abs(float(cos) - float(want)) < 1e-4 and outs[0].outputs.hidden_size == model.config.hidden_size
    with pytest.raises(ValueError, match="prompt 1"):
        llm.embed([[1, 2], []])
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("kw, error, message", [
    (dict(pooling_type="ALL"), ParamError, "LAST, MEAN, CLS"), (dict(dimensions=0), ParamError, ">= 1"),
    (dict(normalize="yes"), ParamError, "bool"), (dict(dimensions=10_000), ParamError, "hidden size 32"),
])
def test_bad_pooling_params_are_refused(model_and_config, kw, error, message):
    engine = make_engine(model_and_config)
    with pytest.raises(error, match=message):
        engine.add_request(None, [1, 2], pooling_params=PoolingParams(**kw))
    assert not engine.has_unfinished_requests()


def test_engines_that_cannot_pool_say_why(model_and_config):
    engine = make_engine(model_and_config)
    with pytest.raises(ValueError, match="not both"):
        engine.add_request(None, [1, 2], SamplingParams(), pooling_params=PoolingParams())
    with pytest.raises(TypeError, match="PoolingParams"):
        engine.add_request(None, [1, 2], pooling_params={"normalize": True})
    spec = make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4,
                       speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="speculates"):
        spec.add_request(None, [1, 2], pooling_params=PoolingParams())


def test_an_embedding_request_beside_a_failing_one_is_rerun_alone_and_pooled(model_and_config):
    """A poisoned request breaks the batched step; the step reruns one request at a time (step_isolation.py), and
    the embedding request still gets its vector, the poisoned one alone ends in "error"."""
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from test_engine import _PoisonedModel, run
    from tiny import ByteTokenizer
    model, config = model_and_config
    engine = LLMEngine(_PoisonedModel(model), ByteTokenizer(), config, EngineConfig(
        max_model_len=32, max_num_seqs=3, scheduling="continuous", kv_layout="paged", block_size=4, num_kv_blocks=24))
    engine.add_request("e", [1, 2, 3], pooling_params=PoolingParams())
    engine.add_request("poison", [99, 1], SamplingParams(max_tokens=2))
    done = run(engine)
    assert done["poison"].outputs[0].finish_reason == "error"
    torch.testing.assert_close(torch.tensor(done["e"].embedding),
                               torch.nn.functional.normalize(reference(model, [1, 2, 3]), dim=0), atol=2e-5, rtol=1e-4)


def test_llm_score_is_the_cosine_of_the_embeddings(model_and_config):
    model, _ = model_and_config
    llm = LLM.from_engine(make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4))

    def cosine(a, b):
        return float(torch.nn.functional.cosine_similarity(reference(model, a), reference(model, b), dim=0))

    one_to_many = llm.score(PROMPTS[0], PROMPTS[1:4])
    assert [o.prompt_token_ids for o in one_to_many] == PROMPTS[1:4]
    for out, other in zip(one_to_many, PROMPTS[1:4]):
        assert abs(out.outputs.score - cosine(PROMPTS[0], other)) < 1e-4
    pairwise = llm.score(PROMPTS[:2], PROMPTS[2:4])
    assert [round(o.outputs.score, 4) for o in pairwise] == [round(cosine(PROMPTS[0], PROMPTS[2]), 4),
                                                             round(cosine(PROMPTS[1], PROMPTS[3]), 4)]
    with pytest.raises(ValueError, match="two lists of one length"):
        llm.score(PROMPTS[:2], PROMPTS[:3])


@pytest.mark.parametrize("pooling_type", ["MEAN", "CLS"])
def test_pooling_restarts_after_a_recompute(model_and_config, pooling_type):
    """A generating request fills the KV pool while embedding requests' chunked prefills run: it preempts them
    by recompute mid-prefill, and their sums start again; every vector still equals the full forward's."""
    model, _ = model_and_config
    engine = make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4,
                         num_kv_blocks=12, enable_chunked_prefill=True, max_num_batched_tokens=8,
                         enable_prefix_caching=True, preemption_mode="recompute")
    gen = engine.add_request(None, list(range(60, 75)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    prompts = [list(range(10 + i, 40 + i)) for i in range(3)]
    ids = [engine.add_request(None, p, pooling_params=PoolingParams(pooling_type=pooling_type)) for p in prompts]
    done = run(engine)
    assert engine.scheduler.num_preemptions > 0
    for prompt, i in zip(prompts, ids):
        want = torch.nn.functional.normalize(reference(model, prompt, pooling_type), dim=0)
        torch.testing.assert_close(torch.tensor(done[i].embedding), want, atol=2e-5, rtol=1e-4)
    assert done[gen].outputs[0].token_ids == greedy_reference(model, list(range(60, 75)), 12)


def test_pooled_rows_refuse_a_gap():
    from minillm.pooling import PooledRows
    rows = PooledRows()
    rows.add(torch.ones(3, 4), 0)
    with pytest.raises(RuntimeError, match="position 5 after 3"):
        rows.add(torch.ones(2, 4), 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("piecewise", [False, True])
def test_gpu_pooling_beside_graph_steps(model_and_config, piecewise):
    """On CUDA (fp32, CUDA graphs, chunked prefill; piecewise graphs for the mixed steps or not): LAST / MEAN /
    CLS vectors equal the CPU's full forward's, within the Triton kernels' TF32 dots (unit vectors: 2e-4 seen,
    2e-3 allowed), while generating requests decode beside them."""
    import copy

    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from tiny import ByteTokenizer
    model, config = model_and_config
    engine = LLMEngine(copy.deepcopy(model).cuda(), ByteTokenizer(), config, EngineConfig(
        max_model_len=64, max_num_seqs=8, num_kv_blocks=128, block_size=16, enable_chunked_prefill=True,
        max_num_batched_tokens=16, piecewise_cuda_graphs=piecewise), device="cuda", dtype=torch.float32)
    for kind in ("LAST", "MEAN", "CLS"):
        got, _ = embed(engine, PROMPTS, PoolingParams(kind), generate=PROMPTS[:2])
        for prompt, vector in zip(PROMPTS, got):
            want = torch.nn.functional.normalize(reference(model, prompt, kind), dim=0)
            torch.testing.assert_close(torch.tensor(vector), want, atol=2e-3, rtol=0)
