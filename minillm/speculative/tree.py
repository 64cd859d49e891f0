"""Token trees: verifying many draft continuations in one forward pass (chapter on speculative decoding).

A chain of k drafts is all-or-nothing after the first miss: if the draft's first guess is wrong, the other k-1
positions the target scored were wasted. Proposers such as Medusa heads (Cai et al. 2024, "Medusa: Simple LLM
Inference Acceleration Framework with Multiple Decoding Heads") and EAGLE (Li et al. 2024, "EAGLE: Speculative
Sampling Requires Rethinking Feature Uncertainty") produce a top-k *distribution* per future position, and the
first choice is often wrong when the second is right. A tree spends the same idle compute (see
minillm.speculative.rejection) on several alternatives at once: the root is the last emitted token, the children of
a node are candidate next tokens, and one forward pass scores every node. The longest root-to-leaf path the target
agrees with is accepted, so the tree buys a longer expected accept length per step for the same number of scored
positions (SpecInfer, Miao et al. 2024, verifies trees of several drafts the same way).

What makes one pass possible is the layout. The tree is flattened into num_nodes positions (parents before
children): node i carries a token, its parent's index, its depth, and the position id seq_len + depth (siblings share
a position: they are alternatives for the same slot). The attention mask lets node i see the whole prefix and its
own ancestors, itself included, and nothing else: each node is scored as if its path were the only continuation.

Medusa's trees are static: a node is an index path (r_1, ..., r_d), "rank r_1 of head 1, then rank r_2 of head 2,
...". The full cartesian product grows as topk^depth, so a sparse tree keeps only the paths most likely to be
accepted (`sparse_tree_paths`, Medusa's greedy construction from per-head accuracies measured on calibration data).

Verification. Greedy: node i is accepted when its token equals the target's argmax at its parent and its parent was
accepted; the deepest accepted node wins, and the target's argmax there is the bonus token. Sampling: at the root,
draw x from the target's distribution; if x is a child's token, move there and repeat, otherwise emit x and stop.
This is the per-node rejection rule with one-hot drafts: trying children one by one, child c is accepted with
probability p(c) and on rejection the residual is p with c removed and renormalised, which accepts the next
child with probability p(c') / (1 - p(c)); the whole sweep is one draw from p that lands on a child or not, so the
emitted tokens are exact samples of the target (SpecInfer's multi-candidate rejection sampling).
"""
from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from minillm.hooks import dispatch
from minillm.speculative.rejection import SpecDecodeOutput, draw_noise, emit_tokens


# >>> exercise ch09.tree_attention_mask
def tree_attention_mask(parents: torch.Tensor) -> torch.Tensor:
    """bool [N, N]: mask[i, j] is True when node j is node i itself or one of its ancestors.

    parents: int64 [N], the flattened tree, parents before children: parents[0] == -1 (the root) and
    0 <= parents[i] < i for every other node (TokenTree.from_parents checks this). Node i may attend to the
    nodes on its own root path and nothing else: not its siblings (alternatives for the same position), not
    its cousins, not its descendants. Each node is then scored as if its path were the only continuation.

    Example: parents [-1, 0, 0, 1] (root, two children, a grandchild under node 1) ->
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]];  a chain [-1, 0, 1] -> the causal mask.
    """
    # >>> solution
    # Every node walks one step up its path per iteration, all nodes at once: max-depth iterations in total.
    n = parents.shape[0]
    rows = torch.arange(n, device=parents.device)
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)
    ancestor = parents.clone()
    while bool((ancestor >= 0).any()):
        up = ancestor >= 0
        mask[rows[up], ancestor[up]] = True
        ancestor = torch.where(up, parents[ancestor.clamp(min=0)], ancestor)
    return mask
    # <<< solution
# <<< exercise


