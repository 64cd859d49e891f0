"""Graded tests of chapter 9, drafts: prompt lookup, the tree attention mask and Medusa's tree candidates.

Prompt lookup also runs as the n-gram proposer of a speculative engine (NGramProposer calls it through `dispatch`):
the engine must draft and accept exactly what it does with its own n-gram index. The tree mask is checked by what
it is for: attention of every tree node under the mask equals attention over that node's own root path alone.
"""
from __future__ import annotations

import random

import pytest
import torch
from test_ch09_verification import NGRAM, _engine_run

from minillm.course.checks import assert_close, assert_equal, assert_rejects, assert_tensor, graded_seed
from minillm.hooks import overriding
from minillm.speculative.tree import TokenTree, dense_tree_paths, sparse_tree_paths, verify_tree_greedy


# ------------------------------------------------------------------------------------------------- ngram_lookup
@pytest.mark.exercise("ch09.ngram_lookup")
@pytest.mark.points(1)
@pytest.mark.parametrize("length,vocab", [(2, 2), (17, 4), (64, 6), (203, 9)])
def test_prompt_lookup_matches_solution(impl, ref, length, vocab):
    rng = random.Random(graded_seed(length * 10 + vocab))
    for trial in range(6):
        tokens = [rng.randrange(vocab) for _ in range(length)]
        k, max_n = rng.randint(1, 6), rng.randint(1, 4)
        min_n = rng.randint(1, max_n)
        as_given = torch.tensor(tokens) if trial % 2 else list(tokens)  # a list or a tensor, both allowed
        got, want = impl(as_given, k, max_n, min_n), ref(list(tokens), k, max_n, min_n)
        assert isinstance(got, list), f"propose_prompt_lookup returned {type(got).__name__}, expected a list of ints"
        assert got == want, (f"propose_prompt_lookup({tokens[-12:]} (last 12 of {length}), k={k}, max_n={max_n}, "
                             f"min_n={min_n}): got {got}, expected {want}")


@pytest.mark.exercise("ch09.ngram_lookup")
@pytest.mark.points(3)
def test_prompt_lookup_properties(impl):
    cases = [
        (([1, 2, 3, 4, 1, 2], 3, 3, 1), [3, 4, 1], "the suffix (1, 2) occurred at 0..1: propose what followed"),
        (([1, 2, 5, 1, 2, 6, 1, 2], 3, 2, 2), [6, 1, 2], "the MOST RECENT earlier occurrence wins"),
        (([9, 1, 2, 3, 8, 2, 3, 1, 2, 3], 3, 3, 1), [8, 2, 3], "the longest pattern is tried first"),
        (([7, 7, 7, 7], 2, 3, 1), [7], "an occurrence may overlap the suffix: (7, 7, 7) at 0..2 is the match"),
        (([3, 1, 1, 1, 1], 3, 3, 3), [1], "an occurrence may overlap the suffix: (1, 1, 1) at 1..3 is the match"),
        (([1, 2, 3], 4, 3, 1), [], "the suffix itself is not an earlier occurrence"),
        (([5], 4, 3, 1), [], "a single token has nothing earlier"),
        (([1, 2, 1, 3], 4, 3, 2), [], "min_n = 2: a one-token match does not count"),
        (([4, 5, 6, 4], 9, 1, 1), [5, 6, 4], "the proposal stops at the end of the sequence"),
    ]
    for args, want, why in cases:
        got = impl(*args)
        assert got == want, f"propose_prompt_lookup{args}: got {got}, expected {want} ({why})"


@pytest.mark.exercise("ch09.ngram_lookup")
@pytest.mark.points(1)
def test_prompt_lookup_rejects_bad_arguments(impl, ref):
    valid = ([1, 2, 3, 1, 2], 2, 3, 1)
    assert_rejects(impl, valid, ref(*valid), [([1, 2, 1], 0, 3, 1), ([1, 2, 1], 2, 1, 2), ([1, 2, 1], 2, 3, 0),
                                              (torch.ones(2, 3), 2, 3, 1)], "propose_prompt_lookup")


