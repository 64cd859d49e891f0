"""EAGLE training with the drafting chain unrolled ("training-time test") and the simulated acceptance metric
(chapter 9): the vocabulary-wide KL without a second log-softmax, the chain's causal structure, the batched chain
against the engine's own proposer, step by step, and the metric against a brute-force loop over start positions.
"""
from __future__ import annotations

import pytest
import torch

from minillm.speculative.eagle import EagleProposer
from minillm.speculative.head_proposer import Window
from minillm.speculative.heads import HeadConfig, TargetParts
from minillm.speculative.train_data import record_features
from minillm.speculative.train_eval import (accepted_lengths, chain_mask, greedy_continued_acceptance,
                                           simulated_acceptance, unrolled_chain)
from minillm.speculative.train_heads import (HeadLoss, TrainOptions, distill_kl, initial_heads, kl_to_target,
                                             target_law)
from test_engine import tiny_config, tiny_model
from tiny import one_thread  # noqa: F401  (autouse fixture)

VOCAB = 12  # a small vocabulary: an untrained head's greedy drafts then match the target's often enough to count


@pytest.fixture(scope="module")
def target():
    config = tiny_config(vocab_size=VOCAB, eos_token_id=VOCAB - 1, num_hidden_layers=2)
    return tiny_model(config), config


@pytest.fixture(scope="module")
def head(target):
    """An EAGLE head as training starts it, then shaken so that fc mixes feature and token and no part is
    the identity (a bug that drops an input or a key cannot hide behind a pass-through)."""
    model, config = target
    head = initial_heads(HeadConfig.for_target("eagle", config, 1), model, 1.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * p.abs().mean() * torch.randn_like(p))
    return head.eval()


@pytest.fixture(scope="module")
def rows(target):
    """Two rows the target continues greedily from a 3-token prompt (most start positions eligible), one row of
    random tokens (few eligible): tokens [3, 20] and the target's features on them."""
    model, _ = target
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (3, 3))
    parts = TargetParts(model)
    while tokens.shape[1] < 20:
        f = record_features(model, tokens, torch.device("cpu"))
        tokens = torch.cat([tokens, parts.logits(parts.final_norm(f[:, -1])).argmax(-1)[:, None]], dim=1)
    tokens[2] = torch.randint(0, VOCAB, (20,))
    return tokens, record_features(model, tokens, torch.device("cpu"))


