"""Graded tests of chapter 9, verification: the accept test, the residual distribution and greedy verification.

Besides comparisons with the solution, the sampling exercises run inside the real verifier
(minillm.speculative.rejection.rejection_sample, which calls them through `dispatch`): tens of thousands of
independent verify steps on a 6-token vocabulary, whose emitted tokens must follow the target's distribution by a
chi-square test. A sampler that accepts with the wrong probability, or resamples from the wrong distribution after
a rejection, is exact nowhere and fails it; the one that is right passes at any seed with probability 1 - 1e-4.
Greedy verification runs inside a speculative engine on a tiny model, whose output must be plain decoding's.
"""
from __future__ import annotations

import pytest
import torch
from test_engine import tiny_config, tiny_model
from tiny import ByteTokenizer

from minillm.config import EngineConfig
from minillm.course.checks import (assert_close, assert_equal, assert_rejects, assert_scalar_close,
                                   assert_tensor, graded_seed)
from minillm.engine.llm_engine import LLMEngine
from minillm.hooks import overriding
from minillm.sampling_params import SamplingParams
from minillm.speculative.rejection import rejection_sample

V, K, N = 6, 2, 40_000  # vocabulary, drafts per step, independent verify steps in the chi-square tests
SIGNIFICANCE = 1e-4


def _generator(base: int) -> torch.Generator:
    return torch.Generator().manual_seed(graded_seed(base))