@pytest.mark.exercise("ch09.ngram_lookup")
@pytest.mark.points(2)
def test_prompt_lookup_as_the_engines_ngram_proposer(impl):
    plain, _ = _engine_run(None, None)
    mine, engine = _engine_run({"ch09.ngram_lookup": impl}, NGRAM)
    _, ref_engine = _engine_run(None, NGRAM)  # the engine's own n-gram index
    assert mine == plain, "with your prompt lookup the engine's greedy output differs from plain decoding"
    got, want = engine.speculative.metrics, ref_engine.speculative.metrics
    assert (got.num_draft_tokens, got.num_accepted_tokens) == (want.num_draft_tokens, want.num_accepted_tokens), (
        f"the engine drafted {got.num_draft_tokens} tokens and accepted {got.num_accepted_tokens} with your lookup, "
        f"{want.num_draft_tokens} and {want.num_accepted_tokens} with its n-gram index")


# ------------------------------------------------------------------------------------------ tree_attention_mask
def _random_parents(n: int, rng: random.Random) -> torch.Tensor:
    return torch.tensor([-1] + [rng.randrange(i) for i in range(1, n)], dtype=torch.int64)


@pytest.mark.exercise("ch09.tree_attention_mask")
@pytest.mark.points(1)
@pytest.mark.parametrize("n", [1, 2, 7, 26, 64])
def test_tree_mask_matches_solution(impl, ref, n):
    rng = random.Random(graded_seed(n))
    trees = [_random_parents(n, rng) for _ in range(3)] + [torch.tensor([-1] + list(range(n - 1)))]  # + a chain
    for parents in trees:
        assert_equal(impl(parents.clone()), ref(parents.clone()),
                     f"tree_attention_mask(parents={parents.tolist()[:12]})")


@pytest.mark.exercise("ch09.tree_attention_mask")
@pytest.mark.points(2)
def test_tree_mask_properties(impl):
    example = impl(torch.tensor([-1, 0, 0, 1]))
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert_equal(example, want, "mask of parents [-1, 0, 0, 1] (siblings 1 and 2 must not see each other)")
    tree = TokenTree.from_paths(dense_tree_paths((3, 2, 2)))  # 1 + 3 + 6 + 12 nodes
    mask = impl(tree.parents.clone())
    what = "tree_attention_mask of dense_tree_paths((3, 2, 2)) (22 nodes)"
    assert bool(mask.diagonal().all()), f"{what}: node {int((~mask.diagonal()).nonzero()[0])} must see itself"
    assert bool(mask[:, 0].all()), f"{what}: node {int((~mask[:, 0]).nonzero()[0])} must see the root (node 0)"
    assert not bool(mask.triu(1).any()), (f"{what}: mask[i, j] with j > i at {mask.triu(1).nonzero()[0].tolist()}: "
                                          "a node never sees a later node (its descendants come after it)")
    assert_equal(mask.sum(1), tree.depths + 1, f"{what}: visible nodes per row = the node's depth + 1 (its root path)")
    siblings = (tree.parents.unsqueeze(0) == tree.parents.unsqueeze(1)) & ~torch.eye(tree.num_nodes, dtype=torch.bool)
    assert not bool((mask & siblings).any()), (f"{what}: nodes {(mask & siblings).nonzero()[0].tolist()} are "
                                               "siblings (alternatives for one position): they must not see each other")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.T) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


@pytest.mark.exercise("ch09.tree_attention_mask")
@pytest.mark.points(3)
def test_tree_mask_attention_equals_each_path_alone(impl):
    rng = random.Random(graded_seed(77))
    g = torch.Generator().manual_seed(graded_seed(77))
    parents = _random_parents(19, rng)
    prefix, n, d = 5, parents.shape[0], 8
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(prefix + n, d, generator=g, dtype=torch.float64)
    v = torch.randn(prefix + n, d, generator=g, dtype=torch.float64)
    mask = impl(parents.clone())
    assert_tensor(mask, "tree mask", (n, n), torch.bool)
    out = _attention(q, k, v, torch.cat([torch.ones(n, prefix, dtype=torch.bool), mask], dim=1))
    for i in range(n):
        path, node = [], i
        while node >= 0:
            path.append(node)
            node = int(parents[node])
        keys = list(range(prefix)) + [prefix + j for j in reversed(path)]  # the prefix, then root ... node i
        alone = _attention(q[i:i + 1], k[keys], v[keys], torch.ones(1, len(keys), dtype=torch.bool))
        assert_close(out[i:i + 1], alone, f"tree node {i} (root path {list(reversed(path))}) under your mask vs "
                     "its path alone", atol=1e-10, rtol=1e-9)


