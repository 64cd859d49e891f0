"""Piecewise CUDA graphs (minillm/engine/piecewise_graph.py): the buckets on any machine; on a GPU, replayed
mixed prefill + decode steps against eager ones, and the engine's greedy outputs with chunked prefill and prefix
caching against an eager engine."""
from __future__ import annotations

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.piecewise_graph import TOKEN_BUCKETS, PiecewiseCUDAGraphs, token_buckets
from minillm.sampling_params import SamplingParams
from test_triton_backend import tiny_model
from tiny import ByteTokenizer, one_thread, run_to_completion  # noqa: F401  (one_thread: autouse fixture)


def test_token_buckets_cover_every_count_up_to_the_limit():
    assert token_buckets(16) == [16]
    assert token_buckets(5) == [5]
    assert token_buckets(100) == [16, 24, 32, 48, 64, 96, 100]
    assert token_buckets(8192) == list(TOKEN_BUCKETS)  # beyond 2048 a step is long enough to run eagerly
    for low, high in zip(TOKEN_BUCKETS, TOKEN_BUCKETS[1:]):
        assert high <= 1.5 * low  # at most half a bucket of padding
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="max_tokens"):
            token_buckets(bad)


def test_piecewise_graphs_refuse_a_cpu_and_a_model_without_attention():
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="CUDA device"):
        PiecewiseCUDAGraphs(model, [model], 64, torch.device("cpu"))
    with pytest.raises(TypeError, match="piecewise_cuda_graphs"):
        EngineConfig(piecewise_cuda_graphs="yes")


def test_piecewise_graphs_are_on_wherever_decode_graphs_are_unless_asked_otherwise():
    from minillm.engine.cache_config import resolve_engine_config
    _, config = tiny_model()

    def resolved(device: str, **kw) -> tuple[bool, bool]:
        c = resolve_engine_config(EngineConfig(**kw), config, torch.device(device))
        return c.enforce_eager, c.piecewise_cuda_graphs
    assert resolved("cuda") == (False, True)
    assert resolved("cpu") == (True, False)
    assert resolved("cuda", enforce_eager=True) == (True, False)
    assert resolved("cuda", piecewise_cuda_graphs=False) == (False, False)


