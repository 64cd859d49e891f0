"""EAGLE-2 draft trees (chapter 9, minillm/speculative/eagle.py draft_tree, tree_proposers.EagleTreeProposer).

The tree search must compute, for every node it expands, what the head computes for that node's path drafted as a
chain from scratch (training's DraftBlock, no padding, no cache, no tree mask); with top-1 and a beam of 1 it is the
chain; depth 1 holds the chain's first draft. The rerank keeps the most probable nodes within the budget, parents
first. In the engine, greedy "eagle_tree" output equals plain decoding, under KV pressure too, and trees stay
within their node budget.
"""
from __future__ import annotations

import pytest
import torch

from minillm.engine.sequence import Sequence
from minillm.sampling_params import SamplingParams
from minillm.speculative.config import SpeculativeConfig, verify_query_lens
from minillm.speculative.eagle import DraftTreeCandidates
from minillm.speculative.tree_proposers import EagleTreeProposer, best_candidates_tree
from test_head_proposer import K, capture_on_cpu, random_proposer, record, windows_of
from tiny import one_thread  # noqa: F401  (autouse: one torch thread)


@torch.no_grad()
def path_log_probs(proposer, seq, features, path: list[int]) -> torch.Tensor:
    """The head's log-probabilities [V] after drafting `path` below seq's last token, as a chain from scratch:
    training's DraftBlock over the last <= window features, each step recomputing everything."""
    heads, parts = proposer.heads, proposer.target
    feats = features[-proposer.window:][None]
    end = features.shape[0]
    tokens = torch.tensor(seq.token_ids[end - feats.shape[1] + 1:end + 1])[None]
    for token in [None, *path]:
        if token is not None:
            feats = torch.cat([feats, g[:, -1:]], 1)
            tokens = torch.cat([tokens, torch.tensor([[token]])], 1)
        m = feats.shape[1]
        g, _ = heads(feats, parts.embed(tokens), torch.arange(m)[None], torch.ones(1, m, dtype=torch.bool))
    return torch.log_softmax(parts.logits(parts.final_norm(g[0, -1])).float(), -1)


def test_every_expanded_node_scores_its_children_as_its_path_drafted_alone():
    proposer, config = random_proposer("eagle")
    seqs, features = windows_of(proposer, config, [3, 7, 10])  # windows of 2, 6 (full) and 6 of 9 features
    topk, beam, depth = 3, 2, 3
    found = proposer.propose_tree_candidates(seqs, [depth, depth, 2], topk, beam)
    for seq, feats, cand in zip(seqs, features, found):
        m = cand.token_ids.shape[0]
        assert m == topk + (int(cand.depths.max()) - 1) * beam * topk
        paths = {-1: []}
        for c in range(m):  # parents come first
            paths[c] = paths[int(cand.parents[c])] + [int(cand.token_ids[c])]
        for node in [-1, *sorted(set(cand.parents.tolist()) - {-1})]:  # the root and every expanded node
            children = (cand.parents == node).nonzero().flatten()
            assert children.numel() == topk
            expected = path_log_probs(proposer, seq, feats, paths[node]).topk(topk)
            assert cand.token_ids[children].tolist() == expected.indices.tolist()
            base = 0.0 if node < 0 else float(cand.scores[node])
            torch.testing.assert_close(cand.scores[children], base + expected.values, rtol=1e-4, atol=1e-4)
        for d in range(1, int(cand.depths.max())):  # the expanded nodes of a depth are its `beam` best
            level = (cand.depths == d).nonzero().flatten()
            expanded = [c for c in level.tolist() if (cand.parents == c).any()]
            assert len(expanded) == beam
            assert min(cand.scores[expanded]) >= max(cand.scores[[c for c in level.tolist() if c not in expanded]])


def test_top1_with_a_beam_of_one_is_the_chain_and_depth_one_holds_its_first_draft():
    proposer, config = random_proposer("eagle")
    seqs, _ = windows_of(proposer, config, [3, 7, 10], seed=4)
    chains = proposer.propose(seqs, [K] * 3)
    for seq, chain, cand in zip(seqs, chains, proposer.propose_tree_candidates(seqs, [K] * 3, 1, 1)):
        assert cand.token_ids.tolist() == chain and cand.parents.tolist() == list(range(-1, K - 1))
    for chain, cand in zip(chains, proposer.propose_tree_candidates(seqs, [K] * 3, 5, 3)):
        first = cand.scores[cand.depths == 1].argmax()
        assert int(cand.token_ids[first]) == chain[0]


