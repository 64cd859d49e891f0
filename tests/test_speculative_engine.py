"""Speculative decoding in the engine: every proposer keeps the target's output exactly (chapter 9).

For ngram, lookahead, self_speculative and draft_model: greedy requests give token-identical output to plain
decoding, with plenty of KV blocks and under pressure (preemption), mixed with sampled requests and different
max_tokens; no block of the engine's or the draft's pool is left held. With a sampling draft model, the engine's
tokens have the target's distribution (chi-square against the exact law of a tiny-vocabulary model). Metrics:
acceptance 1.0 when the draft is the target itself. Config validation names the bad value.
"""
from __future__ import annotations

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.sampling_params import SamplingParams
from minillm.speculative.config import SpeculativeConfig, verify_query_lens
from test_engine import tiny_config, tiny_model
from test_speculative_core import _chi_square_p_value
from tiny import ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)

K = 3
TEMPERATURE = 0.4  # the chi-square test: sharp enough that draft and target laws differ clearly
PROMPTS = [list(range(10, 20)) * 2, [5, 6, 7, 5, 6, 7, 5, 6], [99, 98, 97, 96, 95], [40, 41, 40, 41, 40]]
GREEDY = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 14, 20, 9)]
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True, seed=3)
METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 3},
    "lookahead": {"method": "lookahead", "num_speculative_tokens": K},
    "self_speculative": {"method": "self_speculative", "num_speculative_tokens": K, "draft_num_layers": 2},
    "draft_model": {"method": "draft_model", "num_speculative_tokens": K, "draft_num_layers": 1},
}


@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config(num_hidden_layers=3)
    return tiny_model(config), config


def run(model_and_config, spec, num_blocks=64, requests=None, **engine_kwargs):
    """(outputs by request id, the engine) after running `requests` (default: PROMPTS, greedy) to the end."""
    model, config = model_and_config
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=num_blocks, max_model_len=64, max_num_seqs=4,
                                    speculative_config=spec, **engine_kwargs))
    requests = requests if requests is not None else list(zip(PROMPTS, GREEDY))
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        if engine.speculative is not None:  # state only for running requests: preempted / finished ones freed
            running = {seq.request_id for seq in engine.scheduler.running}
            assert engine.speculative.proposer.active_requests() <= running
    return outputs, engine


def pair_law_p_value(model, prompt: list[int], tokens: torch.Tensor, temperature: float) -> float:
    """Chi-square p-value that the first two sampled tokens of every row of tokens [n, >= 2] follow the target's
    exact law for them after `prompt`, p(a) p(b | a) at `temperature` (a cache-less forward per prefix); pairs
    expected fewer than 5 times are pooled into one cell, as the test needs."""
    from minillm.speculative.train_data import record_features
    vocab, n = model.config.vocab_size, tokens.shape[0]

    @torch.no_grad()
    def next_law(prefix: list[int]) -> torch.Tensor:
        hidden = record_features(model, torch.tensor([prefix]), torch.device("cpu"))[0, -1:]
        return torch.softmax(model.compute_logits(model.model.norm(hidden)).double() / temperature, -1)[0]

    first = next_law(prompt)
    second = torch.stack([next_law(prompt + [a]) for a in range(vocab)])  # [a, b]
    pair_law = (first[:, None] * second).flatten()
    counts = torch.bincount(tokens[:, 0] * vocab + tokens[:, 1], minlength=vocab * vocab).double()
    keep = pair_law * n >= 5
    counts = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    expected = torch.cat([pair_law[keep], pair_law[~keep].sum(0, keepdim=True)]) * n
    if float(expected[-1]) < 5:
        counts, expected = counts[:-1], expected[:-1] * (n / float(expected[:-1].sum()))
    return _chi_square_p_value(counts, expected)


def assert_nothing_held(engine):
    assert engine.speculative.num_propose_errors == 0  # a failing proposer only costs speed: make it visible
    assert engine.scheduler.block_manager.num_used_blocks == 0
    draft_pool = getattr(engine.speculative.proposer, "block_manager", None)
    if draft_pool is not None:
        assert draft_pool.num_used_blocks == 0
    assert not engine.speculative.proposer.active_requests()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("num_blocks", [64, 12])  # 12 blocks of 4 slots: four requests preempt each other
