"""The engine-independent core of speculative decoding (minillm/speculative: rejection, ngram, tree).

The statistical tests run the verifier as a decoder would, on a toy "language model" (a Markov chain over V = 8
tokens: target P[prev] and draft Q[prev]), and compare the emitted tokens with the target's own distribution by a
chi-square test; the same test must reject a mutant verifier that resamples from p instead of the residual.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from minillm.layers.sampler import top_k_filter, top_p_filter
from minillm.speculative import rejection
from minillm.speculative.ngram import NGramPool, propose_prompt_lookup, propose_prompt_lookup_batch
from minillm.speculative.rejection import (PLACEHOLDER_TOKEN_ID, expected_tokens_per_step, greedy_verify,
                                           logits_to_probs, pad_per_sequence, rejection_sample,
                                           residual_distribution, verify_draft_tokens)
from minillm.speculative.tree import (TokenTree, dense_tree_paths, prefix_tree_attention_mask, sparse_tree_paths,
                                      token_tree_from_candidates, verify_tree_greedy, verify_tree_sampling)

V, K = 8, 3


# ---------------------------------------------------------------- greedy verification

def test_greedy_verify_edge_cases():
    target = torch.tensor([[5, 6, 7, 8],   # all three drafts match -> bonus 8
                           [5, 6, 9, 8],   # mismatch in the middle -> 5, 6, then the target's 9
                           [1, 2, 3, 4],   # first draft wrong -> only the target's 1
                           [5, 6, 7, 8]])  # one draft proposed (padding after it is never accepted)
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [9, 2, 3], [5, 6, 7]])
    out = greedy_verify(target, drafts, torch.tensor([3, 3, 3, 1]))
    assert out.to_lists() == [[5, 6, 7, 8], [5, 6, 9], [1], [5, 6]]
    assert out.num_accepted.tolist() == [3, 2, 0, 1]
    assert out.token_ids[2].tolist() == [1] + [PLACEHOLDER_TOKEN_ID] * 3
    # k = 0 for every row: one ordinary decode step
    assert greedy_verify(target[:, :1], torch.empty(4, 0, dtype=torch.int64)).to_lists() == [[5], [5], [1], [5]]


def test_one_hot_target_makes_rejection_sampling_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, K + 1, V, generator=g)
    probs = logits_to_probs(logits, torch.zeros(64))
    argmax = logits.argmax(-1)
    # drafts that follow the argmax for a random number of positions, then deviate
    drafts = torch.where(torch.rand(64, K, generator=g) < 0.7, argmax[:, :K], torch.randint(0, V, (64, K), generator=g))
    counts = torch.randint(0, K + 1, (64,), generator=g)
    q = torch.softmax(torch.randn(64, K, V, generator=g), -1)
    expect = greedy_verify(argmax, drafts, counts)
    for draft_probs in (q, None):  # sampled or deterministic drafts: greedy either way
        got = rejection_sample(probs, draft_probs, drafts, counts, default_generator=g)
        assert torch.equal(got.token_ids, expect.token_ids)


def test_engine_entry_point_on_ragged_rows():
    g = torch.Generator().manual_seed(4)
    counts = torch.tensor([2, 0, 3])
    flat = torch.randn(int((counts + 1).sum()), V, generator=g)  # what the runner scores: 1 + k_b rows each
    logits = pad_per_sequence(flat, counts + 1)
    assert logits.shape == (3, K + 1, V) and torch.equal(logits[2], flat[4:])
    assert bool((logits[1, 1:] == 0).all()) and torch.equal(logits[0, :3], flat[:3])
    drafts = pad_per_sequence(torch.randint(0, V, (5,), generator=g), counts).long()
    greedy = verify_draft_tokens(logits, drafts, counts, torch.zeros(3))
    assert torch.equal(greedy.token_ids, greedy_verify(logits.argmax(-1), drafts, counts).token_ids)
    mixed = verify_draft_tokens(logits, drafts, counts, torch.tensor([0.0, 0.8, 0.0]), default_generator=g)
    assert mixed.to_lists()[0] == greedy.to_lists()[0] and mixed.to_lists()[2] == greedy.to_lists()[2]
    with pytest.raises(ValueError, match="lengths"):
        pad_per_sequence(flat, counts)


# ---------------------------------------------------------------- probability transforms and numerics

def test_logits_to_probs_applies_the_samplers_filters_per_sequence():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 2, 50, generator=g) * 3
    temps, ks, ps = torch.tensor([0.7, 0.0, 1.3]), torch.tensor([5, -1, 20]), torch.tensor([1.0, 1.0, 0.6])
    probs = logits_to_probs(logits, temps, ks, ps)
    assert probs.shape == logits.shape
    for b in (0, 2):
        rows = logits[b] / temps[b]
        expect = torch.softmax(top_p_filter(top_k_filter(rows, ks[b].repeat(2)), ps[b].repeat(2)), -1)
        torch.testing.assert_close(probs[b], expect)
    assert torch.equal(probs[1], torch.nn.functional.one_hot(logits[1].argmax(-1), 50).float())
    with pytest.raises(ValueError, match="temperatures"):
        logits_to_probs(logits, torch.tensor([-1.0, 0, 0]))
    with pytest.raises(ValueError, match="top_ps"):
        logits_to_probs(logits, temps, ks, torch.tensor([0.0, 1, 1]))


def test_numerics_and_validation():
    p = torch.softmax(torch.randn(4, V), -1)
    torch.testing.assert_close(residual_distribution(p, p), p)  # nothing left over: fall back to p
    q = torch.softmax(torch.randn(4, V), -1)
    r = residual_distribution(p, q)
    torch.testing.assert_close(r.sum(-1), torch.ones(4))
    assert bool((r[p <= q] == 0).all())
    target = torch.softmax(torch.randn(2, K + 1, V), -1)
    draft = torch.softmax(torch.randn(2, K, V), -1)
    draft[1, 1, 3] = 0.0
    tokens = torch.tensor([[0, 1, 2], [0, 3, 2]])
    with pytest.raises(ValueError, match="draft probability 0"):
        rejection_sample(target, draft, tokens)
    rejection_sample(target, draft, tokens, torch.tensor([3, 1]))  # the bad entry is padding here: fine
    with pytest.raises(ValueError, match="outside"):
        rejection_sample(target, None, torch.tensor([[0, 1, V], [0, 1, 2]]))
    with pytest.raises(ValueError, match="num_draft_tokens"):
        rejection_sample(target, None, tokens, torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_sample(target, draft[:, :2], tokens)


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(2)
    target = torch.softmax(torch.randn(3, 5, V, generator=g), -1)
    draft = torch.softmax(torch.randn(3, 4, V, generator=g), -1)
    tokens = torch.multinomial(draft.reshape(-1, V), 1, generator=g).reshape(3, 4)
    alone = rejection_sample(target[:1, :3], draft[:1, :2], tokens[:1, :2],
                             generators=[torch.Generator().manual_seed(7)])
    batched = rejection_sample(target, draft, tokens, torch.tensor([2, 4, 1]),
                               generators=[torch.Generator().manual_seed(7), None, torch.Generator().manual_seed(3)])
    assert alone.to_lists()[0] == batched.to_lists()[0]


# ---------------------------------------------------------------- losslessness, statistically

def _chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    assert float(expected.min()) >= 5, "too few expected counts for a chi-square test"
    stat = ((counts - expected) ** 2 / expected).sum()
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def _markov_chain(seed: int):
    g = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(V, V, generator=g) * 0.8, -1)  # P[prev] is the target's next-token law
    draft = torch.softmax(torch.randn(V, V, generator=g) * 0.8, -1)
    return target, draft, g


RULES = ["sampled_drafts", "one_hot_drafts", "sample_and_match"]


def _speculative_step(contexts, target, draft, g, rule="sampled_drafts"):
    """One verification step per row from the given last tokens, with random k in [0, K] per row.

    sampled_drafts: drafts ~ q, rejection_sample with q. one_hot_drafts: the draft's argmax, rejection_sample with
    draft_probs=None. sample_and_match: the draft's argmax, verified by greedy_verify against tokens sampled from
    the target at every row (what the engine's runner returns)."""
    batch = contexts.shape[0]
    prev, drafts, q_rows = contexts, [], []
    for _ in range(K):
        q = draft[prev]
        nxt = torch.multinomial(q, 1, generator=g).squeeze(-1) if rule == "sampled_drafts" else q.argmax(-1)
        drafts.append(nxt)
        q_rows.append(q)
        prev = nxt
    drafts = torch.stack(drafts, 1)
    context_per_position = torch.cat([contexts.unsqueeze(1), drafts], 1)  # after i drafts, the last token is this
    counts = torch.randint(0, K + 1, (batch,), generator=g)
    p = target[context_per_position]
    if rule == "sample_and_match":
        sampled = torch.multinomial(p.reshape(-1, V), 1, generator=g).reshape(batch, K + 1)
        return greedy_verify(sampled, drafts, counts)
    draft_probs = torch.stack(q_rows, 1) if rule == "sampled_drafts" else None
    return rejection_sample(p, draft_probs, drafts, counts, default_generator=g)


def _first_two_tokens(target, draft, g, n, rule):
    contexts = torch.zeros(n, dtype=torch.int64)
    out = _speculative_step(contexts, target, draft, g, rule)
    first = out.token_ids[:, 0]
    # rows that emitted a single token need a second step, from that token
    again = _speculative_step(first, target, draft, g, rule).token_ids[:, 0]
    second = torch.where(out.num_accepted >= 1, out.token_ids[:, 1], again)
    return first, second


def _lossless_p_values(rule="sampled_drafts", n=20000, seed=0):
    target, draft, g = _markov_chain(seed)
    first, second = _first_two_tokens(target, draft, g, n, rule)
    p_first = _chi_square_p_value(torch.bincount(first, minlength=V).double(), n * target[0].double())
    pair_law = (target[0].unsqueeze(1) * target).double().flatten()  # P(a | 0) P(b | a)
    p_pair = _chi_square_p_value(torch.bincount(first * V + second, minlength=V * V).double(), n * pair_law)
    return p_first, p_pair


@pytest.mark.parametrize("rule", RULES)
def test_verification_keeps_the_target_distribution(rule):
    p_first, p_pair = _lossless_p_values(rule)
    assert p_first > 1e-3 and p_pair > 1e-3, (p_first, p_pair)


def test_the_chi_square_test_catches_a_verifier_without_the_residual(monkeypatch):
    monkeypatch.setattr(rejection, "residual_distribution", lambda p, q: p)  # the mutant: resample from p
    p_first, p_pair = _lossless_p_values()
    assert p_first < 1e-6 and p_pair < 1e-6, (p_first, p_pair)


def test_mean_tokens_per_step_matches_leviathans_formula():
    # one fixed p and q at every position: each draft is accepted with probability sum(min(p, q))
    g = torch.Generator().manual_seed(5)
    p, q = torch.softmax(torch.randn(2, V, generator=g), -1)
    n = 20000
    drafts = torch.multinomial(q, n * K, replacement=True, generator=g).reshape(n, K)
    out = rejection_sample(p.expand(n, K + 1, V), q.expand(n, K, V), drafts, default_generator=g)
    alpha = float(torch.minimum(p, q).sum())
    expect = expected_tokens_per_step(alpha, K)
    assert abs(float(out.num_accepted.double().mean()) + 1 - expect) < 0.03, (alpha, expect)
    assert expected_tokens_per_step(1.0, 4) == 5.0 and expected_tokens_per_step(0.0, 4) == 1.0


# ---------------------------------------------------------------- prompt lookup and the lookahead pool

def test_prompt_lookup_proposals():
    assert propose_prompt_lookup([1, 2, 3, 4, 1, 2, 3, 5, 6, 1, 2], 3) == [3, 5, 6]  # n=2, most recent match
    assert propose_prompt_lookup([7, 1, 2, 9, 8, 1, 2, 4, 2], 2) == [4, 2]  # n=1: latest earlier "2" is at 6
    assert propose_prompt_lookup([1, 2, 3, 9, 2, 3, 1, 2, 3], 2) == [9, 2]  # n=3 match beats a later n=2 match
    assert propose_prompt_lookup([1, 2, 1, 2, 1, 2], 5) == [1, 2]  # runs into the suffix, shorter near the end
    assert propose_prompt_lookup([1, 2, 3, 4], 3) == []  # nothing repeats
    assert propose_prompt_lookup([5], 3) == []
    assert propose_prompt_lookup(torch.tensor([4, 4, 4, 4]), 2, max_n=2, min_n=2) == [4]
    assert propose_prompt_lookup_batch([[1, 2, 1], [3]], 2) == [[2, 1], []]
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        propose_prompt_lookup([1, 2], 0)
    with pytest.raises(ValueError, match="min_n"):
        propose_prompt_lookup([1, 2], 2, max_n=1, min_n=2)


def test_ngram_pool():
    pool = NGramPool(n=3, max_per_key=2)
    pool.add_window(torch.tensor([[1, 1, 2], [5, 6, 7], [8, 9, 7]]))  # columns (1,5,8) (1,6,9) (2,7,7)
    assert pool.lookup(1) == [(6, 9), (5, 8)] and pool.lookup(2) == [(7, 7)]
    pool.add([1, 5, 8])  # refresh: most recent first
    assert pool.lookup(1) == [(5, 8), (6, 9)]
    pool.add([1, 0, 0])  # evicts the oldest continuation of 1
    assert pool.lookup(1) == [(0, 0), (5, 8)] and pool.lookup(1, max_candidates=1) == [(0, 0)]
    assert pool.lookup_tensor(3).shape == (0, 2) and pool.lookup_tensor(1).tolist() == [[0, 0], [5, 8]]
    # raw Jacobi levels: the guess at (t, i+1) continues (t-1, i), so n-grams run along diagonals
    jacobi = NGramPool(n=3)
    jacobi.add_trajectory([[1, 2, 3, 4], [10, 11, 12, 13], [20, 21, 22, 23]])
    assert jacobi.lookup(1) == [(11, 22)] and jacobi.lookup(2) == [(12, 23)] and len(jacobi) == 2
    prompt = NGramPool(n=2)
    prompt.add_sequence([4, 5, 4, 6])
    assert prompt.lookup(4) == [(6,), (5,)]
    with pytest.raises(ValueError, match="3 tokens"):
        pool.add([1, 2])


# ---------------------------------------------------------------- token trees

def _random_parents(n: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def test_tree_mask_matches_brute_force_ancestors():
    rng = random.Random(0)
    for n in (1, 2, 7, 31, 64):
        parents = _random_parents(n, rng)
        tree = TokenTree.from_parents(parents)
        brute = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                brute[i, j] = True
                j = parents[j]
        assert torch.equal(tree.attn_mask, brute)
        assert torch.equal(tree.depths, brute.sum(1) - 1)
    full = prefix_tree_attention_mask(tree.attn_mask, 5)
    assert full.shape == (64, 69) and bool(full[:, :5].all())
    with pytest.raises(ValueError, match="parent"):
        TokenTree.from_parents([-1, 0, 2])


def test_tree_from_medusa_paths_and_candidates():
    tree = TokenTree.from_paths([(1,), (0,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.position_ids(torch.tensor([10])).tolist() == [[10, 11, 11, 12, 12, 12, 13]]
    heads = torch.tensor([[[50, 51], [60, 61], [70, 71]]])  # [B=1, 3 heads, top-2]
    assert tree.candidates(torch.tensor([9]), heads).tolist() == [[9, 50, 51, 60, 61, 60, 70]]
    with pytest.raises(ValueError, match="no parent"):
        TokenTree.from_paths([(0, 1)])
    with pytest.raises(ValueError, match="heads"):
        tree.candidates(torch.tensor([9]), heads[:, :2])
    trie, tokens = token_tree_from_candidates(4, [(5, 6), (5, 7), (8,)])
    assert trie.parents.tolist() == [-1, 0, 0, 1, 1] and tokens.tolist() == [4, 5, 8, 6, 7]


def test_sparse_tree_is_the_best_valid_subtree():
    acc = [[0.7, 0.2, 0.05], [0.5, 0.25, 0.1], [0.45, 0.15, 0.08]]
    paths = sparse_tree_paths(acc, 12)
    TokenTree.from_paths(paths)  # every prefix present
    score = {p: torch.tensor([acc[d][r] for d, r in enumerate(p)]).prod().item()
             for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)}
    assert set(paths) == set(sorted(score, key=score.get, reverse=True)[:12])
    dense = dense_tree_paths([3, 2, 1])
    assert len(dense) == 15 and TokenTree.from_paths(dense).depths.bincount().tolist() == [1, 3, 6, 6]
    assert set(sparse_tree_paths(acc, 39)) == set(dense_tree_paths([3, 3, 3]))  # asking for all: the full tree


def _brute_force_greedy(parents, cands, target):
    best, best_depth = 0, 0
    for i in range(len(parents)):
        path, j = [], i
        while j > 0:
            path.append(j)
            j = parents[j]
        if all(cands[j] == target[parents[j]] for j in path) and len(path) > best_depth:
            best, best_depth = i, len(path)
    return best, best_depth


def test_tree_verification_picks_the_longest_matching_path():
    tree = TokenTree.from_paths([(0,), (1,), (0, 0), (1, 0), (1, 0, 0)])  # nodes: r a b a0 b0 b00
    cands = torch.tensor([[9, 3, 4, 5, 6, 7]])
    target = torch.tensor([[4, 1, 6, 2, 7, 8]])  # root->b (4), b->b0 (6), b0->b00 (7), bonus 8
    out = verify_tree_greedy(tree, cands, target)
    assert out.to_lists() == [[4, 6, 7, 8]] and out.accepted_nodes.tolist() == [[0, 2, 4, 5]]
    rng = random.Random(1)
    g = torch.Generator().manual_seed(1)
    for n in (1, 5, 20):
        parents = _random_parents(n, rng)
        tree = TokenTree.from_parents(parents)
        cands = torch.randint(0, 3, (16, n), generator=g)  # a small vocabulary, so paths often match
        target = torch.randint(0, 3, (16, n), generator=g)
        out = verify_tree_greedy(tree, cands, target)
        for b in range(16):
            best, depth = _brute_force_greedy(parents, cands[b].tolist(), target[b].tolist())
            nodes = out.accepted_nodes[b, : depth + 1].tolist()
            assert int(out.num_accepted[b]) == depth and nodes[-1] == best
            assert out.to_lists()[b] == cands[b, nodes[1:]].tolist() + [int(target[b, best])]


def test_tree_sampling_with_a_one_hot_target_is_greedy():
    # a Medusa-like tree: siblings hold distinct tokens (each head's top-k), as sampling verification expects
    tree = TokenTree.from_paths(sparse_tree_paths([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2], [0.4, 0.3]], 14))
    g = torch.Generator().manual_seed(2)
    heads = torch.stack([torch.stack([torch.randperm(4, generator=g)[:3] for _ in range(3)]) for _ in range(32)])
    cands = tree.candidates(torch.randint(0, 4, (32,), generator=g), heads)
    target = torch.randint(0, 4, (32, tree.num_nodes), generator=g)
    one_hot = torch.nn.functional.one_hot(target, 4).float()
    greedy = verify_tree_greedy(tree, cands, target)
    sampled = verify_tree_sampling(tree, cands, one_hot, default_generator=g)
    assert torch.equal(sampled.token_ids, greedy.token_ids)
    assert torch.equal(sampled.accepted_nodes, greedy.accepted_nodes)
    assert 0 < int(greedy.num_accepted.sum()) and bool((greedy.num_accepted < 3).any())  # the test has teeth


def test_tree_sampling_keeps_the_target_distribution():
    target, draft, g = _markov_chain(3)
    tree = TokenTree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    n = 30000

    def step(roots):
        # candidates: the draft's top-2 after the root, then its top choices after those
        top = draft.topk(2, -1).indices
        first = top[roots]  # [n, 2]
        second = top[first]  # [n, 2, 2]
        cands = torch.stack([roots, first[:, 0], first[:, 1], second[:, 0, 0], second[:, 0, 1], second[:, 1, 0]], 1)
        return verify_tree_sampling(tree, cands, target[cands], default_generator=g)

    out = step(torch.zeros(n, dtype=torch.int64))
    first = out.token_ids[:, 0]
    second = torch.where(out.num_accepted >= 1, out.token_ids[:, 1], step(first).token_ids[:, 0])
    pair_law = (target[0].unsqueeze(1) * target).double().flatten()
    assert _chi_square_p_value(torch.bincount(first, minlength=V).double(), n * target[0].double()) > 1e-3
    assert _chi_square_p_value(torch.bincount(first * V + second, minlength=V * V).double(), n * pair_law) > 1e-3


def test_logits_to_probs_filters_top_k_before_top_p():
    # the sampler's order: top-k keeps [0.4, 0.35, -], renormalised [0.53, 0.47]; top-p 0.5 then keeps one token.
    # The other order would keep two.
    logits = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))
    probs = logits_to_probs(logits, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([0.5]))
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0, 0.0]]))


def test_a_seeded_row_draws_the_same_numbers_whatever_the_other_rows_draft():
    g = torch.Generator().manual_seed(5)
    target = torch.softmax(torch.randn(2, 5, V, generator=g) * 0.1, -1)  # flat: the final draw decides a lot
    tokens = torch.randint(0, V, (2, 4), generator=g)
    for seed in range(8):
        alone = rejection_sample(target[:1, :2], None, tokens[:1, :1], generators=[torch.Generator().manual_seed(seed)])
        batched = rejection_sample(target, None, tokens, torch.tensor([1, 4]),
                                   generators=[torch.Generator().manual_seed(seed), None])
        assert alone.to_lists()[0] == batched.to_lists()[0], seed