def test_the_rerank_keeps_the_most_probable_nodes_parents_first():
    # candidates: 1 <- root (-0.1), 2 <- root (-1.0), 3 <- 1 (-0.1: a tie with its parent), 4 <- 1 (-2.0),
    # 5 <- 2 (-1.5), 6 <- 3 (-0.3)
    cand = DraftTreeCandidates(torch.tensor([11, 12, 13, 14, 15, 16]), torch.tensor([-1, -1, 0, 0, 1, 2]),
                               torch.tensor([-0.1, -1.0, -0.1, -2.0, -1.5, -0.3]), torch.tensor([1, 1, 2, 2, 2, 3]))
    draft = best_candidates_tree(9, cand, 4)
    assert draft.token_ids == [9, 11, 13, 16, 12] and draft.tree.parents.tolist() == [-1, 0, 1, 2, 0]
    for n in range(1, 7):  # every budget: n nodes below the root, a valid tree, the n best scores
        draft = best_candidates_tree(9, cand, n)
        assert draft.num_nodes == n + 1
        assert sorted(draft.token_ids[1:]) == sorted(int(cand.token_ids[c]) for c in
                                                      cand.scores.argsort(descending=True, stable=True)[:n])
    with pytest.raises(ValueError, match="num_nodes must be an integer in \\[1, 63\\]"):
        best_candidates_tree(9, cand, 64)


def test_eagle_tree_proposer_respects_its_budget_and_depths():
    proposer, config = random_proposer("eagle")
    seqs, _ = windows_of(proposer, config, [3, 7, 10], seed=5)
    seqs.append(Sequence("new", [1, 2, 3], SamplingParams(temperature=0)))  # no features recorded: no tree
    tree = EagleTreeProposer(proposer, num_nodes=6, topk=3, beam=2)
    drafts = tree.propose_trees(seqs, [K, 2, 1, K])
    assert drafts[3] is None
    for seq, depth, draft in zip(seqs, [K, 2, 1], drafts):  # depth 1 holds only the root's top-3
        assert draft.num_nodes == (7 if depth > 1 else 4) and draft.tree.max_depth <= depth
        assert draft.token_ids[0] == seq.last_token_id
    assert tree.hidden_state_kind == "pre_norm" and tree.active_requests() == proposer.active_requests()
    for bad, match in (({"num_nodes": 64}, "num_nodes"), ({"topk": 2, "beam": 3}, "beam")):
        with pytest.raises(ValueError, match=match):
            EagleTreeProposer(proposer, **bad)
    with pytest.raises(ValueError, match="beam must be an integer in \\[1, topk = 2\\]"):
        proposer.propose_tree_candidates(seqs, [1] * 4, 2, 3)


def test_config_registers_eagle_tree_and_its_node_budget():
    spec = SpeculativeConfig.from_dict({"method": "eagle_tree", "num_speculative_tokens": 5, "num_tree_nodes": 63})
    assert spec.num_tree_nodes == 63
    with pytest.raises(ValueError, match="num_tree_nodes must be None or an integer in \\[1, 63\\], got 64"):
        SpeculativeConfig("eagle_tree", 5, num_tree_nodes=64)
    with pytest.raises(ValueError, match="only read by methods medusa_tree, eagle_tree"):
        SpeculativeConfig("eagle", 5, num_tree_nodes=8)
    from minillm.config import EngineConfig
    assert verify_query_lens(EngineConfig(speculative_config={"method": "eagle_tree",
                                                              "num_speculative_tokens": 4})) == (1,)


@pytest.fixture(scope="module")
def eagle_dir(tmp_path_factory):
    """A random (untrained, not identity) EAGLE head for the engine tests' tiny target, saved as train-heads does."""
    from minillm.speculative.heads import HeadConfig, save_heads
    from minillm.speculative.train_heads import initial_heads
    from test_engine import tiny_config, tiny_model
    config = tiny_config(num_hidden_layers=3)
    model = tiny_model(config)
    head_config = HeadConfig.for_target("eagle", config, 1)
    heads = initial_heads(head_config, model)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return str(save_heads(tmp_path_factory.mktemp("heads") / "eagle", heads, head_config))


