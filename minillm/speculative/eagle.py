"""EAGLE (Li et al. 2024): draft at the feature level, one decoder layer run autoregressively (chapter 9).

The target's top-layer feature f_p (its last hidden state before the final norm, at position p) predicts token
p + 1 through norm + LM head. EAGLE learns to predict the *next feature*: its input at position p is

    x_p = fc([f_p ; embed(x_{p+1})])        (2d -> d: the feature and the token that was actually chosen from it)

and one decoder layer over x_{<=p} gives g_p ~ f_{p+1}; the target's own final norm and LM head turn g_p into
token p + 2. Feeding the token in resolves the uncertainty of sampling (the same feature can lead to different
tokens), which is why EAGLE accepts more than Medusa at the same cost. To draft k tokens the layer runs k times,
each time on its own previous output g and the token it just drafted: autoregression in feature space, with the
embedding and LM head borrowed from the target (nothing of the vocabulary is copied).

Here the layer attends over a window of the last <= 64 positions, recomputed each step (a fresh K/V window per
proposal, extended by the drafts within it: see minillm.speculative.head_proposer). Drafting runs the layer's
weights packed into a FusedDraftBlock; the window's K/V and the drafts' go into one preallocated DraftKV, written
in place, so the k steps have static shapes and the whole proposal replays as one CUDA graph. Training (train_heads) adds a
feature regression loss (Smooth L1, g_p against f_{p+1}) to the token loss, as the paper does.

Trees (EAGLE-2, Li et al. 2024, "EAGLE-2: Faster Inference of Language Models with Dynamic Draft Trees"). On the
P7 prompts the head's first guess is the target's next token at 36% of the engine's steps, while the first level
of a 32-node tree (up to its top 8) holds it at 71% (benchmarks/eagle_acceptance_probe.py, CPU fp32, shipped
head): a chain wastes every position after the first miss. `draft_tree` grows a tree, one layer call per depth:
the root's top-k children are the candidates of depth 1; the `beam` candidates with the highest *cumulative* draft
probability (the product of the draft probabilities along their path: the head's own estimate of how likely the
target is to accept the whole path, well calibrated per EAGLE-2) are expanded, all at once, each attending to the
window and its own ancestors (a tree mask inside the draft layer); their top-k children are the next depth's
candidates, and so on. tree_proposers.EagleTreeProposer then reranks every candidate by cumulative probability and
keeps the best N as the tree the target verifies. With topk = beam = 1 this is exactly the chain above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minillm.engine.sequence import Sequence
from minillm.speculative.draft_ahead import AheadProposal
from minillm.speculative.head_proposer import Chooser, HeadProposer, RequestWindow, Window
from minillm.speculative.heads import (DraftBlock, FusedDraftBlock, HeadConfig, draft_attention_bias,
                                      grouped_attention_bias)
from minillm.speculative.proposer import check_num_tokens


@dataclass
class DraftTreeCandidates:
    """Every node a draft tree search scored, for one sequence, as flat tensors of M candidates (on the host):
    token_ids int64 [M]; parents int64 [M] (the parent's candidate index, -1: the root, the sequence's last
    token); scores float32 [M], the cumulative draft log-probability of the path to the candidate; depths int64
    [M] (1: a child of the root). Parents come before their children."""

    token_ids: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor
    depths: torch.Tensor


def pack_candidates(tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """A tree search's [B, M] results as one int32 [B, 3M] (token ids, parents, the fp32 scores' bits): the host
    needs all three, and one transfer costs a third of three."""
    return torch.cat([tokens.to(torch.int32), parents.to(torch.int32), scores.float().view(torch.int32)], dim=1)


def unpack_candidates(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token_ids int64, parents int64, scores float32), each [B, M], from pack_candidates' [B, 3M]."""
    m = packed.shape[1] // 3
    return packed[:, :m].long(), packed[:, m:2 * m].long(), packed[:, 2 * m:].contiguous().view(torch.float32)