def test_greedy_output_equals_plain_decoding(model_and_config, method, num_blocks):
    plain, _ = run(model_and_config, None, num_blocks)
    mixed = list(zip(PROMPTS, GREEDY)) + [(PROMPTS[1], SAMPLED)]  # a sampled request in the same batches
    outputs, engine = run(model_and_config, METHODS[method], num_blocks, requests=mixed)
    for rid, out in plain.items():
        assert outputs[rid].outputs[0].token_ids == out.outputs[0].token_ids, (method, rid)
    assert len(outputs["4"].outputs[0].token_ids) == SAMPLED.max_tokens
    if num_blocks == 12:
        assert engine.scheduler.num_preemptions > 0  # the pressure case really preempted
    assert_nothing_held(engine)
    totals = engine.speculative.metrics
    assert totals.num_verify_steps > 0 and totals.num_draft_tokens > 0
    assert 0 <= totals.num_accepted_tokens <= totals.num_draft_tokens
    per_request = [o.metrics.spec_decode for o in outputs.values()]
    assert sum(m.num_accepted_tokens for m in per_request) == totals.num_accepted_tokens
    assert sum(m.num_draft_tokens for m in per_request) == totals.num_draft_tokens


def test_verify_rows_beside_prefill_chunks_go_to_their_own_sequences(model_and_config):
    """A verify step (1 + k sampled rows) beside another request's prefill chunks (0 sampled rows): when the rows
    happen to total the number of sequences, each sequence still gets its own rows (a one-row-per-sequence
    shortcut once handed them out in order and failed the whole batch)."""
    model, config = model_and_config
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    first, second = ([5, 6, 7] * 3 + [5, 6], greedy(12)), (list(range(30, 60)), greedy(6))
    chunked = dict(enable_chunked_prefill=True, max_num_batched_tokens=8)
    plain = {rid: run(model_and_config, None, requests=[req], **chunked)[0]["0"].outputs[0].token_ids
             for rid, req in (("a", first), ("b", second))}
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(
        block_size=4, num_kv_blocks=64, max_model_len=64, max_num_seqs=4, **chunked,
        speculative_config={"method": "ngram", "num_speculative_tokens": 1, "prompt_lookup_min": 1}))
    engine.add_request("a", *first)
    for _ in range(3):  # "a" is decoding (verifying one draft a step) when "b" arrives and is prefilled in chunks
        engine.step()
    engine.add_request("b", *second)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    for rid in "ab":
        assert done[rid].finish_reason == "length", done[rid]
        assert done[rid].token_ids == plain[rid], rid
    assert engine.speculative.metrics.num_draft_tokens > 0
    assert_nothing_held(engine)


def test_seeded_streams_survive_preemption_and_end_with_the_request(model_and_config):
    """A seeded sampled request keeps its random streams (the rejection rule's, the draft's) while it is preempted:
    a fresh stream on resumption would replay numbers it had already used. Once it finishes they are dropped."""
    model, config = model_and_config
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(
        block_size=4, num_kv_blocks=12, max_model_len=64, max_num_seqs=4, speculative_config=METHODS["draft_model"]))
    seeded = [SamplingParams(temperature=0.8, max_tokens=m, ignore_eos=True, seed=i) for i, m in enumerate(
        (20, 14, 20, 9))]
    for i, (prompt, params) in enumerate(zip(PROMPTS, seeded)):
        engine.add_request(str(i), prompt, params)
    decoder, first_seen, held_while_preempted = engine.speculative, {}, set()
    while engine.has_unfinished_requests():
        engine.step()
        waiting = {seq.request_id for seq in engine.scheduler.waiting} | {
            seq.request_id for seq in engine.scheduler.swapped}
        for streams in (decoder._generators, decoder.proposer._generators):
            for rid, generator in streams.items():
                assert first_seen.setdefault((id(streams), rid), generator) is generator, rid  # never restarted
                if rid in waiting:
                    held_while_preempted.add(rid)
    assert engine.scheduler.num_preemptions > 0 and held_while_preempted
    assert not decoder._generators and not decoder.proposer._generators
    assert_nothing_held(engine)