def prefix_tree_attention_mask(tree_mask: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """bool [N, prefix_len + N]: the tree's nodes see the whole cached prefix, then the tree part of `tree_mask`."""
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    prefix = torch.ones((tree_mask.shape[0], prefix_len), dtype=torch.bool, device=tree_mask.device)
    return torch.cat([prefix, tree_mask], dim=1)


MAX_TREE_NODES = 64  # the engine's attention kernels take one int64 ancestor bitmask per node


def ancestor_bitmasks(tree_mask: torch.Tensor) -> list[int]:
    """The rows of a bool [N, N] tree mask as N signed 64-bit integers (bit j set when node j is visible), the
    form the engine's attention takes (minillm/layers/tree_attention.py). N <= 64; bit 63 makes the integer
    negative, as an int64 holds it."""
    n = tree_mask.shape[0]
    if tree_mask.shape != (n, n) or not 1 <= n <= MAX_TREE_NODES:
        raise ValueError(f"tree_mask must be [N, N] with 1 <= N <= {MAX_TREE_NODES}, got {tuple(tree_mask.shape)}")
    # on the host, in unsigned 64-bit arithmetic (numpy: no tensor ops), read back as int64: bit 63 becomes the sign
    rows = tree_mask.detach().cpu().numpy().astype(np.uint64)
    return (rows << np.arange(n, dtype=np.uint64)).sum(axis=1, dtype=np.uint64).view(np.int64).tolist()


@dataclass(frozen=True)
class TokenTree:
    """A flattened tree of num_nodes positions, node 0 the root, parents before children.

    parents: int64 [N] (-1 for the root); depths: int64 [N] (root 0; position offset of each node);
    ranks: int64 [N], for a tree built from index paths the top-k rank each node takes from its head (root 0);
    attn_mask: bool [N, N] from tree_attention_mask.

    The engine reads a tree on the host several times a step (positions, masks, the verify walk): parent_list,
    depth_list and row_bitmasks are those reads as Python lists, computed once per tree and kept (a tree is
    immutable), instead of a tensor op and a .tolist() at every use.
    """

    parents: torch.Tensor
    depths: torch.Tensor
    ranks: torch.Tensor
    attn_mask: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[0]

    @cached_property
    def parent_list(self) -> list[int]:
        return self.parents.tolist()

    @cached_property
    def depth_list(self) -> list[int]:
        return self.depths.tolist()

    @cached_property
    def row_bitmasks(self) -> list[int]:
        """ancestor_bitmasks(attn_mask): what the engine's attention takes for this tree's rows."""
        return ancestor_bitmasks(self.attn_mask)

    @property
    def max_depth(self) -> int:
        return max(self.depth_list)

    def position_ids(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """int64 [B, N]: the position of each node for sequences whose next position is seq_lens [B]."""
        return seq_lens.long().unsqueeze(-1) + self.depths.to(seq_lens.device)

    @classmethod
    def from_parents(cls, parents: Sequence[int] | torch.Tensor, ranks: Sequence[int] | None = None) -> "TokenTree":
        """A tree from parent indices; requires parents[0] == -1 and 0 <= parents[i] < i for every other node."""
        parents = torch.as_tensor(parents, dtype=torch.int64)
        n = parents.shape[0]
        if parents.dim() != 1 or n < 1 or int(parents[0]) != -1:
            raise ValueError(f"parents must be 1-D with parents[0] == -1 (the root), got {parents.tolist()}")
        bad = (parents[1:] < 0) | (parents[1:] >= torch.arange(1, n))
        if bool(bad.any()):
            i = int(bad.nonzero()[0]) + 1
            raise ValueError(f"node {i} has parent {int(parents[i])}; need 0 <= parent < {i} (parents before children)")
        depths = torch.zeros(n, dtype=torch.int64)
        for i in range(1, n):  # parents come first, so one pass suffices
            depths[i] = depths[parents[i]] + 1
        ranks_t = torch.zeros(n, dtype=torch.int64) if ranks is None else torch.as_tensor(ranks, dtype=torch.int64)
        return cls(parents, depths, ranks_t, dispatch("ch09.tree_attention_mask", tree_attention_mask)(parents))

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "TokenTree":
        """A tree from index paths (Medusa's format): (r_1, ..., r_d) is the node reached by rank r_1 of the first
        head, then rank r_2 of the second, ... The root () is implicit. Every prefix of a path must be a path too.
        Nodes are ordered by depth, then lexicographically, so parents come before children."""
        nodes = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        if any(len(p) == 0 or min(p) < 0 for p in nodes):
            raise ValueError("every path must be a non-empty sequence of ranks >= 0 (the root () is implicit)")
        index = {(): 0} | {p: i + 1 for i, p in enumerate(nodes)}
        missing = [p for p in nodes if p[:-1] not in index]
        if missing:
            raise ValueError(f"path {missing[0]} has no parent path {missing[0][:-1]}: every prefix must be listed")
        parents = [-1] + [index[p[:-1]] for p in nodes]
        return cls.from_parents(parents, ranks=[0] + [p[-1] for p in nodes])

    def candidates(self, root_token_ids: torch.Tensor, head_topk_ids: torch.Tensor) -> torch.Tensor:
        """int64 [B, N] tree tokens: the root token [B] at node 0, and at a node of depth d and rank r the r-th
        choice of head d: head_topk_ids [B, num_heads, topk] (Medusa's heads, EAGLE's draft steps)."""
        if head_topk_ids.dim() != 3 or head_topk_ids.shape[0] != root_token_ids.shape[0]:
            raise ValueError(f"head_topk_ids must be [B, num_heads, topk] with B = {root_token_ids.shape[0]}, "
                             f"got {tuple(head_topk_ids.shape)}")
        _, heads, topk = head_topk_ids.shape
        if heads < self.max_depth or topk <= int(self.ranks.max()):
            raise ValueError(f"this tree needs >= {self.max_depth} heads and top-{int(self.ranks.max()) + 1}, "
                             f"got {heads} heads of top-{topk}")
        build = dispatch("ch09.medusa_candidates", medusa_candidates)
        return build(root_token_ids, head_topk_ids, self.depths, self.ranks)


# >>> exercise ch09.medusa_candidates
def medusa_candidates(root_token_ids: torch.Tensor, head_topk_ids: torch.Tensor, depths: torch.Tensor,
                      ranks: torch.Tensor) -> torch.Tensor:
    """The tokens of a Medusa tree for a batch, int64 [B, N]: what one verify step scores.

    root_token_ids [B]: the token the target just emitted; it sits at node 0. head_topk_ids [B, H, topk]: head
    h's top-k guesses (best first) for the token h + 1 positions after the root (head 0 guesses the next token).
    depths, ranks [N]: node i sits at depth depths[i] (the root at 0) and is its head's ranks[i]-th choice, so
    its token is head_topk_ids[b, depths[i] - 1, ranks[i]]. (A node's ancestors hold the rest of its path: a
    node's own token depends only on its depth and rank.)

    Example: root [9], head_topk_ids [[[4, 5], [6, 7]]], the tree of paths (0,), (1,), (0, 0), (0, 1):
        depths [0, 1, 1, 2, 2], ranks [0, 0, 1, 0, 1] -> [[9, 4, 5, 6, 7]].
    """
    # >>> solution
    batch, heads, topk = head_topk_ids.shape
    device = head_topk_ids.device
    # node i's token is entry (depth - 1) * topk + rank of the flattened [H * topk] guesses
    flat = ((depths[1:] - 1) * topk + ranks[1:]).to(device)
    drafts = head_topk_ids.reshape(batch, heads * topk).gather(1, flat.expand(batch, -1))
    return torch.cat([root_token_ids.to(device, torch.int64).unsqueeze(-1), drafts.long()], dim=1)
    # <<< solution
# <<< exercise


def token_tree_from_candidates(root_token_id: int,
                               continuations: Sequence[Sequence[int]]) -> tuple[TokenTree, torch.Tensor]:
    """Merge candidate continuations (lookahead's n-grams, several drafts) into one trie rooted at root_token_id:
    shared prefixes are scored once. Returns the tree and its tokens int64 [N]."""
    prefixes = {tuple(c[: d + 1]) for c in continuations for d in range(len(c))}
    tree = TokenTree.from_paths(prefixes)  # token paths are index paths too; node order matches from_paths'
    ordered = sorted(prefixes, key=lambda p: (len(p), p))
    return tree, torch.tensor([root_token_id] + [p[-1] for p in ordered], dtype=torch.int64)


def dense_tree_paths(branching: Sequence[int]) -> list[tuple[int, ...]]:
    """The full tree: every path of ranks r_d < branching[d] (the cartesian product of each head's top choices,
    truncated at every depth). branching (3, 2, 1) gives 3 + 6 + 6 = 15 nodes below the root."""
    if not branching or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in branching):
        raise ValueError(f"branching must be a non-empty sequence of integers >= 1, got {branching!r}")
    return [p for d in range(1, len(branching) + 1) for p in itertools.product(*(range(b) for b in branching[:d]))]


def sparse_tree_paths(head_accuracies: Sequence[Sequence[float]], num_nodes: int) -> list[tuple[int, ...]]:
    """Medusa's sparse tree: the `num_nodes` index paths with the largest estimated acceptance probability, the
    product of head_accuracies[d][r_d] along the path (head_accuracies[h][r]: how often head h's rank-r choice is
    the right token, measured on calibration data). Best-first search: a node enters the frontier only after its
    parent and its next-better sibling, so the result is a valid tree."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be an integer >= 1, got {num_nodes!r}")
    if not head_accuracies or any(not row or min(row) < 0 or max(row) > 1 for row in head_accuracies):
        raise ValueError(f"head_accuracies must be one non-empty row of values in [0, 1] per head, "
                         f"got {head_accuracies!r}")

    def score(path: tuple[int, ...]) -> float:
        return math.prod(head_accuracies[d][r] for d, r in enumerate(path))

    frontier = [(-score((0,)), (0,))]  # heapq is a min-heap: push negated scores
    chosen: list[tuple[int, ...]] = []
    while frontier and len(chosen) < num_nodes:
        _, path = heapq.heappop(frontier)
        chosen.append(path)
        depth, rank = len(path) - 1, path[-1]
        if rank + 1 < len(head_accuracies[depth]):  # next sibling: same parent, next rank
            sibling = path[:-1] + (rank + 1,)
            heapq.heappush(frontier, (-score(sibling), sibling))
        if depth + 1 < len(head_accuracies):  # first child: the next head's best choice
            child = path + (0,)
            heapq.heappush(frontier, (-score(child), child))
    return chosen


@dataclass
class TreeVerifyOutput(SpecDecodeOutput):
    """SpecDecodeOutput plus accepted_nodes: int64 [B, max_depth+1], the nodes of the accepted path, root first,
    num_accepted+1 of them then -1. The engine keeps those nodes' KV entries and drops the rest."""

    accepted_nodes: torch.Tensor


def _check_tree_inputs(tree: TokenTree, candidates: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if candidates.dim() != 2 or candidates.shape[1] != tree.num_nodes:
        raise ValueError(f"candidates must be [B, {tree.num_nodes}], got {tuple(candidates.shape)}")
    if target.shape[:2] != candidates.shape:
        raise ValueError(f"{name} must start with [B, N] = {tuple(candidates.shape)}, got {tuple(target.shape)}")


def _path_output(tree: TokenTree, candidates: torch.Tensor, best: torch.Tensor, last: torch.Tensor) -> TreeVerifyOutput:
    """From the deepest accepted node per row and the token after it, the emitted tokens and the path's nodes."""
    batch, depth = candidates.shape[0], tree.max_depth
    device = candidates.device
    on_path = tree.attn_mask.to(device)[best]  # [B, N]: ancestors of best, itself included
    depths = tree.depths.to(device)
    # node j of the path goes to column depths[j]; nodes off the path go to a spare column, dropped after
    column = torch.where(on_path, depths, torch.full_like(depths, depth + 1))
    nodes = torch.full((batch, depth + 2), -1, dtype=torch.int64, device=device)
    nodes.scatter_(1, column, torch.arange(tree.num_nodes, device=device).expand(batch, -1))
    nodes = nodes[:, : depth + 1]
    num_accepted = depths[best]
    path_tokens = candidates.gather(1, nodes[:, 1:].clamp(min=0))
    out = emit_tokens(path_tokens, num_accepted, last)
    return TreeVerifyOutput(out.token_ids, out.num_accepted, nodes)


def verify_tree_greedy(tree: TokenTree, candidates: torch.Tensor, target_token_ids: torch.Tensor) -> TreeVerifyOutput:
    """Greedy tree verification. candidates: int [B, N] tree tokens (node 0 the root, already emitted);
    target_token_ids: int [B, N], the target's argmax at each node. Accepts the longest root-to-leaf path whose
    every token is the target's argmax at its parent (ties: the first such path in node order)."""
    _check_tree_inputs(tree, candidates, target_token_ids, "target_token_ids")
    device = candidates.device
    parents, depths = tree.parents.to(device), tree.depths.to(device)
    accepted = torch.zeros(candidates.shape, dtype=torch.bool, device=device)
    accepted[:, 0] = True
    for d in range(1, tree.max_depth + 1):  # one level at a time: a node needs its parent's verdict first
        level = (depths == d).nonzero().flatten()
        agrees = candidates[:, level] == target_token_ids[:, parents[level]]
        accepted[:, level] = agrees & accepted[:, parents[level]]
    best = torch.where(accepted, depths, -1).argmax(dim=1)  # argmax returns the first of equal maxima
    last = target_token_ids.gather(1, best.unsqueeze(-1)).squeeze(-1)
    return _path_output(tree, candidates, best, last)


def verify_tree_sampling(tree: TokenTree, candidates: torch.Tensor, target_probs: torch.Tensor,
                         generators: list[torch.Generator | None] | None = None,
                         default_generator: torch.Generator | None = None) -> TreeVerifyOutput:
    """Lossless tree verification for deterministic (top-k) drafts. target_probs: float [B, N, V], the target's
    distribution at each node (from rejection.logits_to_probs). From the root: draw x ~ p(node); if a child of the
    node holds x, descend to it and repeat; otherwise emit x. At a leaf, x is the bonus. Siblings should hold distinct
    tokens (each head's top-k do): with duplicates the first is taken, still lossless, but it may stop earlier than
    verify_tree_greedy, which looks down every matching branch."""
    _check_tree_inputs(tree, candidates, target_probs, "target_probs")
    batch, _, vocab = target_probs.shape
    device = target_probs.device
    depth = tree.max_depth
    parents = tree.parents.to(device)
    no_uniforms = torch.zeros(batch, dtype=torch.int64)
    _, race = draw_noise(no_uniforms, 0, (depth + 1) * vocab, device, generators, default_generator)
    race = race.reshape(batch, depth + 1, vocab)
    rows = torch.arange(batch, device=device)
    node = torch.zeros(batch, dtype=torch.int64, device=device)
    last = torch.zeros(batch, dtype=torch.int64, device=device)
    walking = torch.ones(batch, dtype=torch.bool, device=device)
    for d in range(depth + 1):
        x = (target_probs[rows, node].float() / race[:, d]).argmax(dim=-1)
        child = (parents.unsqueeze(0) == node.unsqueeze(-1)) & (candidates == x.unsqueeze(-1))
        descend = walking & child.any(dim=1)
        stop = walking & ~descend
        last = torch.where(stop, x, last)
        node = torch.where(descend, child.long().argmax(dim=1), node)
        walking = descend
    return _path_output(tree, candidates, node, last)
