"""Logits processors (presence / frequency / repetition penalties, logit_bias, min_tokens, min_p) on a tiny random
Llama: the operators against plain loops, and the engine's greedy tokens against a reference that applies the
same rules by hand to full forwards (no KV cache), under every scheduling path that changes what a step holds."""
from __future__ import annotations

import pytest
import torch

from minillm.layers.logits_processors import apply_penalties, min_p_filter
from minillm.sampling_params import ParamError, SamplingParams
from test_engine import make_engine, model_and_config  # noqa: F401  (fixture)
from tiny import EOS, one_thread, run_to_completion  # noqa: F401  (one_thread: autouse fixture)


def penalized_reference(logits: torch.Tensor, prompt: list[int], output: list[int], presence: float,
                        frequency: float, repetition: float) -> torch.Tensor:
    """One row, token by token, as the rules read (CTRL's repetition penalty, OpenAI's frequency/presence)."""
    out = logits.clone()
    for token in set(prompt) | set(output):
        out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token in set(output):
        out[token] -= frequency * output.count(token) + presence
    return out


def test_apply_penalties_matches_the_rules_row_by_row():
    torch.manual_seed(0)
    vocab = 12
    rows = [([0, 3, 3, 5], [3, 0, 0, 7, 7, 7]), ([1, 2], []), ([0], [0]), ([4, 4, 9], [11])]
    logits = torch.randn(len(rows), vocab) * 3
    width = max(len(p) + len(o) for p, o in rows)
    history = torch.full((len(rows), width), -1, dtype=torch.int64)
    is_output = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, o) in enumerate(rows):
        history[i, :len(p) + len(o)] = torch.tensor(p + o)
        is_output[i, len(p):] = True  # padding marked "output" too: it must still count for nothing
    presence, frequency, repetition = torch.tensor([0.5, 1.0, -0.3, 0.0]), torch.tensor([0.25, 0.0, 2.0, 0.7]), \
        torch.tensor([1.3, 2.0, 0.8, 1.0])
    got = apply_penalties(logits, history, is_output, presence, frequency, repetition)
    for i, (p, o) in enumerate(rows):
        want = penalized_reference(logits[i], p, o, float(presence[i]), float(frequency[i]), float(repetition[i]))
        torch.testing.assert_close(got[i], want)


def test_min_p_keeps_tokens_at_least_min_p_times_the_best():
    scaled = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    kept = min_p_filter(scaled, torch.tensor([0.5, 1.0])).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert min_p_filter(scaled, torch.tensor([0.0, 0.0])).isfinite().all()


def processed_greedy(model, prompt: list[int], n: int, params: SamplingParams, eos: int = EOS) -> list[int]:
    """n greedy tokens by full forwards, each step's logits processed by hand: min_tokens' ban, the bias, then the
    penalties (vLLM's order); stops after EOS as the engine does."""
    tokens, out = list(prompt), []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.tensor(tokens, device=device)
            logits = model.compute_logits(model(ids, torch.arange(len(tokens), device=device))[-1:])[0].float().cpu()
            if len(out) < params.min_tokens:
                logits[[eos, *params.stop_token_ids]] = float("-inf")
            for token, bias in (params.logit_bias or {}).items():
                logits[token] += bias
            logits = penalized_reference(logits, prompt, out, params.presence_penalty, params.frequency_penalty,
                                         params.repetition_penalty)
            token = int(logits.argmax())
            tokens.append(token)
            out.append(token)
            if token == eos or token in params.stop_token_ids:
                break
    return out


PROMPTS = [[5, 9, 200, 9, 9], [17] * 11, list(range(40, 59)), [3]]
PROCESSORS = {
    "repetition": dict(repetition_penalty=1.8),
    "frequency+presence": dict(frequency_penalty=0.2, presence_penalty=0.1),  # mild: tokens still repeat
    "all": dict(repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=-0.4,
                logit_bias={7: 2.5, 11: -100}),
}
ENGINES = {
    "static": {},
    "paged, chunked prefill, recompute": dict(scheduling="continuous", kv_layout="paged", block_size=4,
                                              num_kv_blocks=14, max_num_batched_tokens=8, enable_chunked_prefill=True,
                                              enable_prefix_caching=True),
    "async": dict(scheduling="continuous", kv_layout="paged", async_scheduling=True),
}


@pytest.mark.parametrize("engine_name", ENGINES)
@pytest.mark.parametrize("name", PROCESSORS)
def test_engine_greedy_with_processors_matches_reference(model_and_config, name, engine_name):
    model, _ = model_and_config
    engine = make_engine(model_and_config, **ENGINES[engine_name])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, **PROCESSORS[name])
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    # a request without processors shares the batch and keeps its own plain tokens
    got = run_to_completion(engine, PROMPTS + [PROMPTS[0]], [params] * len(PROMPTS) + [plain])
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == processed_greedy(model, prompt, 12, params, eos=-1)
    assert got[-1] == processed_greedy(model, PROMPTS[0], 12, plain, eos=-1)
    assert got[0] != got[-1]  # the processors changed something (else this test could not fail)


