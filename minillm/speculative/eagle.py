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
"""
from __future__ import annotations

import torch
from torch import nn

from minillm.speculative.head_proposer import Chooser, HeadProposer, Window
from minillm.speculative.heads import DraftBlock, FusedDraftBlock, HeadConfig, draft_attention_bias


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
            token = choose(target.logits(self.final_norm(last)))
            drafted.append(token)
            if step + 1 == num_drafts:
                break
            # the next position: its feature is the one just predicted, its token the one just drafted
            position = position + 1
            x = fc(torch.cat([last, target.embed(token)], dim=-1))[:, None]
            last = block(x, position, step_bias[..., :width + step + 1], cache)[:, -1]
        return drafted