def _greedy(model, config, prompts, **engine_kw) -> list[list[int]]:
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(max_model_len=256, max_num_seqs=8,
                                                                    num_kv_blocks=96, **engine_kw),
                       device=torch.device("cuda"), dtype=torch.float32)
    return run_to_completion(engine, prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("shape", [{}, {"qk_norm": True, "head_dim": 16}], ids=["llama", "qwen3"])
def test_piecewise_engine_matches_eager_with_chunked_prefill_and_prefix_caching(shape):
    """(qwen3: the cut at each attention carries its q/k norms into the eager piece)"""
    with torch.device("cuda"):
        model, config = tiny_model(seed=5, backend="triton", max_position_embeddings=256, **shape)
    shared = list(range(10, 60))  # a 50-token prefix the later prompts hit in the cache
    prompts = [shared + [3, 4], list(range(100, 141)), shared + [7] * 9, [5, 9, 200], shared, list(range(1, 90))]
    kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=40, enable_prefix_caching=True)
    eager = _greedy(model, config, prompts, enforce_eager=True, **kw)
    piecewise = _greedy(model, config, prompts, enforce_eager=False, piecewise_cuda_graphs=True, **kw)
    assert piecewise == eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_piecewise_runner_records_one_graph_per_layer_plus_one_and_replays_mixed_steps():
    with torch.device("cuda"):
        model, config = tiny_model(seed=6, backend="triton", max_position_embeddings=256)
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(max_model_len=256, max_num_seqs=4, num_kv_blocks=64, enforce_eager=False,
                                    piecewise_cuda_graphs=True, max_num_batched_tokens=100,
                                    enable_chunked_prefill=True),  # a step budget under max_model_len needs it
                       device=torch.device("cuda"), dtype=torch.float32)
    graphs = engine.runner.piecewise_graphs
    assert graphs is not None and graphs.buckets == [16, 24, 32, 48, 64, 96, 100]
    assert all(len(g) == config.num_hidden_layers + 1 for g in graphs.graphs.values())
    calls = []
    run = graphs.run
    graphs.run = lambda *a: calls.append(a[0].shape[0]) or run(*a)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request(None, [1, 2, 3], params)
    engine.step()  # a 3-token prompt alone: the whole-forward prompt graph of bucket 16, not the pieces
    engine.add_request(None, list(range(20, 50)), params)
    engine.step()  # the 30-token prompt with the first request's decode: 31 tokens, one mixed step
    assert calls == [31]
    assert engine.runner.forward_counts["prompt_graph"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_prompt_graphs_replay_lone_prompts_and_match_eager():
    """A step that is one fresh prompt replays the whole forward of its token bucket (attention included):
    prompts at and across bucket edges, one at a time, give the eager engine's greedy tokens, and every prefill
    of more than one token was a prompt-graph replay; a prompt longer than the largest bucket is chunked, and its
    second chunk (with cached context) runs piecewise."""
    with torch.device("cuda"):
        model, config = tiny_model(seed=8, backend="triton", max_position_embeddings=256)
    prompts = [[7], list(range(3, 19)), list(range(30, 47)), list(range(50, 90)), list(range(1, 100)),
               list(range(100, 230))]
    kw = dict(max_num_batched_tokens=128, enable_chunked_prefill=True)  # the 130-token prompt: two chunks
    eager = [_greedy(model, config, [p], enforce_eager=True, **kw)[0] for p in prompts]
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(max_model_len=256, max_num_seqs=8, num_kv_blocks=96, enforce_eager=False, **kw),
                       device=torch.device("cuda"), dtype=torch.float32)
    assert engine.runner.prompt_graphs.buckets == [16, 24, 32, 48, 64, 96, 128]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    got = [run_to_completion(engine, [p], params)[0] for p in prompts]
    assert got == eager
    counts = engine.runner.forward_counts
    # every prompt's first (or only) chunk but the one-token prompt's (a decode graph takes a step of one token
    # per sequence); the 130-token prompt's second chunk has cached context: the pieces
    assert counts["prompt_graph"] == len(prompts) - 1 and counts["piecewise"] == 1 and counts["eager"] == 0, counts


def test_prompt_graphs_refuse_a_cpu():
    from minillm.engine.prompt_graph import PromptCUDAGraphs
    model, _ = tiny_model()
    with pytest.raises(ValueError, match="CUDA device"):
        PromptCUDAGraphs(model, 64, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_token_tree_verify_steps_replay_graphs_and_match_eager():
    """ngram_tree's verify steps carry a tree mask: the tree graphs (cuda_graph.py, a static tree-mask input) replay
    them, the prefills go through the pieces, nothing runs eagerly. Greedy outputs equal the eager engine's."""
    with torch.device("cuda"):
        model, config = tiny_model(seed=7, backend="triton", max_position_embeddings=256)
    motif = [11, 12, 13, 14, 15, 16]
    prompts = [motif * 4 + [11, 12], [40, 41, 42, 40, 41, 43, 40, 41], list(range(60, 70)) * 3]
    spec = {"method": "ngram_tree", "num_speculative_tokens": 3}
    eager = _greedy(model, config, prompts, enforce_eager=True, speculative_config=spec)
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(max_model_len=256, max_num_seqs=8, num_kv_blocks=96, enforce_eager=False,
                                    piecewise_cuda_graphs=True, speculative_config=spec),
                       device=torch.device("cuda"), dtype=torch.float32)
    pieces = engine.runner.piecewise_graphs
    assert pieces is not None
    tree_steps = []
    run = pieces.run
    pieces.run = lambda ids, pos: tree_steps.append(ids.shape[0]) or run(ids, pos)
    got = run_to_completion(engine, prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert got == eager
    counts = engine.runner.forward_counts
    assert tree_steps and counts["piecewise"] == len(tree_steps)  # the prefills
    assert counts["graph"] > 0 and counts["eager"] == 0, counts  # the tree verify steps: tree graphs