def test_kl_from_the_expected_embedding_is_the_full_kl(target):
    model, _ = target
    parts = TargetParts(model)
    torch.manual_seed(3)
    features, hidden = torch.randn(2, 5, 32) * 3, torch.randn(2, 5, 32) * 3
    law = target_law(parts, features, rows_per_chunk=3)  # chunks that do not divide the rows
    fast = kl_to_target(parts, hidden, law)
    full = distill_kl(parts.logits(parts.final_norm(hidden)), parts.logits(parts.final_norm(features)))
    torch.testing.assert_close(fast.mean(), full, atol=1e-5, rtol=1e-5)
    assert fast.shape == (2, 5) and bool((fast > -1e-5).all())
    torch.testing.assert_close(kl_to_target(parts, features, law), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_chain_mask_is_the_proposers_view():
    mask = chain_mask(6, 2, 3, torch.device("cpu"))  # pass 2: the chain started at t - 2
    assert mask.shape == (6, 18)
    # query t = 5: real keys (5 - 2 - 3, 5 - 2] = 1..3 of pass 0, pass 1's key at 4, pass 2's (itself) at 5
    assert mask[5].nonzero().flatten().tolist() == [1, 2, 3, 6 + 4, 12 + 5]
    assert mask[0].nonzero().flatten().tolist() == [12]  # no chain starts before the row: only itself


def test_one_pass_is_the_heads_own_forward(target, head, rows):
    model, _ = target
    tokens, features = rows
    parts = TargetParts(model)
    f, e = features[:, :-1], parts.embed(tokens[:, 1:])
    b, t = tokens.shape[0], tokens.shape[1] - 1
    g = unrolled_chain(head, f, e, 1, window=t)[0]
    expected, _ = head(f, e, torch.arange(t).expand(b, -1), torch.ones(b, t, dtype=torch.bool))
    torch.testing.assert_close(g, expected, atol=1e-5, rtol=1e-5)


def test_a_chain_reads_real_features_only_up_to_its_start(target, head, rows):
    """Pass j at t is draft j + 1 of the chain started at t - j: it may depend on features f_s for s <= t - j and
    tokens x_{s+1} for s <= t only; so may its loss terms."""
    model, _ = target
    tokens, features = rows
    parts = TargetParts(model)
    depth, u = 4, 9
    f, e = features[:, :-1], parts.embed(tokens[:, 1:])
    base = unrolled_chain(head, f, e, depth, window=5)
    f2 = f.clone()
    f2[:, u] += 1.0
    e2 = e.clone()
    e2[:, u] += 1.0
    moved_f = unrolled_chain(head, f2, e, depth, window=5)
    moved_e = unrolled_chain(head, f, e2, depth, window=5)
    law = target_law(parts, features[:, 1:])
    for j in range(depth):
        torch.testing.assert_close(moved_f[j][:, :u + j], base[j][:, :u + j], atol=0, rtol=0)
        assert (moved_f[j][:, u + j] - base[j][:, u + j]).abs().max() > 1e-4  # ... and does depend on f_{t-j}
        torch.testing.assert_close(moved_e[j][:, :u], base[j][:, :u], atol=0, rtol=0)
        assert (moved_e[j][:, u] - base[j][:, u]).abs().max() > 1e-4
        kl, kl_moved = kl_to_target(parts, base[j], law), kl_to_target(parts, moved_f[j], law)
        torch.testing.assert_close(kl_moved[:, :u + j], kl[:, :u + j], atol=0, rtol=0)


def _proposer(head, model, config):
    return EagleProposer(head, HeadConfig.for_target("eagle", config, 1), TargetParts(model))


def _window(tokens, features, row, p, width):
    start = max(0, p - width + 1)
    n = p + 1 - start
    return Window(features[row:row + 1, start:p + 1], tokens[row:row + 1, start + 1:p + 2],
                  torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))


def test_the_batched_chain_is_the_proposers_chain(target, head, rows):
    """Every start p, every step: the proposer (fed the data's tokens as its 'drafts') gives the logits of pass j
    at position p + j."""
    model, config = target
    tokens, features = rows
    parts, proposer = TargetParts(model), _proposer(head, model, config)
    k, width = 4, 6
    passes = unrolled_chain(head, features[:, :-1], parts.embed(tokens[:, 1:]), k, width)
    for row in range(tokens.shape[0]):
        for p in range(tokens.shape[1] - k):
            seen = []

            def feed_data(logits):  # draft i is "chosen" as the data's token p + 1 + i
                seen.append(logits)
                return tokens[row:row + 1, min(p + 1 + len(seen), tokens.shape[1] - 1)]
            with torch.no_grad():
                proposer.draft(_window(tokens, features, row, p, width), k, feed_data)
            for j in range(k):
                expected = parts.logits(parts.final_norm(passes[j][row, p + j]))
                torch.testing.assert_close(seen[j][0], expected, atol=1e-4, rtol=1e-4)


