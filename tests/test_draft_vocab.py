"""A draft vocabulary (FR-Spec, minillm/speculative/draft_vocab.py): the head methods draft over the target's most
frequent answer tokens only, and stay lossless.

Counts from train-heads' data rank the tokens; the proposers score only those rows of the LM head and map their
indices back to token ids; greedy output equals plain decoding (under preemption too), every draft is a token of
the draft vocabulary, and sampled drafts' q, zero outside it, still verify to the target's law.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.sampling_params import SamplingParams
from minillm.speculative.config import SpeculativeConfig
from minillm.speculative.draft_vocab import (DraftVocab, answer_token_counts, draft_vocab_ids, frequent_token_ids,
                                             load_token_counts, save_token_counts)
from minillm.speculative import heads as heads_module
from minillm.speculative.head_kinds import new_heads
from minillm.speculative.heads import HEAD_KINDS, HeadConfig, TargetParts, save_heads
from minillm.speculative.train_heads import TrainOptions, train_heads
from test_engine import tiny_config, tiny_model
from test_speculative_engine import GREEDY, PROMPTS, SAMPLED, assert_nothing_held, pair_law_p_value, run
from test_speculative_heads import K, data, target, trained  # noqa: F401  (module fixtures)
from tiny import ByteTokenizer, one_thread, run_to_completion  # noqa: F401  (one_thread: autouse fixture)

SIZE = 64  # of the tiny target's 300 tokens


def test_counts_rank_the_tokens_each_drafting_position_predicts():
    tokens = torch.tensor([[5, 7, 7, 9, 7], [1, 2, 3, 4, 5]])
    drafted = torch.tensor([[False, True, True, True, False], [True, False, False, False, False]])
    counts = answer_token_counts(tokens, drafted, 10)  # predicted: 7, 9, 7 and 2
    assert counts.tolist() == [0, 0, 1, 0, 0, 0, 0, 2, 0, 1]
    assert answer_token_counts(tokens, None, 10).sum() == 8  # every next token
    assert frequent_token_ids(counts, 3).tolist() == [2, 7, 9]
    assert frequent_token_ids(torch.zeros(6, dtype=torch.int64), 2).tolist() == [0, 1]  # ties: smaller ids
    for bad in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match="draft vocabulary size"):
            frequent_token_ids(counts, bad)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        answer_token_counts(tokens, drafted, 5)


def test_counts_are_saved_with_the_target_they_count(tmp_path):
    config, other = tiny_config(), tiny_config(hidden_size=64)
    counts = torch.arange(config.vocab_size)
    save_token_counts(tmp_path, counts, config)
    assert torch.equal(load_token_counts(tmp_path, config), counts)
    with pytest.raises(ValueError, match="token counts of a target"):
        load_token_counts(tmp_path, other)
    assert draft_vocab_ids(3, tmp_path, config).tolist() == [config.vocab_size - 3 + i for i in range(3)]
    (tmp_path / "eagle").mkdir()  # train-heads --kind medusa,eagle --out DIR: DIR/eagle, the counts in DIR
    assert draft_vocab_ids(3, tmp_path / "eagle", config).tolist() == [config.vocab_size - 3 + i for i in range(3)]
    with pytest.raises(ValueError, match="train-heads"):
        draft_vocab_ids(3, tmp_path / "none" / "eagle", config)  # neither there nor one level up


def test_the_shipped_counts_are_the_bundled_models_answers():
    """weights/token_counts.safetensors: counted on SmolLM2-135M's own answers, found for it without a directory."""
    import dataclasses
    bundled = dataclasses.replace(tiny_config(), vocab_size=49152, hidden_size=576, num_hidden_layers=30)
    counts = load_token_counts(heads_module.SHIPPED_DIR, bundled)
    assert int(counts.sum()) > 50_000 and int((counts > 0).sum()) > 4096
    ids = draft_vocab_ids(4096, None, bundled)
    assert ids.shape == (4096,) and bool((ids[1:] > ids[:-1]).all())
    assert int(counts[ids].min()) >= int(counts.sort(descending=True).values[4095])  # the 4,096 most frequent