def test_self_speculation_with_every_layer_accepts_everything(model_and_config):
    _, config = model_and_config
    spec = dict(METHODS["self_speculative"], draft_num_layers=config.num_hidden_layers)  # the draft IS the target
    plain, _ = run(model_and_config, None)
    outputs, engine = run(model_and_config, spec)
    assert {r: o.outputs[0].token_ids for r, o in outputs.items()} == \
        {r: o.outputs[0].token_ids for r, o in plain.items()}
    metrics = engine.speculative.metrics
    assert metrics.acceptance_rate == 1.0
    assert metrics.acceptance_by_position == [1.0] * K
    assert metrics.mean_acceptance_length > 3.0  # k + 1 = 4, less only where max_tokens cut the last drafts
    assert outputs["0"].metrics.spec_decode.acceptance_rate == 1.0
    assert engine.num_steps < sum(len(o.outputs[0].token_ids) for o in plain.values()) / 2


def test_a_bad_draft_model_still_gives_the_plain_output_and_low_acceptance(model_and_config):
    plain, _ = run(model_and_config, None)
    outputs, engine = run(model_and_config, dict(METHODS["draft_model"]))
    assert {r: o.outputs[0].token_ids for r, o in outputs.items()} == \
        {r: o.outputs[0].token_ids for r, o in plain.items()}
    assert engine.speculative.metrics.acceptance_rate < 0.5  # a one-layer copy of a random model guesses badly


def test_a_failing_proposer_costs_drafts_not_requests(model_and_config, monkeypatch, caplog):
    from minillm.speculative.proposer import NGramProposer

    def broken(self, seqs, num_tokens):
        raise RuntimeError("proposer bug")
    monkeypatch.setattr(NGramProposer, "propose", broken)
    plain, _ = run(model_and_config, None)
    outputs, engine = run(model_and_config, METHODS["ngram"])
    assert {r: o.outputs[0].finish_reason for r, o in outputs.items()} == {r: "length" for r in plain}
    assert {r: o.outputs[0].token_ids for r, o in outputs.items()} == \
        {r: o.outputs[0].token_ids for r, o in plain.items()}
    assert engine.speculative.num_propose_errors > 0 and "proposer bug" in caplog.text


def test_disable_by_batch_size_switches_speculation_off(model_and_config):
    spec = dict(METHODS["self_speculative"], disable_by_batch_size=2)
    plain, _ = run(model_and_config, None)
    outputs, engine = run(model_and_config, spec)
    assert {r: o.outputs[0].token_ids for r, o in outputs.items()} == \
        {r: o.outputs[0].token_ids for r, o in plain.items()}
    metrics = engine.speculative.metrics
    assert metrics.num_plain_steps > 0 and metrics.num_verify_steps > 0  # off with 4 running, on with <= 2


def test_sampled_drafts_keep_the_target_distribution():
    """A one-layer draft sampling at temperature 1 against a two-layer target, vocabulary 8: the tokens the
    verify step emits (2nd and 3rd generated) follow the target's exact law, computed here by full forwards."""
    vocab, n = 8, 600
    config = tiny_config(vocab_size=vocab, num_hidden_layers=2)
    model = tiny_model(config, seed=5)
    prompt = [1, 2, 3]
    spec = {"method": "draft_model", "num_speculative_tokens": 2, "draft_num_layers": 1}
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=4 * n, max_model_len=16, max_num_seqs=n,
                                    speculative_config=spec), seed=11)
    params = SamplingParams(temperature=TEMPERATURE, max_tokens=3, ignore_eos=True)
    for i in range(n):
        engine.add_request(str(i), prompt, params)
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [o.outputs[0].token_ids for o in engine.step() if o.finished]
    tokens = torch.tensor(tokens)
    assert tokens.shape == (n, 3)

    assert pair_law_p_value(model, prompt, tokens, TEMPERATURE) > 1e-3
    metrics = engine.speculative.metrics
    assert 0.05 < metrics.acceptance_rate < 0.95  # both the accept and the residual branch were exercised
    assert_nothing_held(engine)


def graph_shaped_engine(model_and_config, spec):
    """An engine whose verify steps must have 1 + k rows, as a GPU engine with CUDA graphs pads them (pad_drafts),
    and the list of draft counts its verify steps carried."""
    model, config = model_and_config
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=64, max_num_seqs=4,
                                    speculative_config=spec))
    engine.speculative.pad_drafts = True
    widths, verify = [], engine.speculative.verify

    def recording_verify(batch, output):
        widths.extend(len(seq.spec_token_ids) for seq in batch.seqs if seq.spec_token_ids)
        return verify(batch, output)
    engine.speculative.verify = recording_verify
    return engine, widths


def finish_all(engine, requests):
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    return outputs


