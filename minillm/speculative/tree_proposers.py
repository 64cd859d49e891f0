"""Proposers that draft token trees (chapter 9): prompt lookup with several continuations, and top-k heads.

NGramTreeProposer ("ngram_tree"). Prompt lookup (proposer.NGramProposer) bets on one earlier occurrence of the
sequence's last n tokens; when the text repeats with variations (code, lists, templates) the latest occurrence is
often not the one that continues. A tree keeps several: every earlier occurrence of the suffix (longest n first,
latest first) contributes its continuation as a branch, and branches that agree on their first tokens share those
nodes (a trie), so one verify step tries them all. Branches enter in that order of trust and the node budget
cuts the last ones, so what the scheduler trims (a prefix of the node order) is the least trusted part.

TopKTreeProposer. Medusa heads (minillm/speculative/medusa.py) give, per sequence, each head's top-k tokens; a
static tree of index paths (tree.sparse_tree_paths from per-head accuracies, or tree.dense_tree_paths) says which
combinations to try, and TokenTree.candidates reads the tokens off the heads. Any proposer with
`propose_candidates(seqs, topk) -> [(ids [K, topk], probs [K, topk]) | None]` plugs in; the wrapper passes the
head proposer's hidden-state bookkeeping through, so the engine feeds it as it feeds the head proposer itself.
"medusa_tree" builds one from trained Medusa heads (`medusa_tree_paths`: the sparse tree from their measured
top-1 agreement, see there).

EagleTreeProposer ("eagle_tree"). EAGLE-2's dynamic tree: the EAGLE head searches a tree of candidates, depth by
depth (eagle.EagleProposer.draft_tree: expand the `beam` most probable nodes of each depth, top-k children each),
and `best_candidates_tree` keeps the `num_nodes` candidates with the highest cumulative draft probability. Unlike
Medusa's static tree, the shape follows the head's confidence request by request: a sure first token gets a deep
chain, an unsure one several siblings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceT
from typing import TYPE_CHECKING, Any

import torch

from minillm.speculative.proposer import known_tokens
from minillm.speculative.tree import MAX_TREE_NODES, TokenTree, sparse_tree_paths
from minillm.speculative.tree_verify import TreeDraft, TreeProposer, host_token_tree

if TYPE_CHECKING:
    from minillm.engine.sequence import Sequence
    from minillm.speculative.eagle import DraftTreeCandidates
    from minillm.speculative.config import SpeculativeConfig

NODES_PER_LEVEL = 4  # medusa_tree: a tree of 4 nodes per level of depth (16 for k = 4)
# eagle_tree: nodes below the root, and the search's width: the top-k children of each expanded node and the beam
# of nodes expanded per depth, one number for both (speculative_config tree_search_width). A wider search only adds
# candidates, so the best num_nodes of them are at least as probable under the draft; on the P7 prompts (CPU, fp32,
# 63 nodes, k = 5, 64 tokens each, 2026-12-03) the mean accepted length went 2.75 / 2.79 / 2.83 / 2.88 at widths
# 8 / 10 (EAGLE-2's top-k) / 12 / 16. The price is drafting: `beam` query rows per depth through the head and the
# LM head, and topk + (depth - 1) * beam * topk candidates to rerank. On the H200 (bf16, P7 prompts, 128 tokens,
# 2026-12-03, two runs) width 16 accepted 3.06 against width 8's 2.91 at 0.99x / 0.90x of plain decoding's speed
# against 1.04x / 0.98x: 16 is the default, for EAGLE-2's acceptance; width 8 is the faster search.
EAGLE_TREE_NODES, EAGLE_TREE_WIDTH = 32, 16
NGRAM_TREE_NODES = 32  # ngram_tree: nodes per trie, the root included


def trie_draft(root_token_id: int, continuations: SequenceT[SequenceT[int]], max_nodes: int) -> TreeDraft:
    """Merge continuations into a trie below root_token_id, nodes in insertion order (so earlier continuations
    keep their nodes when max_nodes cuts), sibling tokens distinct (what verify_tree_sampling assumes)."""
    if not 1 <= max_nodes <= MAX_TREE_NODES:
        raise ValueError(f"max_nodes must be in [1, {MAX_TREE_NODES}], got {max_nodes}")
    parents, tokens = [-1], [int(root_token_id)]
    child: dict[tuple[int, int], int] = {}
    for continuation in continuations:
        node = 0
        for token in continuation:
            key = (node, int(token))
            if key not in child:
                if len(tokens) == max_nodes:
                    break
                child[key] = len(tokens)
                parents.append(node)
                tokens.append(int(token))
            node = child[key]
    return TreeDraft(host_token_tree(parents), tokens)


class NGramTreeProposer(TreeProposer):
    """Prompt lookup with up to num_branches continuations per step, merged into one tree of <= max_nodes."""

    method = "ngram_tree"

    def __init__(self, prompt_lookup_max: int = 3, prompt_lookup_min: int = 1, num_branches: int = 4,
                 max_nodes: int = NGRAM_TREE_NODES, search_window: int = 4096) -> None:
        if not (isinstance(prompt_lookup_min, int) and isinstance(prompt_lookup_max, int)
                and 1 <= prompt_lookup_min <= prompt_lookup_max):
            raise ValueError(f"need integers 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{prompt_lookup_min!r}, {prompt_lookup_max!r}")
        for name, value, low, high in (("num_branches", num_branches, 1, MAX_TREE_NODES),
                                       ("max_nodes", max_nodes, 2, MAX_TREE_NODES),
                                       ("search_window", search_window, 1, 1 << 30)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        self.max_n, self.min_n = prompt_lookup_max, prompt_lookup_min
        self.num_branches, self.max_nodes, self.search_window = num_branches, max_nodes, search_window
        # request_id -> (tokens indexed so far, {n: {n-gram: ends of its occurrences}})
        self._index: dict[str, tuple[int, dict[int, dict[tuple[int, ...], list[int]]]]] = {}

    def continuations(self, tokens: list[int], depth: int, request_id: str | None = None) -> list[list[int]]:
        """Distinct continuations (each <= depth tokens) of earlier occurrences of the last n tokens, n from
        max_n down, latest occurrence first, within the last search_window tokens. With a request_id the
        request's index of occurrences is extended by the tokens added since its last step (O(new tokens * n)),
        not rebuilt: a rescan of a 1k-token context cost 0.45 ms per step on the CPU, the index a few us."""
        table = self._occurrences(tokens, request_id)
        found: list[list[int]] = []
        low = max(0, len(tokens) - 1 - self.search_window)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            for end in reversed(table[n].get(tuple(tokens[-n:]), ())):  # latest first
                if end < max(n, low):
                    break
                continuation = tokens[end:end + depth]
                if continuation and continuation not in found:
                    found.append(continuation)
                    if len(found) == self.num_branches:
                        return found
        return found

    def _occurrences(self, tokens: list[int], request_id: str | None) -> dict[int, dict[tuple[int, ...], list[int]]]:
        """Per n, each n-gram -> where its occurrences end (ascending), for the n-grams that end before the last
        token (the suffix is not an earlier occurrence of itself); kept per request and extended, or built afresh
        without a request_id."""
        done, table = self._index.get(request_id, (0, None)) if request_id is not None else (0, None)
        if table is None:
            table = {n: {} for n in range(self.min_n, self.max_n + 1)}
        last = len(tokens) - 1
        for end in range(max(done, 1), last + 1):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                table[n].setdefault(tuple(tokens[end - n:end]), []).append(end)
        if request_id is not None:
            self._index[request_id] = (max(done, last + 1), table)
        return table

    def predicts_drafts(self, seqs: list["Sequence"]) -> bool:
        """Whether the next step of these decoding sequences will probably carry a tree (SpeculativeDecoder.
        steps_async), as NGramProposer.predicts_drafts answers for a chain: exactly with every token known, one
        token behind while a step is in flight (a continuation of two known tokens: the first predicts the token
        in flight)."""
        for seq in seqs:
            length, behind = known_tokens(seq)
            if length >= 2 and any(len(c) > behind for c in self.continuations(seq.token_ids[:length], 1 + behind,
                                                                              seq.request_id)):
                return True
        return False

    def propose_trees(self, seqs: list["Sequence"], max_depths: list[int]) -> list[TreeDraft | None]:
        drafts: list[TreeDraft | None] = []
        for seq, depth in zip(seqs, max_depths):
            branches = self.continuations(seq.token_ids, depth, seq.request_id) if depth > 0 else []
            drafts.append(trie_draft(seq.last_token_id, branches, self.max_nodes) if branches else None)
        return drafts

    def free(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def active_requests(self) -> set[str]:
        return set(self._index)


class HeadTreeProposer(TreeProposer):
    """A tree proposer over a head proposer (Medusa, EAGLE): the head proposer's state (its window of target
    features) is the engine's to feed and free, so these calls pass through to it."""

    heads: Any

    @property
    def hidden_state_kind(self) -> str | None:
        return getattr(self.heads, "hidden_state_kind", None)

    def record_hidden_states(self, *args: Any) -> None:
        self.heads.record_hidden_states(*args)

    def free(self, request_id: str) -> None:
        self.heads.free(request_id)

    def active_requests(self) -> set[str]:
        return self.heads.active_requests()