@pytest.mark.parametrize("num_blocks", [64, 12])  # 12 blocks of 4 slots: the four requests preempt each other
@pytest.mark.parametrize("ahead", [False, True])  # SpeculativeConfig.draft_ahead: the search started a step early
def test_eagle_tree_in_the_engine_equals_plain_decoding(model_and_config, plain, eagle_dir, num_blocks, ahead):
    from test_speculative_tree_engine import run
    sizes = []

    def spy(proposer):
        inner = proposer.propose_trees
        proposer.propose_trees = lambda seqs, depths: [sizes.append(d.num_nodes) or d if d else d
                                                       for d in inner(seqs, depths)]
        return proposer
    spec = {"method": "eagle_tree", "num_speculative_tokens": K, "model": eagle_dir, "num_tree_nodes": 7,
            "draft_ahead": ahead}
    collected = []
    outputs, engine = run(model_and_config, spec, num_blocks, proposer=lambda p: spy(watch_ahead(p, collected)))
    assert outputs == plain and isinstance(engine.speculative.proposer, EagleTreeProposer)
    assert any(collected) == ahead  # ahead: some proposals were the ones started a step early
    assert sizes and max(sizes) <= 8 and engine.speculative.tree.num_nodes_scored > 0
    assert engine.speculative.metrics.num_verify_steps > 0


def test_tree_search_width_is_validated_and_reaches_the_search(model_and_config, plain, eagle_dir):
    """speculative_config tree_search_width sets EAGLE-2's top-k and beam; outputs stay plain decoding's."""
    from test_speculative_tree_engine import run
    with pytest.raises(ValueError, match="tree_search_width must be None or an integer in \\[1, 64\\], got 0"):
        SpeculativeConfig("eagle_tree", 5, tree_search_width=0)
    with pytest.raises(ValueError, match="tree_search_width is only read by method eagle_tree, got method 'eagle'"):
        SpeculativeConfig("eagle", 5, tree_search_width=8)
    widths = []

    def spy(proposer):
        inner = proposer.heads.propose_tree_candidates
        proposer.heads.propose_tree_candidates = lambda seqs, depths, topk, beam: \
            widths.append((topk, beam)) or inner(seqs, depths, topk, beam)
        return proposer
    spec = {"method": "eagle_tree", "num_speculative_tokens": K, "model": eagle_dir, "num_tree_nodes": 7,
            "tree_search_width": 3, "draft_ahead": False}
    outputs, engine = run(model_and_config, spec, 64, proposer=spy)
    assert outputs == plain and widths and set(widths) == {(3, 3)}


def watch_ahead(proposer, collected: list[bool]):
    """Record, per tree proposal, whether a search started ahead was pending when it was asked for."""
    inner = proposer.propose_trees

    def propose_trees(seqs, depths):
        collected.append(proposer.heads._ahead is not None)
        return inner(seqs, depths)
    proposer.propose_trees = propose_trees
    return proposer


def test_config_switches_drafting_ahead():
    assert SpeculativeConfig("eagle", 3).draft_ahead is None  # None: on for head methods on a GPU, off on a CPU
    assert SpeculativeConfig.from_dict({"method": "eagle_tree", "num_speculative_tokens": 3,
                                        "draft_ahead": True}).draft_ahead
    with pytest.raises(ValueError, match="draft_ahead must be True, False or None, got 1"):
        SpeculativeConfig("eagle", 3, draft_ahead=1)
    with pytest.raises(ValueError, match="draft_ahead is only read by the head methods .*got method 'ngram'"):
        SpeculativeConfig("ngram", 3, draft_ahead=True)


def test_eagle_tree_sampled_requests_run_next_to_greedy_ones(model_and_config, plain, eagle_dir):
    from test_speculative_tree_engine import GREEDY, PROMPTS, run
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True, seed=3)
    requests = list(zip(PROMPTS, GREEDY)) + [(PROMPTS[1], sampled)]
    spec = {"method": "eagle_tree", "num_speculative_tokens": K, "model": eagle_dir}
    first, _ = run(model_and_config, spec, requests=requests)
    second, _ = run(model_and_config, spec, requests=requests)
    assert first == second and len(first["4"]) == 12
    assert {rid: first[rid] for rid in plain} == plain


from test_speculative_tree_engine import model_and_config, plain  # noqa: E402,F401  (module fixtures)