# ------------------------------------------------------------------------------------------- medusa_candidates
def _trees(rng: random.Random) -> list[TokenTree]:
    accuracies = [sorted((rng.random() for _ in range(4)), reverse=True) for _ in range(3)]
    return [TokenTree.from_paths(sparse_tree_paths(accuracies, 11)), TokenTree.from_paths(dense_tree_paths((2, 2, 1))),
            TokenTree.from_paths([(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]), TokenTree.from_paths([(2,), (3,)])]


@pytest.mark.exercise("ch09.medusa_candidates")
@pytest.mark.points(1)
@pytest.mark.parametrize("batch,heads,topk", [(1, 4, 4), (3, 5, 4), (6, 4, 7), (2, 9, 5)])
def test_medusa_candidates_match_solution(impl, ref, batch, heads, topk):
    rng = random.Random(graded_seed(batch * 100 + heads * 10 + topk))
    g = torch.Generator().manual_seed(graded_seed(batch * 100 + heads * 10 + topk))
    for tree in _trees(rng):
        root = torch.randint(0, 1000, (batch,), generator=g)
        topk_ids = torch.randint(0, 1000, (batch, heads, topk), generator=g)
        args = (root, topk_ids, tree.depths, tree.ranks)
        got, want = impl(*(a.clone() for a in args)), ref(*(a.clone() for a in args))
        assert_equal(got, want, f"medusa_candidates (B={batch}, {heads} heads of top-{topk}, {tree.num_nodes} nodes)")


@pytest.mark.exercise("ch09.medusa_candidates")
@pytest.mark.points(3)
def test_medusa_candidates_properties(impl):
    root = torch.tensor([9, 8])
    head_topk = torch.tensor([[[4, 5], [6, 7]], [[14, 15], [16, 17]]])  # head 0 then head 1, best guess first
    tree = TokenTree.from_paths([(0,), (1,), (0, 0), (0, 1)])
    got = impl(root, head_topk, tree.depths.clone(), tree.ranks.clone())
    assert_equal(got, torch.tensor([[9, 4, 5, 6, 7], [8, 14, 15, 16, 17]]), "the docstring's tree, two rows")
    alone = impl(torch.tensor([3]), head_topk[:1], torch.tensor([0]), torch.tensor([0]))
    assert_equal(alone, torch.tensor([[3]]), "a tree of the root alone")
    deep = TokenTree.from_paths([(1,), (1, 0), (1, 0, 1)])
    topk3 = torch.arange(12).reshape(1, 3, 4) + 100  # head h, rank r -> 100 + 4h + r
    got = impl(torch.tensor([1]), topk3, deep.depths.clone(), deep.ranks.clone())
    assert_equal(got, torch.tensor([[1, 101, 104, 109]]), "node (1, 0, 1): head 2's rank 1 (depth 3 reads head 2)")


@pytest.mark.exercise("ch09.medusa_candidates")
@pytest.mark.points(3)
def test_medusa_candidates_in_tree_verification(impl, ref):
    """TokenTree.candidates calls the exercise; greedy tree verification against a fixed 'target' (next token =
    (7 t + 3) mod 50) must then accept the same path with yours as with the solution's."""
    g = torch.Generator().manual_seed(graded_seed(31))
    tree = TokenTree.from_paths(dense_tree_paths((3, 2, 2)))
    root = torch.randint(0, 50, (8,), generator=g)
    topk_ids = torch.randint(0, 50, (8, 3, 3), generator=g)
    follow = (7 * root + 3) % 50
    topk_ids[:4, 0, 1] = follow[:4]  # some rows: the target's token is head 0's second guess, so a path matches
    results = []
    for fn in (impl, ref):
        with overriding({"ch09.medusa_candidates": fn}):
            candidates = tree.candidates(root, topk_ids)
        results.append(verify_tree_greedy(tree, candidates, (7 * candidates + 3) % 50))
    (mine, want) = results
    assert_equal(mine.token_ids, want.token_ids, "tokens emitted by greedy tree verification")
    assert_equal(mine.accepted_nodes, want.accepted_nodes, "accepted tree nodes")