class TopKTreeProposer(HeadTreeProposer):
    """A static tree of index paths over a head proposer's per-head top-k (Medusa's tree decoding)."""

    def __init__(self, heads: Any, paths: SequenceT[SequenceT[int]]) -> None:
        if not callable(getattr(heads, "propose_candidates", None)):
            raise TypeError(f"{type(heads).__name__} has no propose_candidates(seqs, topk): not a head proposer")
        self.heads = heads
        self.tree = TokenTree.from_paths(paths)  # depth-ordered: every depth bound keeps a prefix of the nodes
        if self.tree.num_nodes > MAX_TREE_NODES:
            raise ValueError(f"{len(paths)} paths make {self.tree.num_nodes} nodes; at most {MAX_TREE_NODES}")
        self.topk = int(self.tree.ranks.max()) + 1
        self.method = f"{getattr(heads, 'method', 'heads')}_tree"

    def propose_trees(self, seqs: list["Sequence"], max_depths: list[int]) -> list[TreeDraft | None]:
        candidates = self.heads.propose_candidates(seqs, self.topk)
        drafts: list[TreeDraft | None] = []
        for seq, depth, found in zip(seqs, max_depths, candidates):
            if found is None or depth < 1:
                drafts.append(None)
                continue
            ids = found[0].unsqueeze(0)  # [1, K, topk]
            tokens = self.tree.candidates(torch.tensor([seq.last_token_id]), ids)[0].tolist()
            keep = int((self.tree.depths <= depth).sum())
            drafts.append(TreeDraft(self.tree, tokens).prefix(keep))
        return drafts