def test_tree_graph_bookkeeping_replays_what_the_eager_search_finds(monkeypatch):
    """TreeDraftGraphs without a GPU (its capture replaced by a CPU re-run on the static inputs): batches of 3
    and 4 share the bucket-4 inputs; a batch of 2 gets its own bucket; a depth-2 search in bucket 4 replays the
    depth-3 graph and keeps its first two levels; every result equals the op-by-op search's."""
    from minillm.speculative.head_proposer import DraftGraphs
    from minillm.speculative.tree_graphs import TreeDraftGraphs
    graphs, config = random_proposer("eagle", cuda_graphs=True)
    eager, _ = random_proposer("eagle")

    monkeypatch.setattr(TreeDraftGraphs, "_capture", capture_on_cpu)
    monkeypatch.setattr(DraftGraphs, "fits", lambda self, windows: True)
    topk, beam = 3, 2
    for lengths, depth, seed in (([3, 7, 10], 3, 1), ([4, 5, 6, 9], 3, 2), ([5, 8], 2, 3), ([6, 7, 9], 2, 4)):
        seqs, _ = windows_of(graphs, config, lengths, seed)
        seqs_eager, _ = windows_of(eager, config, lengths, seed)
        got = graphs.propose_tree_candidates(seqs, [depth] * len(seqs), topk, beam)
        want = eager.propose_tree_candidates(seqs_eager, [depth] * len(seqs), topk, beam)
        for a, b in zip(got, want):
            assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.parents, b.parents)
            assert torch.equal(a.depths, b.depths)
            torch.testing.assert_close(a.scores, b.scores)
    assert sorted(graphs.tree_graphs.graphs) == [(2, (2, topk, beam)), (4, (3, topk, beam))]


def test_host_tree_helpers_equal_the_tensor_algorithms():
    """host_token_tree (the proposers' per-step trees) builds what TokenTree.from_parents builds, and
    greedy_tree_path walks to the path verify_tree_greedy accepts (random trees, a 3-token alphabet: many
    matches, siblings with equal tokens, ties in depth)."""
    import random
    from minillm.speculative.tree import TokenTree, ancestor_bitmasks, verify_tree_greedy
    from minillm.speculative.tree_verify import greedy_tree_path, host_token_tree
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 33)
        parents = [-1] + [rng.randrange(i) for i in range(1, n)]
        fast, slow = host_token_tree(parents), TokenTree.from_parents(parents)
        for name in ("parents", "depths", "ranks", "attn_mask"):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), (trial, name)
        for name in ("parent_list", "depth_list", "row_bitmasks"):  # kept by host_token_tree, computed by from_parents
            assert getattr(fast, name) == getattr(slow, name), (trial, name)
        assert slow.row_bitmasks == ancestor_bitmasks(slow.attn_mask) and fast.max_depth == int(slow.depths.max())
        assert host_token_tree(list(parents)) is fast  # one tree per shape: its host lists are made once
        tokens = [rng.randrange(3) for _ in range(n)]
        targets = [rng.randrange(3) for _ in range(n)]
        want = verify_tree_greedy(slow, torch.tensor([tokens]), torch.tensor([targets]))
        path = greedy_tree_path(parents, tokens, targets)
        accepted = int(want.num_accepted[0])
        assert path == want.accepted_nodes[0, :accepted + 1].tolist(), trial
        assert [tokens[j] for j in path[1:]] + [targets[path[-1]]] == want.token_ids[0, :accepted + 1].tolist()
    with pytest.raises(ValueError, match="node 2 has parent 2"):
        host_token_tree([-1, 0, 2])
    with pytest.raises(ValueError, match="a tree of 65 nodes; at most 64"):
        host_token_tree([-1] + list(range(64)))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_switched_off_speculation_keeps_no_features(model_and_config, plain, eagle_dir, async_scheduling):
    """disable_by_batch_size with a head proposer: while more requests run than the limit, no step asks for hidden
    states and the proposer holds no windows (with async scheduling those steps run async: no speculative hook at
    all); once the batch shrinks it drafts again, and the tokens stay plain decoding's."""
    from test_speculative_tree_engine import run
    seen = []

    def spy(proposer):
        inner = proposer.record_hidden_states
        proposer.record_hidden_states = lambda batch, *rest: seen.append(len(batch.seqs)) or inner(batch, *rest)
        return proposer
    spec = {"method": "eagle", "num_speculative_tokens": K, "model": eagle_dir, "disable_by_batch_size": 2,
            "draft_ahead": False}
    outputs, engine = run(model_and_config, spec, 64, proposer=spy, async_scheduling=async_scheduling)
    assert outputs == plain and (engine.async_steps is not None) == async_scheduling
    assert seen and max(seen) <= 2  # features recorded only for batches within the limit
    assert engine.speculative.metrics.num_verify_steps > 0  # drafting resumed once two requests had finished