def test_min_tokens_bans_stop_tokens_until_reached(model_and_config):
    model, _ = model_and_config
    prompt = PROMPTS[2]
    first = processed_greedy(model, prompt, 3, SamplingParams(temperature=0, ignore_eos=True), eos=-1)
    stop = [first[1]]  # greedy would stop at its second token
    engine = make_engine(model_and_config, scheduling="continuous", kv_layout="paged")
    short, held = run_to_completion(engine, [prompt, prompt], [
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=stop),
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=stop, min_tokens=6)])
    assert short == first[:2]
    assert len(held) >= 6 and stop[0] not in held[:6] and EOS not in held[:6]
    assert held == processed_greedy(model, prompt, 10, SamplingParams(temperature=0, max_tokens=10,
                                                                      stop_token_ids=stop, min_tokens=6))


def test_min_p_one_is_greedy_and_logit_bias_forces_a_token(model_and_config):
    engine = make_engine(model_and_config, scheduling="continuous", kv_layout="paged")
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sampled_min_p_1 = SamplingParams(temperature=1.0, min_p=1.0, max_tokens=8, ignore_eos=True, seed=3)
    forced = SamplingParams(temperature=0.7, max_tokens=8, ignore_eos=True, logit_bias={"42": 100}, seed=4)
    g, m, f = run_to_completion(engine, [PROMPTS[2]] * 3, [greedy, sampled_min_p_1, forced])
    assert m == g and f == [42] * 8


def test_bad_processor_values_are_refused_with_the_field(model_and_config):
    cases = [(dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=float("nan")),
             "frequency_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_p=-0.1), "min_p"),
             (dict(min_tokens=17), "min_tokens"), (dict(logit_bias={"a": 1}), "logit_bias"),
             (dict(logit_bias={1: 101}), "logit_bias"), (dict(logit_bias=[1]), "logit_bias"),
             (dict(logit_bias={"\u00b2": 1}), "logit_bias"), (dict(logit_bias={"9" * 5000: 1}), "logit_bias")]
    for kw, field in cases:
        with pytest.raises(ParamError, match=field) as err:
            SamplingParams(**kw)
        assert err.value.param == field
    engine = make_engine(model_and_config)
    with pytest.raises(ParamError, match=r"logit_bias token id 300 is outside the vocabulary \[0, 300\)"):
        engine.add_request(None, [1, 2], SamplingParams(logit_bias={300: 1.0}))
    assert not engine.has_unfinished_requests()


def test_server_passes_the_processors_through():
    """The OpenAI fields reach the engine: a +100 bias on byte 42 ('*') makes every greedy token a '*'."""
    import httpx

    from minillm.serve.server import ServerThread
    from serve_tiny import tiny_app

    app, _ = tiny_app()
    with ServerThread(app) as srv:
        body = {"prompt": "abc", "max_tokens": 4, "temperature": 0, "logit_bias": {"42": 100},
                "frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.2, "min_p": 0.1,
                "min_tokens": 2}
        done = httpx.post(srv.url + "/v1/completions", json=body, timeout=30).json()
        assert done["choices"][0]["text"] == "****", done


SPEC_PROMPTS = [[5, 9, 5, 9, 5, 9, 5], [17] * 11, list(range(40, 59))]
SPEC_PROCESSORS = (PROCESSORS["frequency+presence"], dict(repetition_penalty=1.1, logit_bias={9: 3.0}, min_tokens=4),
                   PROCESSORS["all"])  # mild enough that the outputs repeat themselves: prompt lookup finds drafts


def _spec_engine(model_and_config, spec: dict):
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from tiny import ByteTokenizer

    model, config = model_and_config
    return LLMEngine(model, ByteTokenizer(), config, EngineConfig(block_size=4, num_kv_blocks=96, max_model_len=64,
                                                                  max_num_seqs=4, speculative_config=spec))


@pytest.mark.parametrize("method", ["ngram", "lookahead", "draft_model", "ngram_tree"])
def test_verify_steps_apply_processors_row_by_row(model_and_config, method):
    """Each verified row sees the drafts on its path as history (a chain's earlier drafts, a tree node's
    ancestors), so greedy speculation with processors gives the plain engine's processed tokens (with drafts
    accepted: else this test could not fail)."""
    model, _ = model_and_config
    spec = {"method": method, "num_speculative_tokens": 3}
    spec.update({"ngram": {"prompt_lookup_min": 1}, "draft_model": {"draft_num_layers": 1}}.get(method, {}))
    engine = _spec_engine(model_and_config, spec)
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kw) for kw in SPEC_PROCESSORS]
    got = run_to_completion(engine, SPEC_PROMPTS, params)
    for prompt, p, tokens in zip(SPEC_PROMPTS, params, got):
        assert tokens == processed_greedy(model, prompt, 16, p, eos=-1)
    assert engine.speculative.metrics.num_accepted_tokens > 0