def medusa_tree_paths(top1_agreement: SequenceT[float], num_nodes: int, topk: int = 4) -> list[tuple[int, ...]]:
    """Medusa's sparse tree for heads whose top-1 agreement with the target (head h: a_h, measured on held-out
    data by minillm train-heads) is known but whose deeper ranks are not: rank r of head h is taken to be right
    with probability a_h (1 - a_h)^r (a geometric prior: each rank gets a_h of what the better ranks left), and
    tree.sparse_tree_paths keeps the num_nodes most probable paths. Measured top-k accuracies, where a head
    trainer records them, are the better input to sparse_tree_paths."""
    if not top1_agreement or any(not 0 < a <= 1 for a in top1_agreement):
        raise ValueError(f"top1_agreement must be one value in (0, 1] per head, got {list(top1_agreement)!r}")
    return sparse_tree_paths([[a * (1 - a) ** r for r in range(topk)] for a in top1_agreement], num_nodes)


def build_medusa_tree_proposer(spec: "SpeculativeConfig", engine: Any, seed: int = 0) -> TopKTreeProposer:
    """The "medusa_tree" method: the engine's Medusa proposer (spec.model or the shipped heads) under the sparse tree
    of medusa_tree_paths, num_speculative_tokens levels deep and NODES_PER_LEVEL nodes per level."""
    from minillm.speculative.head_kinds import build_head_proposer
    medusa = build_head_proposer(dataclasses.replace(spec, method="medusa", num_tree_nodes=None), engine, seed)
    depth = min(spec.num_speculative_tokens, medusa.config.num_heads)
    agreement = medusa.config.training.get("held_out_top1_agreement") or [0.5] * depth  # 0.5: untrained heads
    agreement = [min(max(a, 0.01), 1.0) for a in agreement[:depth]]
    nodes = spec.num_tree_nodes or min(NODES_PER_LEVEL * depth, MAX_TREE_NODES - 1)
    return TopKTreeProposer(medusa, medusa_tree_paths(agreement, nodes))


