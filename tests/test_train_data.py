"""Distillation data for draft heads (chapter 9): thousands of distinct prompts, held out by prompt before
generation, none of the benchmark's; documents with their own context; the held-out stepped acceptance of EAGLE's
chain against a brute-force walk; EAGLE's loss only where the engine drafts.
"""
from __future__ import annotations

import os
import re
import sys
from collections import Counter

import pytest
import torch

from minillm.speculative.heads import HeadConfig, TargetParts, save_heads
from minillm.speculative.train_data import (HeldOut, build_prompts, distill_data, pack_documents, pad_documents,
                                            record_features)
from minillm.speculative.train_eval import accepted_lengths, held_out_acceptance, unrolled_chain, walk_steps
from minillm.speculative.train_heads import DistillData, HeadLoss, feature_rms, initial_heads
from minillm.speculative.train_losses import chain_weights
from minillm.speculative.train_prompts import (KIND_WEIGHTS, _by_kind, num_distinct_prompts, prompt_texts,
                                               split_prompts)
from test_engine import tiny_config, tiny_model
from test_train_heads_eagle import VOCAB, head, target  # noqa: F401  (fixtures: a 12-token target, a shaken head)
from tiny import ByteTokenizer, one_thread  # noqa: F401  (autouse fixture)


def test_thousands_of_distinct_prompts_in_a_stable_mix():
    texts = prompt_texts(4000)
    assert len({t for _, t in texts}) == 4000
    assert texts == prompt_texts(4000) and prompt_texts(50) == texts[:50]  # deterministic; a prefix is a prefix
    first = Counter(kind for kind, _ in texts[:sum(KIND_WEIGHTS.values()) * 16])
    assert first == Counter({k: 16 * w for k, w in KIND_WEIGHTS.items()})  # the weights, in any short prefix
    code = [t for k, t in texts if k == "code"]
    assert len({t.split()[2] for t in code}) >= 8  # several languages
    with pytest.raises(ValueError, match="num_prompts must be an integer >= 1, got 0"):
        prompt_texts(0)
    with pytest.raises(ValueError, match="exceeds the"):
        prompt_texts(num_distinct_prompts() + 1)
    assert len(prompt_texts(num_distinct_prompts())) == num_distinct_prompts() > 5000


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+", text.lower())