def test_a_draft_vocabulary_scores_only_its_rows_and_maps_back(target):
    model, config = target
    parts = TargetParts(model)
    normed = torch.randn(5, config.hidden_size)
    ids = torch.tensor([3, 10, 42, 299])
    full = parts.logits(normed)
    torch.testing.assert_close(parts.vocab.logits(normed), full)  # not restricted: every row, index = id
    assert torch.equal(parts.vocab.to_ids(torch.tensor([1, 2])), torch.tensor([1, 2]))
    parts.vocab.restrict(ids)
    assert parts.vocab.size == 4
    torch.testing.assert_close(parts.vocab.logits(normed), full[:, ids])
    assert parts.vocab.to_ids(torch.tensor([[0, 3]])).tolist() == [[3, 299]]
    q = torch.softmax(torch.randn(2, 4), -1)
    spread = parts.vocab.spread(q)
    assert spread.shape == (2, config.vocab_size) and torch.equal(spread[:, ids], q) and float(spread.sum()) == \
        pytest.approx(2.0)
    with pytest.raises(ValueError, match="already restricted"):
        parts.vocab.restrict(ids)
    with pytest.raises(ValueError, match="dense floating-point LM head"):
        DraftVocab(torch.zeros(300, 16, dtype=torch.int8))  # packed or quantized codes
    for bad in ([4, 3], [3, 3], [-1, 2], [299, 300], []):
        with pytest.raises(ValueError, match="ascending, distinct"):
            TargetParts(model).vocab.restrict(torch.tensor(bad, dtype=torch.int64))


def test_the_config_names_the_bad_size():
    for bad in (0, 63, 64.0, True, "64"):
        with pytest.raises(ValueError, match="draft_vocab_size"):
            SpeculativeConfig(method="eagle", num_speculative_tokens=2, draft_vocab_size=bad)
    with pytest.raises(ValueError, match="only read by methods"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=2, draft_vocab_size=64)
    with pytest.raises(ValueError, match=r"in \[1, 300\]"):
        draft_vocab_ids(301, None, tiny_config())


@pytest.fixture(scope="module")
def with_counts(trained, data, target, tmp_path_factory):  # noqa: F811
    """kind -> a copy of the trained heads' directory (a draft distilled a few steps for "draft") with the token
    counts of `data` beside them, as train-heads leaves them; "shipped": counts alone, to stand for the shipped."""
    model, config = target
    counts = answer_token_counts(data.tokens, data.drafted, config.vocab_size)
    out = {}
    for kind in HEAD_KINDS:
        directory = tmp_path_factory.mktemp(kind + "_vocab")
        shutil.copytree(trained[kind][0], directory, dirs_exist_ok=True)
        out[kind] = directory
    out["draft"] = tmp_path_factory.mktemp("draft_vocab")
    train_heads(model, config, data, TrainOptions("draft", 10, draft_num_layers=1, rows_per_step=64, lr=3e-3,
                                                  warmup=3), out["draft"])
    out["shipped"] = tmp_path_factory.mktemp("shipped")
    for directory in out.values():
        save_token_counts(directory, counts, config)
    return out


def _spec(method: str, dirs: dict) -> dict:
    spec = {"method": method, "num_speculative_tokens": K, "draft_vocab_size": SIZE}
    if method == "self_speculative":
        return dict(spec, draft_num_layers=1)  # no model: the counts shipped (monkeypatched below)
    return dict(spec, model=str(dirs["draft" if method == "draft_model" else method.split("_")[0]]))