def best_candidates_tree(root_token_id: int, candidates: "DraftTreeCandidates", num_nodes: int) -> TreeDraft:
    """The `num_nodes` candidates with the highest cumulative draft log-probability, as a tree below the root
    (EAGLE-2's rerank), best first. A child's score is its parent's plus a log-probability <= 0, and a parent
    comes before its children in the candidates, so a stable sort puts every parent ahead of its children
    (ties included): any prefix of that order is a tree, and the node order is parents-first, as TokenTree
    wants. The scheduler, trimming a tree, then drops its least probable nodes first."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or not 1 <= num_nodes < MAX_TREE_NODES:
        raise ValueError(f"num_nodes must be an integer in [1, {MAX_TREE_NODES - 1}], got {num_nodes!r}")
    order = torch.sort(candidates.scores, descending=True, stable=True).indices[:num_nodes].tolist()
    index = {c: i + 1 for i, c in enumerate(order)}  # candidate -> node (node 0 is the root)
    parent_of, token_of = candidates.parents.tolist(), candidates.token_ids.tolist()
    if any(parent_of[c] >= 0 and parent_of[c] not in index for c in order):
        raise ValueError("draft tree candidates must score a child no higher than its parent, parents first")
    parents = [-1] + [index.get(parent_of[c], 0) for c in order]
    tokens = [int(root_token_id)] + [token_of[c] for c in order]
    return TreeDraft(host_token_tree(parents), tokens)


class EagleTreeProposer(HeadTreeProposer):
    """EAGLE-2's dynamic draft trees from an EagleProposer: per sequence a search `topk` wide and `beam` deep
    per level (eagle.EagleProposer.draft_tree), then the best `num_nodes` candidates (best_candidates_tree)."""

    method = "eagle_tree"

    def __init__(self, eagle: Any, num_nodes: int = EAGLE_TREE_NODES, topk: int = EAGLE_TREE_WIDTH,
                 beam: int = EAGLE_TREE_WIDTH) -> None:
        if not callable(getattr(eagle, "propose_tree_candidates", None)):
            raise TypeError(f"{type(eagle).__name__} has no propose_tree_candidates: not an EAGLE proposer")
        for name, value, high in (("num_nodes", num_nodes, MAX_TREE_NODES - 1), ("topk", topk, 1 << 20),
                                  ("beam", beam, topk)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be an integer in [1, {high}], got {value!r}")
        self.heads, self.num_nodes, self.topk, self.beam = eagle, num_nodes, topk, beam

    def draft_ahead(self, seqs: list["Sequence"], new_tokens: list[list[int]], max_depths: list[int]) -> None:
        """Start the next step's tree search at the end of this one (minillm/speculative/draft_ahead.py)."""
        self.heads.tree_ahead(seqs, new_tokens, max_depths, self.topk, self.beam)

    def propose_trees(self, seqs: list["Sequence"], max_depths: list[int]) -> list[TreeDraft | None]:
        found = self.heads.propose_tree_candidates(seqs, [max(d, 0) for d in max_depths], self.topk, self.beam)
        return [None if c is None else best_candidates_tree(seq.last_token_id, c, self.num_nodes)
                for seq, c in zip(seqs, found)]


def build_eagle_tree_proposer(spec: "SpeculativeConfig", engine: Any, seed: int = 0) -> EagleTreeProposer:
    """The "eagle_tree" method: the engine's EAGLE proposer (spec.model or the shipped head), trees at most
    num_speculative_tokens deep of spec.num_tree_nodes nodes (default EAGLE_TREE_NODES) below the root, searched
    spec.tree_search_width wide (top-k and beam alike; default EAGLE_TREE_WIDTH)."""
    from minillm.speculative.head_kinds import build_head_proposer
    eagle = build_head_proposer(dataclasses.replace(spec, method="eagle", num_tree_nodes=None, tree_search_width=None),
                                engine, seed)
    width = spec.tree_search_width or EAGLE_TREE_WIDTH
    return EagleTreeProposer(eagle, spec.num_tree_nodes or EAGLE_TREE_NODES, topk=width, beam=width)