def _chi_square_pvalue(tokens: torch.Tensor, probs: torch.Tensor, what: str) -> float:
    """p-value of the observed token counts under `probs` [V]; a token of probability 0 fails at once."""
    counts = torch.bincount(tokens, minlength=probs.shape[0]).double()
    impossible = (probs == 0) & (counts > 0)
    assert not bool(impossible.any()), (f"{what}: emitted token {int(impossible.nonzero()[0])}, which the target "
                                        f"gives probability 0 ({int(counts[impossible].sum())} times)")
    keep = probs > 0
    expected = probs[keep].double() * counts.sum()
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _target_and_draft(base: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One verify step's laws, repeated over N rows: p [N, K+1, V], q [N, K, V], drafts x ~ q [N, K].
    p and q differ clearly, q is 0 on some tokens and p on one, so every branch of the rule matters."""
    g = _generator(base)
    p = torch.rand(K + 1, V, generator=g) ** 2 + 0.02
    q = torch.rand(K, V, generator=g) ** 2 + 0.02
    p[:, 0] = 0.0  # a token the target never emits (the draft proposes it now and then)
    q[:, V - 1] = 0.0  # a token the draft never proposes: only the residual can emit it
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    drafts = torch.stack([torch.multinomial(q[i], N, replacement=True, generator=g) for i in range(K)], dim=1)
    return p.expand(N, K + 1, V).contiguous(), q.expand(N, K, V).contiguous(), drafts


def _assert_lossless(overrides: dict, base: int) -> None:
    p, q, drafts = _target_and_draft(base)
    with overriding(overrides):
        out = rejection_sample(p, q, drafts, default_generator=_generator(base + 1))
    first = out.token_ids[:, 0]
    pval = _chi_square_pvalue(first, p[0, 0], "first emitted token")
    freqs = (torch.bincount(first, minlength=V) / N).tolist()
    assert pval > SIGNIFICANCE, (f"the first emitted token does not follow the target's law p: chi-square p-value "
                                 f"{pval:.1e}; emitted frequencies {freqs}, p = {p[0, 0].tolist()}")
    kept = out.num_accepted >= 1  # after an accepted first draft, the next token must follow p at position 1
    second = out.token_ids[kept, 1]
    pval = _chi_square_pvalue(second, p[0, 1], "second emitted token")
    assert pval > SIGNIFICANCE, (f"after an accepted draft the next token does not follow p: chi-square p-value "
                                 f"{pval:.1e}")


# ------------------------------------------------------------------------------------------------- accept_reject
def _accept_inputs(batch: int, width: int, base: int):
    g = _generator(base)
    p_x = torch.rand(batch, width, generator=g)
    q_x = torch.where(torch.rand(batch, width, generator=g) < 0.3, torch.ones(batch, width),  # deterministic drafts
                      torch.rand(batch, width, generator=g) * 0.9 + 0.1)
    u = torch.rand(batch, width, generator=g)
    near = (u * q_x - p_x).abs() < 1e-3  # keep clear of ties, where u < p/q and u*q < p may round apart
    u = torch.where(near, (u + 0.01) % 1.0, u)
    counts = torch.randint(0, width + 1, (batch,), generator=g)
    padding = torch.arange(width) >= counts.unsqueeze(-1)
    p_x = torch.where(padding, torch.ones_like(p_x), p_x)  # padding that WOULD pass the test if it were looked at
    u = torch.where(padding, torch.zeros_like(u), u)
    return p_x, q_x, u, counts


@pytest.mark.exercise("ch09.accept_reject")
@pytest.mark.points(1)
@pytest.mark.parametrize("batch,width", [(1, 1), (5, 4), (17, 3), (64, 7)])
def test_accept_reject_matches_solution(impl, ref, batch, width):
    args = _accept_inputs(batch, width, base=batch * 100 + width)
    got = impl(*(a.clone() for a in args))
    want = ref(*(a.clone() for a in args))
    assert_equal(got, want, f"accept_reject: accepted drafts per row (B={batch}, K={width})")


@pytest.mark.exercise("ch09.accept_reject")
@pytest.mark.points(2)
def test_accept_reject_properties(impl):
    t = torch.tensor
    one = t([3])
    got = impl(t([[0.5, 0.9, 0.3]]), t([[0.2, 0.9, 0.6]]), t([[0.99, 0.99, 0.49]]), one)
    assert got.tolist() == [3], f"p >= q always accepts, and u=0.49 < 0.3/0.6 accepts: expected [3], got {got.tolist()}"
    got = impl(t([[0.0, 0.9]]), t([[0.5, 0.5]]), t([[0.0, 0.0]]), t([2]))
    assert got.tolist() == [0], (f"a draft the target gives probability 0 is never accepted (even with u = 0): "
                                 f"got {got.tolist()}")
    got = impl(t([[0.5, 0.1, 0.9]]), t([[1.0, 1.0, 1.0]]), t([[0.4, 0.2, 0.1]]), one)
    assert got.tolist() == [1], ("drafts form a chain: a rejection at position 1 ends the step even though position 2 "
                                 f"would pass; expected [1], got {got.tolist()}")
    got = impl(t([[0.5, 0.1]]), t([[0.25, 0.5]]), t([[0.7, 0.3]]), t([2]))
    assert got.tolist() == [1], (f"accept with probability min(1, p/q): p/q = 2 accepts, p/q = 0.2 rejects u = 0.3; "
                                 f"got {got.tolist()} (p/q, not q/p)")
    got = impl(torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3), t([0, 2]))
    assert got.tolist() == [0, 2], f"positions past num_draft_tokens are padding, never accepted: got {got.tolist()}"
    empty = impl(torch.ones(3, 0), torch.ones(3, 0), torch.zeros(3, 0), t([0, 0, 0]))
    assert_tensor(empty, "accept_reject with K = 0", (3,), torch.int64)


@pytest.mark.exercise("ch09.accept_reject")
@pytest.mark.points(4)
def test_accept_reject_keeps_the_target_distribution(impl):
    _assert_lossless({"ch09.accept_reject": impl}, base=901)


# ------------------------------------------------------------------------------------------ residual_distribution
def _residual_inputs(rows: int, vocab: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(base)
    p = torch.softmax(torch.randn(rows, vocab, generator=g) * 2, dim=-1)
    q = torch.softmax(torch.randn(rows, vocab, generator=g) * 2, dim=-1)
    if rows > 1:
        q[0] = p[0]  # nothing left over: the fallback row
    if rows > 2:
        q[1] = 0.0  # the bonus position: q = 0, the residual is p
        q[2] = 0.0
        q[2, int(p[2].argmax())] = 1.0  # a one-hot draft (n-gram): p without that token, renormalised
    return p, q


@pytest.mark.exercise("ch09.residual_distribution")
@pytest.mark.points(1)
@pytest.mark.parametrize("rows,vocab", [(1, 7), (4, 3), (9, 50), (33, 129)])
def test_residual_matches_solution(impl, ref, rows, vocab):
    p, q = _residual_inputs(rows, vocab, base=rows * 1000 + vocab)
    got, want = impl(p.clone(), q.clone()), ref(p.clone(), q.clone())
    assert_close(got, want, f"residual_distribution [{rows}, {vocab}]", atol=1e-6, rtol=1e-5)


@pytest.mark.exercise("ch09.residual_distribution")
@pytest.mark.points(3)
def test_residual_properties(impl):
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5]])
    q = torch.tensor([[0.2, 0.6, 0.2], [0.4, 0.5, 0.1], [0.25, 0.25, 0.5]])
    r = impl(p.clone(), q.clone())
    assert_tensor(r, "residual", (3, 3), torch.float32)
    assert bool((r >= 0).all()), f"a distribution has no negative entries: got {r.tolist()} (max(0, p - q))"
    assert_close(r.sum(-1), torch.ones(3), "residual row sums", atol=1e-6, rtol=0)
    assert_close(r[0], torch.tensor([1.0, 0.0, 0.0]), "residual of p [0.5, 0.3, 0.2] against q [0.2, 0.6, 0.2]")
    assert_close(r[1], torch.tensor([0.0, 0.0, 1.0]), "residual where only one token has p > q")
    assert_close(r[2], p[2], "p == q leaves nothing over: the residual falls back to p")
    near_p = torch.tensor([[0.5, 0.3, 0.2]])  # q differs from p by rounding noise: 2e-7 left over (at most 1e-6)
    near_q = torch.tensor([[0.5 - 2e-7, 0.3 + 2e-7, 0.2]])
    assert_close(impl(near_p.clone(), near_q.clone())[0], near_p[0],
                 "leftover mass 2e-7 (<= 1e-6, rounding noise of p == q): the residual falls back to p")


@pytest.mark.exercise("ch09.residual_distribution")
@pytest.mark.points(3)
def test_residual_keeps_the_target_distribution(impl):
    _assert_lossless({"ch09.residual_distribution": impl}, base=902)


# --------------------------------------------------------------------------------------------- greedy_verify
def _greedy_inputs(batch: int, width: int, base: int):
    g = _generator(base)
    target = torch.randint(0, 50, (batch, width + 1), generator=g)
    drafts = target[:, :width].clone()  # right guesses, then a few wrong ones
    wrong = torch.rand(batch, width, generator=g) < 0.25
    drafts[wrong] = (drafts[wrong] + 1 + torch.randint(0, 48, (int(wrong.sum()),), generator=g)) % 50
    counts = torch.randint(0, width + 1, (batch,), generator=g)
    counts[0] = width  # at least one row that may accept everything
    return target, drafts, counts


@pytest.mark.exercise("ch09.greedy_verify")
@pytest.mark.points(1)
@pytest.mark.parametrize("batch,width", [(1, 1), (6, 4), (13, 5), (40, 3)])
def test_greedy_accept_matches_solution(impl, ref, batch, width):
    args = _greedy_inputs(batch, width, base=batch * 10 + width)
    got, want = impl(*(a.clone() for a in args)), ref(*(a.clone() for a in args))
    assert_equal(got, want, f"greedy_accept tokens (B={batch}, K={width})")


@pytest.mark.exercise("ch09.greedy_verify")
@pytest.mark.points(4)
def test_greedy_accept_properties(impl):
    t = torch.tensor
    target = t([[5, 7, 2, 9], [5, 7, 2, 9], [5, 7, 2, 9], [5, 7, 2, 9]])
    drafts = t([[5, 7, 2], [5, 7, 3], [4, 7, 2], [5, 7, 2]])
    got = impl(target, drafts, t([3, 3, 3, 1]))
    want = [[5, 7, 2, 9], [5, 7, 2, -1], [5, -1, -1, -1], [5, 7, -1, -1]]
    assert got.tolist()[0] == want[0], f"all drafts accepted: the target's next token is a bonus; got {got.tolist()[0]}"
    assert got.tolist()[1] == want[1], (f"at the first mismatch the target's token replaces the draft; "
                                        f"got {got.tolist()[1]}")
    assert got.tolist()[2] == want[2], f"a first-position mismatch still emits one token; got {got.tolist()[2]}"
    assert got.tolist()[3] == want[3], (f"num_draft_tokens [1]: matching padding is never accepted, and the token "
                                        f"after the one draft is the bonus; got {got.tolist()[3]}")
    alone = impl(t([[8], [3]]), torch.empty(2, 0, dtype=torch.int64), t([0, 0]))
    assert alone.tolist() == [[8], [3]], f"no drafts: one token, the target's; got {alone.tolist()}"


def _engine_run(overrides: dict | None, method: dict | None):
    config = tiny_config(num_hidden_layers=2)
    engine = LLMEngine(tiny_model(config, seed=3), ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=48, max_model_len=64, max_num_seqs=3,
                                    speculative_config=method), overrides=overrides)
    prompts = [[11, 12, 13, 14] * 4, [7, 8, 9, 7, 8, 9, 7], [40, 41, 42, 43, 44]]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done, engine


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}


@pytest.mark.exercise("ch09.greedy_verify")
@pytest.mark.points(2)
def test_greedy_accept_inside_a_speculative_engine(impl):
    plain, _ = _engine_run(None, None)
    reference, ref_engine = _engine_run(None, NGRAM)
    mine, engine = _engine_run({"ch09.greedy_verify": impl}, NGRAM)
    assert mine == plain, "with your greedy_accept the engine's greedy output differs from plain decoding"
    got, want = engine.speculative.metrics, ref_engine.speculative.metrics
    assert (got.num_verify_steps, got.num_accepted_tokens) == (want.num_verify_steps, want.num_accepted_tokens), (
        f"the engine accepted {got.num_accepted_tokens} drafts in {got.num_verify_steps} verify steps with your "
        f"greedy_accept, {want.num_accepted_tokens} in {want.num_verify_steps} with the reference")
    assert reference == plain


# ---- ch09.expected_tokens_per_step -------------------------------------------------------------------

@pytest.mark.exercise("ch09.expected_tokens_per_step")
@pytest.mark.points(2)
def test_expected_tokens_per_step_matches_solution(impl, ref):
    g = _generator(901)
    cases = [(0.6, 4), (0.0, 5), (1.0, 3), (0.5, 0), (0.999, 7)]
    cases += [(float(a), int(k)) for a, k in zip(torch.rand(12, generator=g), torch.randint(0, 13, (12,), generator=g))]
    for a, k in cases:
        assert_scalar_close(impl(a, k), ref(a, k), f"expected_tokens_per_step({a:.4f}, {k})", rtol=1e-9)


@pytest.mark.exercise("ch09.expected_tokens_per_step")
@pytest.mark.points(2)
def test_expected_tokens_per_step_against_the_step_distribution(impl):
    """The mean over the distribution of a step's outcomes, summed term by term: n drafts accepted then a
    rejection (probability a^n (1 - a), n < k) or all k accepted (a^k), each emitting n + 1 tokens. Exact: the
    test depends on no draw (tests/test_speculative_core.py checks the formula against sampled verify steps)."""
    for a, k in [(0.3, 2), (0.6, 4), (0.8, 6), (0.9, 1), (0.0, 3), (1.0, 5), (0.95, 12)]:
        outcomes = [(n + 1, a ** n * (1 - a)) for n in range(k)] + [(k + 1, a ** k)]
        mean = sum(tokens * prob for tokens, prob in outcomes)
        assert_scalar_close(impl(a, k), mean, f"expected_tokens_per_step({a}, {k}) against the sum over a step's "
                                              f"outcomes (n accepted + the target's token)", rtol=1e-9)


@pytest.mark.exercise("ch09.expected_tokens_per_step")
@pytest.mark.points(1)
def test_expected_tokens_per_step_rejects_bad_input(impl, ref):
    valid = (0.6, 4)
    assert_rejects(impl, valid, ref(*valid), [(-0.1, 4), (1.5, 4), (0.6, -1), (0.6, 2.5)], "expected_tokens_per_step")
