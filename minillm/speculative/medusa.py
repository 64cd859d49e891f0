"""Medusa heads (Cai et al. 2024): K extra heads on the target's last hidden state, each guessing one more token
ahead (chapter 9).

The target's last layer, after its final norm, gives h_t at position t; its LM head turns h_t into the next token
t + 1. Medusa head k (k = 1..K) is one residual block and then the *same* LM head (the target's, not a copy):

    z_k = h_t + SiLU(W_k h_t + b_k)        logits_k = lm_head(z_k)    guesses token t + 1 + k

All K heads read the one h_t, so a proposal is one small matmul per head, no autoregression: cheap, but head k
guesses token t + 1 + k without seeing tokens t + 2 .. t + k (it cannot know which of them the target will pick),
so acceptance falls faster with depth than EAGLE's. W_k starts at zero (then every head is the LM head: a guess of
t + 1 repeated); training moves it. Drafting here is a chain, each head's top-1 (or a sample from its q, for
sampled requests). Tree drafting scores several candidates per head in one verify step: `propose_candidates`
gives each head's top-k tokens and probabilities, [K, topk] per sequence, for minillm.speculative.tree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.engine.sequence import Sequence
from minillm.speculative.head_proposer import Chooser, HeadProposer, Window
from minillm.speculative.heads import HeadConfig, TargetParts


class MedusaHeads(nn.Module):
    """forward(h [..., d]) -> the K residual outputs [K, ..., d] (the LM head is applied by the caller)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(config.num_heads))
        for block in self.blocks:  # zero: each head starts as the LM head itself
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.stack([hidden + F.silu(block(hidden)) for block in self.blocks])


class MedusaProposer(HeadProposer):
    method = "medusa"
    hidden_state_kind = "post_norm"  # what the LM head reads

    def __init__(self, heads: MedusaHeads, config: HeadConfig, target: TargetParts, seed: int = 0,
                 cuda_graphs: bool = False) -> None:
        super().__init__(heads, config, target, window=1, seed=seed, cuda_graphs=cuda_graphs)  # only f_{n-2} is read

    def head_logits(self, window: Window) -> torch.Tensor:
        """[K, B, V']: every head's logits over the draft vocabulary at each row's last feature."""
        return self.target.vocab.logits(self.heads(window.features[:, -1]))

    def draft(self, window: Window, num_drafts: int, choose: Chooser) -> list[torch.Tensor]:
        logits = self.head_logits(window)
        return [self.target.vocab.to_ids(choose(logits[k])) for k in range(num_drafts)]

    @torch.inference_mode()
    def propose_candidates(self, seqs: list[Sequence], topk: int
                           ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per sequence, (token ids int64 [K, topk], probabilities float32 [K, topk]): head k's top-k guesses for
        the token k + 1 positions after the last one, best first; None for a sequence without its features yet.
        Stack the ids of several sequences into minillm.speculative.tree.TokenTree.candidates' [B, K, topk]."""
        words = self.target.vocab.size  # the draft vocabulary's size
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= words:
            raise ValueError(f"topk must be an integer in [1, {words}] (the draft vocabulary), got {topk!r}")
        windows = [self._window_of(seq) for seq in seqs]
        ready = [i for i, w in enumerate(windows) if w is not None]
        result: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(seqs)
        if not ready:
            return result
        probs = torch.softmax(self.head_logits(self._batch([windows[i] for i in ready])).float(), dim=-1)
        top_p, top_index = probs.topk(topk, dim=-1)  # [K, B, topk]
        top_ids = self.target.vocab.to_ids(top_index)
        # one transfer for both: the ids as int32 words, the probabilities by their bits
        host = torch.cat([top_ids.to(torch.int32), top_p.view(torch.int32)], dim=-1).cpu()
        ids, top_p = host[..., :topk].long(), host[..., topk:].contiguous().view(torch.float32)
        for row, i in enumerate(ready):
            result[i] = (ids[:, row], top_p[:, row])
        return result