@pytest.mark.parametrize("method", ["ngram", "self_speculative"])
def test_graph_shaped_verify_steps_carry_k_drafts_to_the_end(model_and_config, method):
    """Near its end a request whose max_tokens leaves room for fewer than k drafts still drafts k where the
    graphs need 1 + k rows (a shorter step would miss them); the output is still plain decoding's."""
    engine, widths = graph_shaped_engine(model_and_config, METHODS[method])
    outputs = finish_all(engine, list(zip(PROMPTS, GREEDY)))
    plain, _ = run(model_and_config, None)
    for rid, out in plain.items():
        assert outputs[rid].outputs[0].token_ids == out.outputs[0].token_ids, rid
    assert widths and set(widths) == {K}
    assert_nothing_held(engine)


def test_drafts_accepted_past_max_tokens_are_neither_emitted_nor_counted(model_and_config):
    """Full-depth self-speculation accepts every draft: 7 tokens = the prefill's, then a step of 3 drafts + 1, then
    3 padded drafts of which only 2 may be emitted. The metrics count the 4 drafts accepted and emitted, not 6."""
    _, config = model_and_config
    spec = dict(METHODS["self_speculative"], draft_num_layers=config.num_hidden_layers)
    engine, widths = graph_shaped_engine(model_and_config, spec)
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    out = finish_all(engine, [(PROMPTS[0], params)])["0"]
    plain, _ = run(model_and_config, None, requests=[(PROMPTS[0], params)])
    assert out.outputs[0].token_ids == plain["0"].outputs[0].token_ids
    metrics = out.metrics.spec_decode
    assert widths == [K, K]
    assert (metrics.num_verify_steps, metrics.num_accepted_tokens, metrics.num_draft_tokens) == (2, 4, 2 * K)
    assert_nothing_held(engine)


def test_ngram_index_proposes_what_the_prompt_lookup_scan_finds():
    """The proposer's incremental n-gram index against ngram.propose_prompt_lookup's scan, as sequences grow by
    one or several tokens a step (a verify step appends up to k + 1)."""
    from minillm.engine.sequence import Sequence
    from minillm.speculative.ngram import propose_prompt_lookup
    from minillm.speculative.proposer import NGramProposer
    g = torch.Generator().manual_seed(0)
    for max_n, min_n in ((3, 1), (4, 2), (1, 1)):
        proposer = NGramProposer(max_n, min_n)
        seqs = [Sequence(str(i), torch.randint(0, 4, (int(torch.randint(1, 6, (1,), generator=g)),),
                                               generator=g).tolist(), GREEDY[0]) for i in range(3)]
        for _ in range(25):
            k = int(torch.randint(1, 5, (1,), generator=g))
            expected = [propose_prompt_lookup(s.token_ids, k, max_n, min_n) for s in seqs]
            assert proposer.propose(seqs, [k] * len(seqs)) == expected
            for s in seqs:
                s.token_ids += torch.randint(0, 4, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        assert proposer.active_requests() == {"0", "1", "2"}
        proposer.free("1")
        assert proposer.active_requests() == {"0", "2"}


def test_lookahead_drafts_the_refreshed_jacobi_window_and_pool_ngrams():
    from minillm.engine.sequence import Sequence
    from minillm.speculative.lookahead import LookaheadProposer
    proposer = LookaheadProposer(ngram=3)
    seq = Sequence("r", [1, 2, 3], GREEDY[0])
    assert proposer.propose([seq], [3]) == [[]]  # nothing known yet after token 3
    # a verify step: drafts [7, 8, 9]; the target's samples at the four rows were [7, 5, 6, 4]: 7 accepted, 5 emitted
    proposer.observe(seq, [7, 8, 9], [7, 5, 6, 4])
    seq.token_ids += [7, 5]
    assert proposer.propose([seq], [3]) == [[6, 4]]  # the window: the guesses past the emitted token
    seq.token_ids += [6, 4, 3]  # 3 again: the pool knows the text's n-gram (3, 7, 5)
    assert proposer.propose([seq], [3])[0][:2] == [7, 5]
    proposer.free("r")
    assert not proposer.active_requests()


# -- configuration ---------------------------------------------------------------------------------------------
def test_config_accepts_both_spellings():
    a = SpeculativeConfig.from_engine_config(EngineConfig(speculative_model="[ngram]", num_speculative_tokens=4))
    b = SpeculativeConfig.from_engine_config(EngineConfig(speculative_config={"method": "ngram",
                                                                              "num_speculative_tokens": 4}))
    assert a == b and a.method == "ngram" and a.num_speculative_tokens == 4
    c = SpeculativeConfig.from_dict({"model": "/some/draft.gguf", "num_speculative_tokens": 2})
    assert c.method == "draft_model" and c.model == "/some/draft.gguf"
    assert SpeculativeConfig.from_engine_config(EngineConfig()) is None
    assert verify_query_lens(EngineConfig()) == (1,)
    assert verify_query_lens(EngineConfig(speculative_config=METHODS["ngram"])) == (1, 1 + K)
    long = dict(METHODS["ngram"], num_speculative_tokens=12)  # past the paged decode kernel's q_len: eager
    assert verify_query_lens(EngineConfig(speculative_config=long)) == (1,)


@pytest.mark.parametrize("options, message", [
    ({"method": "beam", "num_speculative_tokens": 2}, "unknown speculative method 'beam'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1, got 0"),
    ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
    # the method is judged first: a misspelt one was reported as a missing count
    ({"method": "foo"}, r"unknown speculative method 'foo'; allowed: ngram, lookahead, .*eagle_tree$"),
    ({"method": ["ngram"], "num_speculative_tokens": 2}, r"unknown speculative method \['ngram'\]; allowed: "),
    ({"method": "ngram", "num_speculative_tokens": 17},
     r"num_speculative_tokens must be <= 16 \(MAX_SPECULATIVE_TOKENS: one verify step"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4}, "prompt_lookup_min <= "),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ({"method": "ngram", "num_speculative_tokens": 2, "k": 3}, "unknown key"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x.gguf"}, "only read by methods draft_model, medusa"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "draft_num_layers": 0},
     "draft_num_layers must be None or an integer >= 1, got 0"),
    # options another method reads were accepted and ignored
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_num_layers": 9},
     r"draft_num_layers is only read by methods self_speculative and draft_model without model= .*, got method 'ngram'"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "draft_num_layers": 2, "model": "d.gguf"},
     r"draft_num_layers is only read .* got method 'draft_model' with model 'd.gguf'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead_ngram": 9},
     r"lookahead_ngram is only read by method\(s\) lookahead, got method 'ngram'"),
    ({"method": "medusa", "num_speculative_tokens": 2, "prompt_lookup_max": 4},
     r"prompt_lookup_max is only read by method\(s\) ngram, ngram_tree, got method 'medusa'"),
])
def test_config_errors_name_the_bad_value(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=options)