def test_simulated_acceptance_is_a_brute_force_loop_over_starts(target, head, rows):
    model, config = target
    tokens, features = rows
    parts, proposer = TargetParts(model), _proposer(head, model, config)
    k, width = 4, 6
    greedy = parts.logits(parts.final_norm(features)).argmax(-1)  # greedy[s]: the target's choice of token s + 1
    brute = torch.full((tokens.shape[0], tokens.shape[1] - k), -1)
    for row in range(tokens.shape[0]):
        for p in range(tokens.shape[1] - k):
            with torch.no_grad():  # the proposer as the engine runs it: its own argmax fed back
                drafts = [int(d) for d in proposer.draft(_window(tokens, features, row, p, width), k,
                                                         lambda logits: logits.argmax(-1))]
            wanted = [int(greedy[row, p + i]) for i in range(1, k + 1)]  # the greedy tokens p + 2 .. p + k + 1
            if any(int(tokens[row, p + 1 + i]) != wanted[i - 1] for i in range(1, k)):
                continue  # the data leaves greedy decoding before the chain ends: not scored
            accepted = 0
            while accepted < k and drafts[accepted] == wanted[accepted]:
                accepted += 1
            brute[row, p] = 1 + accepted
    lengths = accepted_lengths(head, parts, tokens, features, k, width)
    assert torch.equal(lengths, brute)
    assert (brute >= 2).sum() >= 3 and (brute == -1).sum() >= 3  # the test sees accepted drafts and skipped starts
    summary = simulated_acceptance(head, parts, tokens, features, num_drafts=k, window=width, rows_per_batch=2)
    scored = brute[brute > 0].float()
    assert summary["positions"] == scored.numel()
    assert summary["mean_accepted_length"] == pytest.approx(float(scored.mean()))
    assert summary["per_step_acceptance"][0] == pytest.approx(float((scored >= 2).float().mean()))


def test_greedy_continued_acceptance_scores_every_start_without_bias(target, head, rows):
    """On the greedy rows the target's continuation is the data: the same lengths as accepted_lengths at the
    chosen starts. On the random row simulated_acceptance can score few starts; the greedy-continued variant
    scores every one, each against the chain a brute-force greedy run would verify."""
    model, _ = target
    tokens, features = rows
    parts, k, width = TargetParts(model), 3, 6
    starts = torch.linspace(0, tokens.shape[1] - 2, 5)[1:].round().long().tolist()  # 4, 9, 14, 18
    summary = greedy_continued_acceptance(head, model, tokens[:2], num_drafts=k, window=width, starts_per_row=4)
    full = accepted_lengths(head, parts, tokens[:2], features[:2], k, width)
    inside = [p for p in starts if p < full.shape[1]]  # the last starts run past the row: only greedy-continued
    expected = full[:, inside]
    assert bool((expected > 0).all()) and summary["positions"] == 2 * len(starts)
    random_row = greedy_continued_acceptance(head, model, tokens[2:], num_drafts=k, window=width, starts_per_row=5)
    biased = simulated_acceptance(head, parts, tokens[2:], features[2:], num_drafts=k, window=width)
    assert random_row["eligible_fraction"] == 1.0 > biased["eligible_fraction"]
    # brute force at one start of the random row: continue greedily, then the proposer's chain on that text
    p = 9
    row = tokens[2:, :p + 2]
    for _ in range(k):
        f = record_features(model, row, torch.device("cpu"))
        row = torch.cat([row, parts.logits(parts.final_norm(f[:, -1])).argmax(-1)[:, None]], dim=1)
    one = accepted_lengths(head, parts, row, record_features(model, row, torch.device("cpu")), k, width)[0, p]
    alone = greedy_continued_acceptance(head, model, tokens[2:, :p + 2], num_drafts=k, window=width,
                                        starts_per_row=1)  # the one start of a row of p + 2 tokens is p
    assert alone["positions"] == 1 and alone["mean_accepted_length"] == float(one)
    mixed = greedy_continued_acceptance(head, model, tokens[:2, :inside[-1] + 2], num_drafts=k, window=width,
                                        starts_per_row=1)
    assert mixed["mean_accepted_length"] == pytest.approx(float(expected[:, -1].float().mean()))
    with pytest.raises(ValueError, match="starts_per_row must be an integer >= 1, got 0"):
        greedy_continued_acceptance(head, model, tokens, starts_per_row=0)