@pytest.mark.parametrize("method", ["draft_model", "ngram_tree"])
def test_rejection_rules_read_the_processed_distribution(model_and_config, method):
    """Where verification reads probabilities (drafts sampled from a draft model's q; token trees at temperature
    > 0), the step returns the processed logits with min_p's removals. With min_p = 1 at temperature 1 that
    distribution is one-hot at the processed argmax, so every token must be the processed greedy one: raw
    logits would put the mass on the raw argmax and part from the reference."""
    model, _ = model_and_config
    spec = {"method": method, "num_speculative_tokens": 3}
    spec.update({"draft_model": {"draft_num_layers": 1}}.get(method, {}))
    engine = _spec_engine(model_and_config, spec)
    params = [SamplingParams(temperature=1.0, min_p=1.0, max_tokens=16, ignore_eos=True, seed=i, **kw)
              for i, kw in enumerate(SPEC_PROCESSORS)]
    got = run_to_completion(engine, SPEC_PROMPTS, params)
    for prompt, p, tokens in zip(SPEC_PROMPTS, params, got):
        assert tokens == processed_greedy(model, prompt, 16, p, eos=-1)
    assert engine.speculative.metrics.num_verify_steps > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_processors_under_cuda_graphs_sync_and_async():
    """On the GPU decode steps replay CUDA graphs that compute greedy tokens in the replay; rows with processors
    are sampled again from the graph's logits, and under async scheduling their history's last token is the
    deferred one the graph gathered; prompt lookup's verify steps replay q_len 1 + k graphs, its token trees tree
    graphs. fp32; the reference applies the rules by hand to full forwards."""
    import random

    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.engine.worker import RandomWeights
    from test_engine import tiny_config
    from tiny import ByteTokenizer

    config = tiny_config(num_hidden_layers=2, hidden_size=128, intermediate_size=256, max_position_embeddings=256)
    model = RandomWeights(seed=3)(config, torch.device("cuda"), torch.float32)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(3, 40))] for _ in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, **kw) for kw in
              (PROCESSORS["repetition"], PROCESSORS["frequency+presence"], PROCESSORS["all"], {})] * 2
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}  # verify graphs, q_len 4
    tree = {"method": "ngram_tree", "num_speculative_tokens": 3}  # tree graphs: rows see their ancestors only
    for options in (dict(async_scheduling=False), dict(async_scheduling=True), dict(speculative_config=spec),
                    dict(speculative_config=tree)):
        engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(
            block_size=16, kv_cache_memory=16 << 20, max_model_len=128, max_num_seqs=8, **options),
            device="cuda", dtype=torch.float32)
        assert engine.runner.cuda_graphs is not None
        got = run_to_completion(engine, prompts, params[:len(prompts)])
        assert engine.runner.forward_counts["graph"] > 0
        for prompt, p, tokens in zip(prompts, params, got):
            assert tokens == processed_greedy(model, prompt, 16, p, eos=-1), (options, p)


def test_a_tree_nodes_history_is_its_path():
    """processing_tensors on a verify step of one token tree (root, two children of the root, a grandchild under
    the first): each node's history is the host's tokens, then its ancestors' and its own, in order; min_tokens'
    ban counts the same path."""
    from minillm.engine.step_input import LogitsProcessing, SamplingSpec
    from minillm.layers.logits_processors import processing_tensors

    proc = LogitsProcessing(stop_ids=(5,), min_tokens=3, logit_bias=(), min_p=0.0, presence_penalty=0.5,
                            frequency_penalty=0.0, repetition_penalty=1.0, history=[10, 11], start=2,
                            num_prompt_tokens=1)
    specs = [SamplingSpec("r", 0.0, -1, 1.0, None, proc)] * 4
    masks = [[0b1, 0b11, 0b101, 0b1011]]
    t = processing_tensors(specs, [0] * 4, torch.tensor([20, 21, 22, 23]), [0, 4], [4], 50, masks)
    paths = [[10, 11, 20], [10, 11, 20, 21], [10, 11, 20, 22], [10, 11, 20, 21, 23]]
    assert t.history.tolist() == [p + [-1] * (5 - len(p)) for p in paths]
    assert t.is_output[:, 1:].all() and not t.is_output[:, 0].any()
    assert t.ban_rows.tolist() == [0] and t.ban_ids.tolist() == [5]  # 1 output before the root's sample, 2 after
    chain = processing_tensors(specs, [0] * 4, torch.tensor([20, 21, 22, 23]), [0, 4], [4], 50)
    assert chain.history[3].tolist() == [10, 11, 20, 21, 22, 23]  # without masks: a chain, every row before
