"""Token-tree verification inside the engine: one forward scores a whole draft tree per sequence (chapter 9).

tree.py has the algorithms (TokenTree, the ancestor mask, verify_tree_greedy / verify_tree_sampling); this file runs
them in the engine's step, around the same seams chain speculation uses (minillm/speculative/engine_hooks.py):

1. propose. A tree proposer (`TreeProposer.propose_trees`, e.g. tree_proposers.NGramTreeProposer) returns a
   `TreeDraft` per sequence: the flattened tree (parents before children) and its tokens, node 0 being the
   sequence's last token. Its nodes 1..N-1 become `seq.spec_token_ids`, so the scheduler grants (and, short of
   budget or blocks, trims: a prefix of a parents-first order is still a tree) exactly as it does a chain.
2. prepare_step. build_step_input has laid the N nodes out like a chain: slots seq_len-1 .. seq_len+N-2 after the
   prefix, every row sampled. Here the rows get the tree's positions (root position + depth: siblings share one,
   and RoPE rotates them alike) and their ancestor bitmasks (StepInput.tree_masks), which the attention path
   honours (minillm/layers/tree_attention.py): each node sees the prefix and its own root-to-node path only.
3. verify. Greedy requests: verify_tree_greedy's rule on the target's argmax at every node (the runner's samples,
   on the host already: greedy_tree_path walks them as lists).
   Sampled requests: verify_tree_sampling on the target's probabilities at every node (logits_to_probs, the
   sampler's own filters), which keeps the target's distribution exactly (SpecInfer's multi-candidate rule).
4. keep the accepted path only. The accepted nodes n_0 = 0, n_1, .., n_a sit at slots root + n_d; the sequence
   needs them at root + d. Their tokens are moved to the front of spec_token_ids and their rows to the front of the
   step's outputs (samples, logits, log-probs, hidden states), so that the rest of the engine sees an ordinary
   chain step whose first a drafts were accepted: Scheduler.postprocess counts them and BlockManager.truncate
   frees every block past them (no block leaks). The KV entries move with the next step: (src, dst) slot pairs
   in StepInput.slots_to_copy, applied by the runner before anything else touches the cache (before swap-outs,
   swap-ins and copy-on-write, which may reuse the freed blocks; before any forward reads those slots).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from minillm.hooks import dispatch
from minillm.speculative.proposer import Proposer
from minillm.speculative.rejection import logits_to_probs
from minillm.speculative.tree import (MAX_TREE_NODES, TokenTree, TreeVerifyOutput, tree_attention_mask,
                                      verify_tree_sampling)

if TYPE_CHECKING:
    from minillm.engine.scheduler_interface import ScheduledBatch
    from minillm.engine.sequence import Sequence
    from minillm.engine.step_input import StepInput, StepOutput


@dataclass(frozen=True)
class TreeDraft:
    """One sequence's draft tree: `tree` (flattened, parents first) and `token_ids`, one per node, node 0 the
    sequence's last token (already emitted; it is the step's root query)."""

    tree: TokenTree
    token_ids: list[int]

    def __post_init__(self) -> None:
        if len(self.token_ids) != self.tree.num_nodes or not 1 <= self.tree.num_nodes <= MAX_TREE_NODES:
            raise ValueError(f"a tree draft needs one token per node and 1..{MAX_TREE_NODES} nodes, got "
                             f"{len(self.token_ids)} tokens for {self.tree.num_nodes} nodes")

    @property
    def num_nodes(self) -> int:
        return self.tree.num_nodes

    def prefix(self, num_nodes: int) -> "TreeDraft":
        """The first num_nodes nodes: a tree again, since parents come before children."""
        if not 1 <= num_nodes <= self.num_nodes:
            raise ValueError(f"num_nodes must be in [1, {self.num_nodes}], got {num_nodes}")
        if num_nodes == self.num_nodes:
            return self
        tree = self.tree
        cut = TokenTree(tree.parents[:num_nodes], tree.depths[:num_nodes], tree.ranks[:num_nodes],
                        tree.attn_mask[:num_nodes, :num_nodes])
        return TreeDraft(cut, self.token_ids[:num_nodes])


_HOST_TREES: dict[tuple[int, ...], TokenTree] = {}  # host_token_tree's trees by shape (parents), bounded
_HOST_TREES_MAX = 256  # an EAGLE-2 tree of a random head is a new shape almost every step: a small cache suffices


def host_token_tree(parents: list[int]) -> TokenTree:
    """TokenTree.from_parents for a tree a proposer builds on the host every step: depths and the rows of the
    ancestor mask (as bitmasks: a node's is its parent's plus its own bit) in one pass over the list, the mask
    expanded from them by one numpy op, where the tensor ops per node cost about a millisecond for 33 nodes.
    Trees are kept by shape: a proposer that often drafts the same shape (a static or a settled dynamic tree)
    gets the same immutable TokenTree back, its host lists (TokenTree.depth_list, row_bitmasks) already made.
    A learner's tree_attention_mask (exercise ch09.tree_attention_mask) still builds the mask when it is
    active: then this is from_parents itself."""
    if dispatch("ch09.tree_attention_mask", tree_attention_mask) is not tree_attention_mask:
        return TokenTree.from_parents(parents)
    key = tuple(parents)
    tree = _HOST_TREES.get(key)
    if tree is not None:
        return tree
    n = len(parents)
    if n < 1 or parents[0] != -1:
        raise ValueError(f"parents must be 1-D with parents[0] == -1 (the root), got {parents}")
    if n > MAX_TREE_NODES:
        raise ValueError(f"a tree of {n} nodes; at most {MAX_TREE_NODES} (one 64-bit ancestor mask per node)")
    depths, bits = [0] * n, [1] * n
    for i in range(1, n):
        p = parents[i]
        if not 0 <= p < i:
            raise ValueError(f"node {i} has parent {p}; need 0 <= parent < {i} (parents before children)")
        depths[i] = depths[p] + 1
        bits[i] = bits[p] | (1 << i)
    rows = np.array(bits, dtype=np.uint64)
    mask = ((rows[:, None] >> np.arange(n, dtype=np.uint64)) & np.uint64(1)).astype(bool)
    as_tensor = lambda values: torch.from_numpy(np.array(values, dtype=np.int64))  # noqa: E731 (torch.tensor: 10 us)
    tree = TokenTree(as_tensor(parents), as_tensor(depths), torch.zeros(n, dtype=torch.int64), torch.from_numpy(mask))
    tree.__dict__.update(parent_list=list(parents), depth_list=depths,  # TokenTree's cached host lists, known here
                         row_bitmasks=rows.view(np.int64).tolist())
    if len(_HOST_TREES) >= _HOST_TREES_MAX:
        _HOST_TREES.clear()
    _HOST_TREES[key] = tree
    return tree


def greedy_tree_path(parents: list[int], tokens: list[int], targets: list[int]) -> list[int]:
    """verify_tree_greedy's accepted path for one tree, root first, on host lists: a node is accepted when its
    parent is and its token is the target's argmax at the parent; the path ends at the first deepest accepted
    node (node order breaks ties, as there). A verify step's samples are on the host already: a walk over 33
    nodes costs microseconds, the tensor version a launch per level and more."""
    accepted, depths, best = [True] + [False] * (len(parents) - 1), [0] * len(parents), 0
    for i in range(1, len(parents)):
        p = parents[i]
        depths[i] = depths[p] + 1
        if accepted[p] and tokens[i] == targets[p]:
            accepted[i] = True
            if depths[i] > depths[best]:
                best = i
    path = [best]
    while path[-1] != 0:
        path.append(parents[path[-1]])
    return path[::-1]


def permute_rows(rows: torch.Tensor, order: list[int]) -> torch.Tensor:
    """rows[order] for a device tensor without uploading `order`: one cat of the slices of its consecutive runs
    (the accepted path, then the other nodes in their order: a handful of runs)."""
    runs: list[list[int]] = []
    for j in order:
        if runs and runs[-1][1] == j:
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1])
    return torch.cat([rows[a:b] for a, b in runs])


class TreeProposer(Proposer):
    """A proposer that drafts a token tree per sequence (`proposes_trees`: the engine then verifies trees)."""

    proposes_trees = True

    def propose_trees(self, seqs: list["Sequence"], max_depths: list[int]) -> list[TreeDraft | None]:
        """Per sequence a TreeDraft at most max_depths[i] levels deep (None: no draft this step)."""
        raise NotImplementedError

    def propose(self, seqs: list["Sequence"], num_tokens: list[int]) -> list[list[int]]:
        """As a chain proposer: each tree's first root-to-leaf path (node order: its first branch)."""
        chains = []
        for draft in self.propose_trees(seqs, num_tokens):
            chain, node = [], 0
            while draft is not None:
                children = (draft.tree.parents == node).nonzero().flatten()
                if children.numel() == 0:
                    break
                node = int(children[0])
                chain.append(draft.token_ids[node])
            chains.append(chain)
        return chains