def test_no_benchmark_prompt_is_built():
    """No run of 8 words of any P7 prompt (bench_speculative.PROMPTS) appears in any prompt this module can build."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from bench_speculative import PROMPTS as BENCH_PROMPTS
    shingles = {tuple(w[i:i + 8]) for p in BENCH_PROMPTS for w in [_words(p)] for i in range(len(w) - 7)}
    assert len(shingles) > 100
    built = [t for texts in _by_kind().values() for t in texts]
    leaks = [t for t in built for w in [_words(t)] if any(tuple(w[i:i + 8]) in shingles for i in range(len(w) - 7))]
    assert not leaks, leaks[:3]


def test_prompts_are_split_before_generation_by_prompt():
    texts = [t for _, t in prompt_texts(400)]
    train, held = split_prompts(texts, 0.05)
    assert len(held) == 20 and sorted(train + held) == list(range(400)) and not set(train) & set(held)
    assert split_prompts(texts, 0.05) == (train, held)
    assert len(split_prompts(texts[:3], 0.05)[1]) == 1  # at least one held out, never all
    with pytest.raises(ValueError, match="held_out_fraction must be in \\(0, 1\\), got 1.0"):
        split_prompts(texts, 1.0)
    with pytest.raises(ValueError, match="need at least 2 prompts"):
        split_prompts(texts[:1], 0.5)
    tokenizer = ByteTokenizer()
    train_ids, held_ids = build_prompts(tokenizer, 40, max_prompt_tokens=64)
    assert len(held_ids) == 2 and len(train_ids) == 38 and max(map(len, train_ids + held_ids)) <= 64
    assert not {tuple(p) for p in held_ids} & {tuple(p) for p in train_ids}


@pytest.fixture(scope="module")
def byte_target():
    config = tiny_config(num_hidden_layers=2)  # a vocabulary for ByteTokenizer's bytes
    return tiny_model(config), config


@pytest.fixture(scope="module")
def data(byte_target):
    model, config = byte_target
    return distill_data(model, ByteTokenizer(), config, num_prompts=12, max_new_tokens=16, seq_len=32,
                        device=torch.device("cpu"), dtype=torch.float32, max_prompt_tokens=20, held_out_fraction=0.2)


def test_distill_data_holds_out_greedy_answers_and_marks_the_answer_positions(byte_target, data):
    model, _ = byte_target
    held = data.held_out
    assert held.tokens.shape[0] == 2 and bool((held.lengths > held.prompt_lengths).all())
    parts = TargetParts(model)
    for i in range(2):  # held-out answers are the target's greedy tokens, features over the whole document
        n, p = int(held.lengths[i]), int(held.prompt_lengths[i])
        tokens = held.tokens[i:i + 1, :n]
        features = record_features(model, tokens, torch.device("cpu"), progress=False)
        torch.testing.assert_close(held.features[i:i + 1, :n], features, atol=1e-5, rtol=1e-5)
        greedy = parts.logits(parts.final_norm(features[0, p - 1:n - 1])).argmax(-1)
        assert torch.equal(greedy, tokens[0, p:n])
        assert bool((held.tokens[i, n:] == 0).all())
    segments, drafted = data.segments.flatten(), data.drafted.flatten()
    assert bool((segments[1:] >= segments[:-1]).all())
    for s in segments.unique()[:-1].tolist():  # every complete document: drafted from prompt length - 1 to its end
        where = drafted[segments == s].nonzero().flatten()
        assert where[-1] == int((segments == s).sum()) - 2 and torch.equal(where, torch.arange(where[0], where[-1] + 1))
    # the features of a packed row are those of its document, not of a prefill that starts at the row
    first = int((segments == 0).sum())
    doc = data.tokens.flatten()[:first][None]
    torch.testing.assert_close(data.features.flatten(0, 1)[:first][None],
                               record_features(model, doc, torch.device("cpu"), progress=False), atol=1e-5, rtol=1e-5)


def test_feature_rms_reads_the_answers_only():
    tokens = torch.zeros(1, 4, dtype=torch.int64)
    features = torch.ones(1, 4, 2)
    features[0, 0] = 100.0  # an attention sink
    drafted = torch.tensor([[False, True, True, False]])
    assert feature_rms(DistillData(tokens, features, torch.zeros_like(tokens), drafted)) == pytest.approx(1.0)
    assert feature_rms(DistillData(tokens, features)) > 40


def _greedy_docs(model, prompts, total):
    parts = TargetParts(model)
    docs = []
    for prompt in prompts:
        doc = list(prompt)
        while len(doc) < total:
            f = record_features(model, torch.tensor([doc]), torch.device("cpu"), progress=False)
            doc.append(int(parts.logits(parts.final_norm(f[0, -1])).argmax()))
        docs.append(doc)
    return docs


def test_held_out_acceptance_is_the_engines_walk_over_each_answer(target, head):
    """Documents of different lengths padded into one batch: the same per-start lengths as each alone, and the
    walk from the first answer start (prompt length - 1) to the last start with k drafts inside the document."""
    model, _ = target
    k, width = 3, 6
    docs = _greedy_docs(model, [[1, 2, 3], [4, 5], [6, 7, 8, 9]], 18)
    docs[1] = docs[1][:13]
    features = [record_features(model, torch.tensor([d]), torch.device("cpu"), progress=False)[0] for d in docs]
    held = pad_documents(docs, features, [3, 2, 4])
    summary = held_out_acceptance(head, TargetParts(model), held, num_drafts=k, window=width, docs_per_batch=2)
    steps = []
    for doc, f, p in zip(docs, features, [3, 2, 4]):
        lengths = accepted_lengths(head, TargetParts(model), torch.tensor([doc]), f[None], k, width)[0]
        answer = lengths[p - 1:len(doc) - k]
        assert bool((answer > 0).all())  # greedy text: every start scored
        steps += walk_steps(answer[None])
    assert summary["walked_accepted_length"] == pytest.approx(sum(steps) / len(steps))
    assert summary["documents"] == 3 and summary["eligible_fraction"] == 1.0  # every answer start (greedy, fp32)
    assert summary["positions"] == sum(len(d) - k - p + 1 for d, p in zip(docs, [3, 2, 4]))
    assert summary["first_draft_acceptance"] == summary["per_step_acceptance"][0]


def test_a_chain_attends_inside_its_document_only(target, head):
    model, _ = target
    torch.manual_seed(4)
    f, e = torch.randn(1, 12, 32), torch.randn(1, 12, 32)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    base = unrolled_chain(head, f, e, 3, window=8, segments=segments)
    f2, e2 = f.clone(), e.clone()
    f2[:, :5] += 1.0
    e2[:, :5] += 1.0
    moved = unrolled_chain(head, f2, e2, 3, window=8, segments=segments)
    for j in range(3):  # chains that start in document 1 (t - j >= 5) never read document 0
        torch.testing.assert_close(moved[j][:, 5 + j:], base[j][:, 5 + j:], atol=1e-6, rtol=0)
    alone = unrolled_chain(head, f[:, 5:], e[:, 5:], 3, window=8)
    for j in range(3):
        torch.testing.assert_close(alone[j][:, j:], base[j][:, 5 + j:], atol=1e-5, rtol=1e-5)


def test_eagle_loss_counts_only_the_chains_the_engine_drafts(target, head):
    drafted = torch.tensor([[False, False, True, True, True, False, True, True]])
    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    w0 = chain_weights(drafted.shape, 0, segments, drafted, torch.device("cpu"))
    w1 = chain_weights(drafted.shape, 1, segments, drafted, torch.device("cpu"))
    assert w0.tolist() == [[0, 0, 1, 1, 0, 0, 1]]  # start 4 targets position 5, the next document
    assert w1.tolist() == [[0, 0, 0, 1, 0, 0, 0]]  # pass 1 at t: the chain from t - 1
    model, _ = target
    torch.manual_seed(5)
    tokens = torch.randint(0, VOCAB, (1, 8))
    features = torch.randn(1, 8, 32)
    loss = HeadLoss("eagle", TargetParts(model), 1.0, unroll=1, window=6)
    answers_of_doc_1 = torch.tensor([[False] * 5 + [False, True, True]])

    def value(f, t, mask=answers_of_doc_1):
        torch.manual_seed(6)  # the same input noise each time
        return loss(head, t, f, segments, mask)[0]
    base = value(features, tokens)
    moved, other = features.clone(), tokens.clone()
    moved[0, :5] += 3.0
    other[0, :5] = (other[0, :5] + 1) % VOCAB
    torch.testing.assert_close(value(moved, other), base)  # document 0 is neither context nor target of doc 1's chains
    assert not torch.isclose(value(moved, other, drafted), value(features, tokens, drafted))  # unless it drafts
    prompt = features.clone()
    prompt[0, 5] += 3.0
    assert not torch.isclose(value(prompt, tokens), base)  # doc 1's prompt is its chains' context


def test_pack_documents_rejects_too_little_text():
    with pytest.raises(ValueError, match="fewer than one row of seq_len=8"):
        pack_documents([[1, 2, 3]], [torch.zeros(3, 4)], [1], 8)
    assert isinstance(pad_documents([[1, 2], [3]], [torch.ones(2, 4), torch.ones(1, 4)], [1, 1]), HeldOut)


def test_cli_prints_the_held_out_numbers(byte_target, tmp_path, monkeypatch, capsys):
    """`minillm train-heads --kind eagle --tiny`: the data's size, the held-out top-1 and the stepped acceptance."""
    import minillm.engine.worker
    import minillm.loader
    from minillm.cli import main
    from minillm.speculative import train_heads as train_heads_module
    model, config = byte_target
    monkeypatch.setattr(minillm.loader, "load_model", lambda path: (config, iter(()), ByteTokenizer()))
    monkeypatch.setattr(minillm.engine.worker, "build_model", lambda *args, **kwargs: model)
    held = {"num_drafts": 5, "positions": 300, "eligible_fraction": 0.7, "mean_accepted_length": 2.4,
            "walked_accepted_length": 2.25, "per_step_acceptance": [0.6, 0.7, 0.8, None, None], "documents": 3,
            "first_draft_acceptance": 0.6}
    monkeypatch.setattr(train_heads_module, "train_heads", lambda *args, **kwargs: {
        "history": [{"loss": 1.0}], "out": str(tmp_path), "seconds_per_step": 0.01, "simulated_acceptance": None,
        "held_out_top1_agreement": [0.6], "held_out_acceptance": held})
    shipped = tmp_path / "shipped"  # an EAGLE head to compare with, on the same held-out requests
    save_heads(shipped, initial_heads(HeadConfig.for_target("eagle", config, 1), model), HeadConfig.for_target(
        "eagle", config, 1))
    assert main(["train-heads", "--kind", "eagle", "--tiny", "--device", "cpu", "--out", str(tmp_path),
                 "--compare", str(shipped)]) == 0
    for p in model.parameters():  # the CLI froze the shared target
        p.requires_grad_(True)
    out = capsys.readouterr().out
    assert "held-out requests" in out and "held-out top-1 agreement with the target, per head/step: 0.600" in out
    assert "of this head" in out and f"of {shipped}" in out
    assert "mean accepted length 2.250; first draft accepted 0.600; per draft: 0.600, 0.700, 0.800, -, -" in out
    assert main(["train-heads", "--kind", "eagle", "--tiny", "--compare", str(tmp_path / "nothing"), "--out",
                 "x"]) == 2
    assert "minillm train-heads: error: --compare" in capsys.readouterr().err
    assert main(["train-heads", "--kind", "eagle", "--tiny", "--held-out-fraction", "1", "--out", str(tmp_path)]) == 2
    assert "--held-out-fraction and --data-share must be in" in capsys.readouterr().err


def test_training_on_held_out_requests_saves_their_numbers(byte_target, data, tmp_path, monkeypatch):
    import json
    from minillm.speculative import train_heads as train_heads_module
    from minillm.speculative.train_heads import TrainOptions, train_heads
    monkeypatch.setattr(train_heads_module, "PROBE_EVERY", 3)
    model, config = byte_target
    result = train_heads(model, config, data, TrainOptions("eagle", 3, rows_per_step=2, unroll=1, window=8), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["training"]
    held = saved["held_out_acceptance"]
    assert held == result["held_out_acceptance"] and held["documents"] == 2 and held["positions"] > 0
    assert saved["rows"] == data.tokens.shape[0]  # every row trains: the held-out requests are elsewhere
    assert saved["held_out_top1_agreement"] == result["held_out_top1_agreement"]
    assert saved["acceptance_curve"] == [{"step": 3, "mean_accepted_length": held["walked_accepted_length"]}]