def test_config_spellings_are_exclusive_and_paired(model_and_config):
    with pytest.raises(ValueError, match="not both"):
        EngineConfig(speculative_config=METHODS["ngram"], num_speculative_tokens=2)
    with pytest.raises(ValueError, match="go together"):
        EngineConfig(speculative_model="[ngram]")
    with pytest.raises(TypeError, match="must be a dict"):
        EngineConfig(speculative_config="ngram")
    model, config = model_and_config
    with pytest.raises(ValueError, match="continuous batching"):
        LLMEngine(model, ByteTokenizer(), config, EngineConfig(scheduling="static", max_model_len=64,
                                                               speculative_config=METHODS["ngram"]))
    with pytest.raises(ValueError, match="draft_num_layers=9 exceeds"):
        run(model_and_config, dict(METHODS["self_speculative"], draft_num_layers=9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", list(METHODS))
def test_gpu_speculation_with_cuda_graphs_equals_plain(method):
    """On the GPU with CUDA graphs (verify steps replay the (bucket, 1 + k) graphs): greedy output unchanged."""
    config = tiny_config(num_hidden_layers=3, max_position_embeddings=256)
    with torch.device("cuda"):
        model = tiny_model(config)

    def go(spec):
        engine = LLMEngine(model, ByteTokenizer(), config,
                           EngineConfig(block_size=16, num_kv_blocks=64, max_model_len=128, max_num_seqs=8,
                                        speculative_config=spec), device="cuda")
        for i, (prompt, params) in enumerate(zip(PROMPTS, GREEDY)):
            engine.add_request(str(i), prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        return done, engine
    plain, _ = go(None)
    spec, engine = go(METHODS[method])
    assert spec == plain
    assert engine.runner.cuda_graphs is not None and engine.runner.cuda_graphs.query_lens == (1, 1 + K)
    assert_nothing_held(engine)