class EagleHead(nn.Module):
    """forward(features [B, T, d], token_embeds [B, T, d], positions, key_mask, past) -> (g [B, T, d], (k, v))."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.fc = nn.Linear(2 * d, d)
        self.layer = DraftBlock(config)
        with torch.no_grad():  # start as "the feature passes through": x_p = f_p
            self.fc.weight.zero_()
            self.fc.weight[:, :d].copy_(torch.eye(d))
            self.fc.bias.zero_()

    def forward(self, features: torch.Tensor, token_embeds: torch.Tensor, positions: torch.Tensor,
                key_mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.layer(self.fc(torch.cat([features, token_embeds], dim=-1)), positions, key_mask, past)


class EagleProposer(HeadProposer):
    method = "eagle"
    hidden_state_kind = "pre_norm"
    tree_graphs = None  # TreeDraftGraphs (tree_graphs.py), made on the first tree search on a GPU

    @property
    def max_drafts(self) -> int:
        return 16  # autoregressive: as many as the config asks for (SpeculativeConfig caps k at 16)

    def fuse(self) -> nn.Module:
        return FusedDraftBlock(self.heads.layer, self.window + self.max_drafts)

    def draft(self, window: Window, num_drafts: int, choose: Chooser) -> list[torch.Tensor]:
        target, block, fc = self.target, self.fused, self.heads.fc
        batch, width = window.next_tokens.shape
        group = block.num_heads // block.num_kv_heads
        cache = block.new_cache(batch, width + num_drafts - 1, window.features)
        dtype = window.features.dtype
        x = fc(torch.cat([window.features, target.embed(window.next_tokens)], dim=-1))
        g = block(x, window.positions, draft_attention_bias(window.key_mask, width, group, dtype), cache)
        # a draft step's query sees every real key of the window and every draft: one mask, sliced per step
        key_mask = torch.cat([window.key_mask, window.key_mask.new_ones(batch, num_drafts - 1)], dim=1)
        step_bias = draft_attention_bias(key_mask, 1, group, dtype)
        last, position = g[:, -1], window.positions[:, -1:]
        drafted = []
        for step in range(num_drafts):
            token = target.vocab.to_ids(choose(target.vocab.logits(self.final_norm(last))))
            drafted.append(token)
            if step + 1 == num_drafts:
                break
            # the next position: its feature is the one just predicted, its token the one just drafted
            position = position + 1
            x = fc(torch.cat([last, target.embed(token)], dim=-1))[:, None]
            last = block(x, position, step_bias[..., :width + step + 1], cache)[:, -1]
        return drafted

    # -- trees (EAGLE-2) ----------------------------------------------------------------------------------
    def draft_tree(self, window: Window, depth: int, topk: int, beam: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grow draft trees for a batch of windows (the module docstring says how): returns (token_ids,
        parents, scores), each [B, M] with M = topk + (depth - 1) * beam * topk candidates laid out depth by
        depth (depth 1: the root's top-k; then each expanded node's top-k, by frontier slot); parents index
        that layout (-1: the root); scores are cumulative log-probabilities (fp32). Static shapes: depth - 1
        layer calls of `beam` queries after the window pass, no host reads."""
        target, block, fc = self.target, self.fused, self.heads.fc
        batch, width = window.next_tokens.shape
        group = block.num_heads // block.num_kv_heads
        dtype, device = window.features.dtype, window.features.device
        cache = block.new_cache(batch, width + beam * (depth - 1), window.features)
        x = fc(torch.cat([window.features, target.embed(window.next_tokens)], dim=-1))
        g = block(x, window.positions, draft_attention_bias(window.key_mask, width, group, dtype), cache)[:, -1:]
        scores, tokens = self._top_log_probs(g, topk)  # [B, 1, topk]: the root's children
        level_scores, level_tokens = scores.flatten(1), tokens.flatten(1)
        level_parents = torch.full_like(level_tokens, -1)
        level_slots = torch.zeros_like(level_tokens)  # which node of the last expanded frontier is the parent
        all_tokens, all_parents, all_scores = [level_tokens], [level_parents], [level_scores]
        offset, ancestors = 0, None  # ancestors: bool [B, beam, columns] over the draft keys in the cache
        own = torch.eye(beam, dtype=torch.bool, device=device).expand(batch, beam, beam)
        slots_of_children = torch.arange(beam, device=device)[:, None].expand(beam, topk).reshape(1, -1).expand(
            batch, -1)  # which frontier slot each of a level's beam * topk candidates hangs from
        for d in range(1, depth):
            # expand the beam most probable candidates of depth d: their feature from the parent, their token
            front_scores, pick = level_scores.topk(beam, dim=1)  # [B, beam]
            front_tokens, slots = level_tokens.gather(1, pick), level_slots.gather(1, pick)
            parent_g = g.gather(1, slots[..., None].expand(-1, -1, g.shape[-1]))
            if ancestors is None:
                ancestors = own
            else:  # a node sees what its parent saw, and itself
                ancestors = torch.cat([ancestors.gather(1, slots[..., None].expand(-1, -1, ancestors.shape[2])),
                                       own], dim=2)
            allowed = torch.cat([window.key_mask[:, None, :].expand(batch, beam, width), ancestors], dim=2)
            x = fc(torch.cat([parent_g, target.embed(front_tokens)], dim=-1))
            positions = (window.positions[:, -1:] + d).expand(batch, beam)
            g = block(x, positions, grouped_attention_bias(allowed, group, dtype), cache)  # [B, beam, d]
            child_scores, child_tokens = self._top_log_probs(g, topk)  # [B, beam, topk]
            level_scores = (front_scores[..., None] + child_scores).flatten(1)
            level_tokens = child_tokens.flatten(1)
            # each expanded node's topk children sit together: parent and slot repeated topk times (a broadcast,
            # not repeat_interleave, whose CUDA version runs a scan to compute its indices)
            level_parents = (offset + pick)[..., None].expand(batch, beam, topk).reshape(batch, beam * topk)
            level_slots = slots_of_children
            offset += all_tokens[-1].shape[1]
            all_tokens.append(level_tokens)
            all_parents.append(level_parents)
            all_scores.append(level_scores)
        return torch.cat(all_tokens, dim=1), torch.cat(all_parents, dim=1), torch.cat(all_scores, dim=1)

    def _top_log_probs(self, g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most probable tokens of the draft distribution from head features g [B, T, d], best first:
        (log-probabilities fp32 [B, T, k], token ids int64 [B, T, k]). On a GPU two Triton kernels
        (kernels/topk_logprobs.py: no fp32 copy of the logits, no softmax pass, no multi-block radix select);
        elsewhere log_softmax then topk."""
        from minillm.kernels.topk_logprobs import MAX_K, topk_log_softmax
        b, t, d = g.shape
        logits = self.target.vocab.logits(self.final_norm(g.reshape(b * t, d)))
        if logits.is_cuda and k <= MAX_K:
            scores, index = topk_log_softmax(logits.contiguous(), k)
        else:
            scores, index = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return scores.view(b, t, k), self.target.vocab.to_ids(index).view(b, t, k)

    def _tree_search(self, windows: list[RequestWindow], depth: int, topk: int, beam: int
                     ) -> tuple[torch.Tensor, int]:
        """The candidates of the windows' tree search, packed [B, 3M] on the device, and the depth searched (a
        deeper graph may serve: its prefix is this search)."""
        found = None
        if self.graphs is not None and self.graphs.fits(windows):  # CUDA: the search replays as one graph
            if self.tree_graphs is None:
                from minillm.speculative.tree_graphs import TreeDraftGraphs
                self.tree_graphs = TreeDraftGraphs(self)
            found = self.tree_graphs.propose_tree(windows, depth, topk, beam)
            if found is None:  # capture failed: search op by op from now on
                self.graphs = self.tree_graphs = None
        if found is not None:  # a view of the graph's output: read or copied (.cpu(), the landing) before the next
            return found       # replay, which is queued after that copy
        return pack_candidates(*self.draft_tree(self._batch(windows), depth, topk, beam)), depth

    @torch.inference_mode()
    def tree_ahead(self, seqs: list[Sequence], new_tokens: list[list[int]], depths: list[int], topk: int,
                   beam: int) -> None:
        """Start the next step's tree search now (draft_ahead.py; the arguments are draft_ahead's, plus the
        search's widths): propose_tree_candidates collects it without waiting."""
        self._ahead = None  # an older proposal never outlives a newer step
        rows, windows, depth = self._ahead_windows(seqs, new_tokens, depths)
        if windows:
            packed, depth = self._tree_search(windows, depth, topk, beam)
            self._ahead = AheadProposal.start(rows, packed, depth, ("tree", topk, beam), landing=self._landing)

    @torch.inference_mode()
    def propose_tree_candidates(self, seqs: list[Sequence], depths: list[int], topk: int, beam: int
                                ) -> list[DraftTreeCandidates | None]:
        """Per sequence the candidates of a draft tree search `depths[i]` levels deep (None: no features yet,
        or depth 0). One batched search, as deep as the deepest request; a shallower request keeps the
        candidates within its depth (the search above them is the same)."""
        vocab = self.target.vocab_size
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= vocab:
            raise ValueError(f"topk must be an integer in [1, {vocab}], got {topk!r}")
        if isinstance(beam, bool) or not isinstance(beam, int) or not 1 <= beam <= topk:
            raise ValueError(f"beam must be an integer in [1, topk = {topk}], got {beam!r}")
        check_num_tokens(seqs, depths)
        result: list[DraftTreeCandidates | None] = [None] * len(seqs)
        windows = [self._window_of(seq) if d > 0 else None for seq, d in zip(seqs, depths)]
        ready = [i for i, w in enumerate(windows) if w is not None]
        if not ready:
            return result
        depth = max(depths[i] for i in ready)
        ahead, self._ahead = self._ahead, None  # a search started at the end of the last step (draft_ahead.py)
        request_ids = [seqs[i].request_id for i in ready]
        if ahead is not None and ahead.covers(request_ids, [seqs[i].num_tokens - 1 for i in ready], depth,
                                              ("tree", topk, beam)):
            packed, depth = ahead.collect(request_ids), ahead.num_drafts
        else:
            packed, depth = self._tree_search([windows[i] for i in ready], depth, topk, beam)
            packed = packed.cpu()  # the search's one transfer
        tokens, parents, scores = unpack_candidates(packed)
        levels = candidate_depths(depth, topk, beam)
        for row, i in enumerate(ready):
            keep = topk + (min(depths[i], depth) - 1) * beam * topk  # the layout is depth by depth: a prefix
            result[i] = DraftTreeCandidates(tokens[row, :keep], parents[row, :keep], scores[row, :keep],
                                            levels[:keep])
        return result


_CANDIDATE_DEPTHS: dict[tuple[int, int, int], torch.Tensor] = {}


def candidate_depths(depth: int, topk: int, beam: int) -> torch.Tensor:
    """int64 [M]: the depth of each candidate of draft_tree's layout (topk of depth 1, then beam * topk per
    level), made once per (depth, topk, beam) and shared (read only)."""
    key = (depth, topk, beam)
    if key not in _CANDIDATE_DEPTHS:
        _CANDIDATE_DEPTHS[key] = torch.tensor([1] * topk + [d for d in range(2, depth + 1) for _ in range(beam * topk)])
    return _CANDIDATE_DEPTHS[key]