class TreeVerifier:
    """The engine side of tree speculation for one SpeculativeDecoder: this step's trees by seq_id, and the KV
    slot copies the previous verification left for the next step."""

    def __init__(self) -> None:
        self._drafts: dict[int, TreeDraft] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self._block_size = 0
        self.num_nodes_scored = 0  # tree nodes below the roots the target scored: the compute trees spend

    # -- 1. propose ---------------------------------------------------------------------------------------
    def propose(self, proposer: TreeProposer, seqs: list["Sequence"], max_depths: list[int], vocab_size: int) -> None:
        self._drafts.clear()
        drafts = proposer.propose_trees(seqs, max_depths)
        if len(drafts) != len(seqs):
            raise ValueError(f"proposer {proposer.method!r} returned {len(drafts)} trees for {len(seqs)} sequences")
        for seq, depth, draft in zip(seqs, max_depths, drafts):
            if draft is None or draft.num_nodes < 2:
                seq.spec_token_ids = []
                continue
            if draft.tree.max_depth > depth or draft.token_ids[0] != seq.last_token_id:
                raise ValueError(f"proposer {proposer.method!r} drafted a tree of depth {draft.tree.max_depth} "
                                 f"rooted at {draft.token_ids[0]} for request {seq.request_id!r}: at most {depth} "
                                 f"levels below its last token {seq.last_token_id}")
            if min(draft.token_ids) < 0 or max(draft.token_ids) >= vocab_size:
                raise ValueError(f"proposer {proposer.method!r} drafted tokens outside [0, {vocab_size})")
            self._drafts[seq.seq_id] = draft
            seq.spec_token_ids = list(draft.token_ids[1:])

    def holds(self, seq: "Sequence") -> bool:
        """Whether seq carries (what the scheduler kept of) a tree into this step."""
        draft = self._drafts.get(seq.seq_id)
        k = len(seq.spec_token_ids)
        return draft is not None and k > 0 and seq.spec_token_ids == draft.token_ids[1:k + 1]

    def _draft(self, seq: "Sequence") -> TreeDraft:
        return self._drafts[seq.seq_id].prefix(1 + len(seq.spec_token_ids))

    def depth(self, seq: "Sequence") -> int:
        """Levels of seq's tree this step: the most drafts it can have accepted."""
        return self._draft(seq).tree.max_depth

    def needs_logits(self, batch: "ScheduledBatch") -> bool:
        """Sampled requests verify on the target's probabilities; greedy ones need only its argmax samples."""
        return any(self.holds(seq) and seq.sampling_params.temperature > 0 for seq in batch.seqs)

    # -- 2. the step's input ------------------------------------------------------------------------------
    @property
    def has_pending_moves(self) -> bool:
        """Whether the last verification left KV slot copies for the next step to carry (prepare_step)."""
        return bool(self._pending_copies)

    def prepare_step(self, batch: "ScheduledBatch", step: "StepInput") -> None:
        """Tree positions and ancestor masks for the rows of tree sequences; the pending KV slot copies."""
        step.slots_to_copy = self._pending_copies + list(step.slots_to_copy)
        self._pending_copies = []
        self._block_size = step.block_size
        masks: list[list[int] | None] | None = None
        offset = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, step.query_lens)):
            if self.holds(seq):
                draft = self._draft(seq)
                if n != draft.num_nodes:
                    raise ValueError(f"request {seq.request_id!r}: a tree of {draft.num_nodes} nodes must be the "
                                     f"step's only new tokens, got {n}")
                root = step.positions[offset]
                step.positions[offset:offset + n] = [root + d for d in draft.tree.depth_list]
                masks = masks if masks is not None else [None] * len(batch.seqs)
                masks[i] = draft.tree.row_bitmasks
            offset += n
        step.tree_masks = masks

    # -- 3. verify, 4. keep the accepted path -------------------------------------------------------------
    def verify(self, seqs: list["Sequence"], output: "StepOutput", indices: list[int],
               generators: list[torch.Generator | None], default_generator: torch.Generator) -> list[list[int]]:
        """Per tree sequence (seqs[j] is sequence indices[j] of the step) the tokens it appends: its accepted path's
        tokens, then the target's own. Sequences with the same tree and rule are verified as one batch (Medusa's
        static tree: the whole batch at once). Reorders spec_token_ids and the step's output rows into path order
        and queues the KV moves (see the module docstring)."""
        groups: dict[tuple, list[int]] = {}
        for j, seq in enumerate(seqs):
            key = (seq.sampling_params.temperature <= 0, tuple(self._draft(seq).tree.parent_list))
            groups.setdefault(key, []).append(j)
        paths: list[list[int]] = [[] for _ in seqs]
        emitted: list[list[int]] = [[] for _ in seqs]
        for (greedy, _), members in groups.items():
            tree = self._draft(seqs[members[0]]).tree
            if greedy:  # the runner's samples at temperature 0 are the target's argmax at every node
                parents = tree.parent_list
                for j in members:
                    draft, targets = self._draft(seqs[j]), output.sampled_token_ids[indices[j]]
                    if len(targets) != draft.num_nodes:
                        raise ValueError(f"request {seqs[j].request_id!r}: {len(targets)} samples for a tree of "
                                         f"{draft.num_nodes} nodes")
                    paths[j] = greedy_tree_path(parents, draft.token_ids, targets)
                    emitted[j] = [draft.token_ids[n] for n in paths[j][1:]] + [targets[paths[j][-1]]]
                continue
            if output.logits is None:
                raise ValueError("sampled tree verification needs the target's logits: the step was run "
                                 "without return_logits")
            params = [seqs[j].sampling_params for j in members]
            probs = logits_to_probs(torch.stack([output.logits[indices[j]] for j in members]),
                                    torch.tensor([p.temperature for p in params]),
                                    torch.tensor([p.top_k for p in params]),
                                    torch.tensor([p.top_p for p in params]))
            result: TreeVerifyOutput = verify_tree_sampling(
                tree, torch.tensor([self._draft(seqs[j]).token_ids for j in members]), probs,
                generators=[generators[j] for j in members], default_generator=default_generator)
            for row, j in enumerate(members):
                accepted = int(result.num_accepted[row])
                paths[j] = result.accepted_nodes[row, :accepted + 1].tolist()
                emitted[j] = result.token_ids[row, :accepted + 1].tolist()
        for seq, index, path in zip(seqs, indices, paths):
            draft = self._draft(seq)
            self.num_nodes_scored += draft.num_nodes - 1
            self._reorder(seq, output, index, path, draft)
            root = seq.num_computed_tokens  # the root's position: postprocess has not advanced it yet
            for depth, node in enumerate(path):
                if node != depth:
                    self._pending_copies.append((self._slot(seq, root + node), self._slot(seq, root + depth)))
        return emitted

    def _reorder(self, seq: "Sequence", output: "StepOutput", index: int, path: list[int], draft: TreeDraft) -> None:
        on_path = set(path)
        order = path + [j for j in range(draft.num_nodes) if j not in on_path]
        seq.spec_token_ids = [draft.token_ids[j] for j in order[1:]]
        output.sampled_token_ids[index] = [output.sampled_token_ids[index][j] for j in order]
        if output.logits is not None and len(output.logits[index]) == draft.num_nodes:
            output.logits[index] = output.logits[index][order]
        if output.logprobs is not None and len(output.logprobs[index]) == draft.num_nodes:
            output.logprobs[index] = [output.logprobs[index][j] for j in order]
        hidden = output.hidden_states  # head proposers (Medusa, EAGLE) keep the accepted path's features
        if hidden is not None and hidden[index].shape[0] == draft.num_nodes:
            hidden[index] = permute_rows(hidden[index], order)

    def _slot(self, seq: "Sequence", position: int) -> int:
        block = self._block_size
        return seq.block_table[position // block] * block + position % block