@pytest.mark.parametrize("method", [*HEAD_KINDS, "eagle_tree", "medusa_tree", "draft_model", "self_speculative"])
@pytest.mark.parametrize("num_blocks", [64, 12])  # 12 blocks of 4 slots: the requests preempt each other
def test_greedy_output_equals_plain_and_drafts_stay_in_the_vocabulary(target, with_counts, method, num_blocks,  # noqa: F811
                                                                       monkeypatch):
    monkeypatch.setattr(heads_module, "SHIPPED_DIR", with_counts["shipped"])
    plain, _ = run(target, None, num_blocks)
    allowed = set(draft_vocab_ids(SIZE, None, target[1]).tolist())  # every directory holds the same counts
    _, engine = run(target, _spec(method, with_counts), num_blocks, requests=[])
    proposer, drafted = engine.speculative.proposer, []
    if method.endswith("_tree"):  # every tree's nodes below its root (the last real token)
        propose = proposer.propose_trees
        proposer.propose_trees = lambda seqs, depths: [
            t if t is None else drafted.extend(t.token_ids[1:]) or t for t in propose(seqs, depths)]
    else:  # every chain's drafts
        propose = proposer.propose_with_probs
        proposer.propose_with_probs = lambda seqs, n: (lambda r: drafted.extend(
            t for row in r[0] for t in row) or r)(propose(seqs, n))
    for i, (prompt, params) in enumerate(list(zip(PROMPTS, GREEDY)) + [(PROMPTS[1], SAMPLED)]):
        engine.add_request(str(i), prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    for rid, out in plain.items():
        assert outputs[rid].outputs[0].token_ids == out.outputs[0].token_ids, (method, rid)
    assert_nothing_held(engine)
    assert drafted and set(drafted) <= allowed


@pytest.mark.parametrize("kind", [*HEAD_KINDS, "draft_model"])
def test_sampled_drafts_over_a_few_tokens_keep_the_target_distribution(kind, tmp_path):
    """Random heads (or a 1-layer draft) on a vocabulary-8 target drafting over 3 of its tokens at temperature 0.4:
    the 2nd and 3rd tokens follow the target's exact pair law (q is 0 on the other five; the residual keeps their
    mass)."""
    vocab, n, temperature = 8, 400, 0.4
    config = tiny_config(vocab_size=vocab, num_hidden_layers=2)
    model = tiny_model(config, seed=5)
    spec = {"method": kind, "num_speculative_tokens": 2, "model": str(tmp_path)}
    if kind == "draft_model":
        spec = {"method": kind, "num_speculative_tokens": 2, "draft_num_layers": 1}
    else:
        head_config = HeadConfig.for_target(kind, config, 2)
        torch.manual_seed(1)
        head = new_heads(head_config)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.3 * torch.randn_like(p))
        save_heads(tmp_path, head, head_config)
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=4 * n, max_model_len=16, max_num_seqs=n,
                                    speculative_config=spec), seed=11)
    ids, proposer = torch.tensor([1, 4, 6]), engine.speculative.proposer
    proposer.restrict_vocab(ids) if kind == "draft_model" else proposer.target.vocab.restrict(ids)
    params = SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True)
    prompt = [1, 2, 3]
    tokens = torch.tensor(run_to_completion(engine, [prompt] * n, params))
    assert pair_law_p_value(model, prompt, tokens, temperature) > 1e-3
    metrics = engine.speculative.metrics
    assert metrics.num_draft_tokens > 0 and 0.05 < metrics.acceptance_rate < 0.95
    assert_nothing_held(engine)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["eagle", "eagle_tree", "medusa"])
def test_cuda_graph_drafts_over_a_draft_vocabulary_give_plain_tokens(target, with_counts, method):  # noqa: F811
    """On the GPU the head's proposals (and EAGLE-2's search) replay CUDA graphs that score the draft vocabulary's
    rows and gather their token ids on the device: greedy output equals plain decoding, eager and graphed alike."""
    _, config = target
    with torch.device("cuda"):
        model = tiny_model(config)  # the CPU target's weights, which the heads were trained on

    def go(spec, eager):
        engine = LLMEngine(model, ByteTokenizer(), config,
                           EngineConfig(block_size=16, num_kv_blocks=64, max_model_len=64, max_num_seqs=4,
                                        enforce_eager=eager, speculative_config=spec), device="cuda")
        outputs = dict(zip(map(str, range(len(PROMPTS))), run_to_completion(engine, PROMPTS, GREEDY)))
        return outputs, None if spec is None else engine.speculative.metrics.num_draft_tokens

    plain, _ = go(None, False)
    for eager in (True, False):
        outputs, drafted = go(_spec(method, with_counts), eager)
        assert outputs == plain and drafted > 0, (method, eager)