def test_walk_steps_are_the_engines_verify_steps():
    """The engine's tokens per step over a text whose per-start lengths are these: start to start, unscorable
    starts passed over."""
    from minillm.speculative.train_eval import _summary, walk_steps
    lengths = torch.tensor([[4, 3, 2, 1, 1, 1, 1, 1], [-1, 2, -1, 3, 2, 1, -1, -1]])
    assert walk_steps(lengths) == [4, 1, 1, 1, 1, 2, 3]  # row 2: start 1 (2) -> 3 (3) -> 6, 7 unscorable
    summary = _summary(lengths, 3, walk=True)
    assert summary["walked_accepted_length"] == pytest.approx(13 / 7)
    assert summary["mean_accepted_length"] == pytest.approx(22 / 12) and summary["positions"] == 12
    assert _summary(lengths, 3, walk=False)["walked_accepted_length"] is None


def test_unrolled_loss_trains_and_reports_every_pass(target, head, rows):
    model, _ = target
    tokens, features = rows
    loss = HeadLoss("eagle", TargetParts(model), 1.0, unroll=2, window=6)
    value, parts = loss(head, tokens, features)
    assert set(parts) == {"reg", "cls", "cls2", "cls3"} and value.requires_grad
    value.backward()
    assert head.fc.weight.grad is not None and head.layer.q_proj.weight.grad.abs().sum() > 0
    head.zero_grad(set_to_none=True)


def test_train_options_check_the_unroll():
    with pytest.raises(ValueError, match="unroll must be an integer in \\[0, 8\\], got 9"):
        TrainOptions("eagle", 10, unroll=9)
    with pytest.raises(ValueError, match="unroll_decay must be in \\(0, 1\\], got 0"):
        TrainOptions("eagle", 10, unroll_decay=0)
    with pytest.raises(ValueError, match="depth must be an integer >= 1, got 0"):
        unrolled_chain(None, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), 0, 4)


def test_training_saves_the_simulated_acceptance(target, rows, tmp_path, monkeypatch):
    import json
    from minillm.speculative import train_heads as train_heads_module
    from minillm.speculative.train_data import DistillData
    from minillm.speculative.train_heads import train_heads
    monkeypatch.setattr(train_heads_module, "PROBE_EVERY", 3)  # one point of the learning curve, at the last step
    model, config = target
    tokens, features = rows
    order = [2, 0, 1]  # 12 rows, the last one (a greedy row) held out
    data = DistillData(tokens[order].repeat(4, 1), features[order].repeat(4, 1, 1))
    result = train_heads(model, config, data, TrainOptions("eagle", 3, rows_per_step=4, unroll=2, window=6),
                         tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["training"]
    sim = saved["simulated_acceptance"]
    assert sim == result["simulated_acceptance"] and saved["unroll"] == 2 and len(result["history"]) == 3
    assert sim["positions"] > 0 and 1.0 <= sim["mean_accepted_length"] <= 1 + sim["num_drafts"]
    assert 1.0 <= sim["walked_accepted_length"] <= 1 + sim["num_drafts"]
    assert set(result["history"][-1]) == {"step", "loss", "reg", "cls", "cls2", "cls3"}
    # the unbiased variant: 8 starts of the held-out row, each continued greedily by the target, all scored
    unbiased = saved["greedy_continued_acceptance"]
    assert unbiased == result["greedy_continued_acceptance"]
    assert unbiased["positions"] == 8 and unbiased["eligible_fraction"] == 1.0
    # the probe ran after the last step on the same held-out row: the final number
    assert saved["acceptance_curve"] == [{"step": 3, "mean_accepted_length": pytest.approx(
        sim["mean_accepted_length"])}]


def test_generation_past_its_deadline_keeps_what_it_has(target):
    import time
    from minillm.speculative.train_data import generate
    from tiny import ByteTokenizer
    model, config = target
    prompts = [[1, 2, 3], [4, 5]]
    documents = generate(model, ByteTokenizer(), config, prompts, 8, torch.device("cpu"), torch.float32,
                         deadline=time.perf_counter())  # already past: aborted before the first step
    assert documents == prompts
    finished = generate(model, ByteTokenizer(), config, prompts, 8, torch.device("cpu"), torch.float32)
    assert all(d[:len(p)] == p and len(p) < len(d) <= len(p) + 8 for d, p in zip(finished, prompts))
