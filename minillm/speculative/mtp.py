"""Multi-token prediction modules (DeepSeek-V3, 2024): D sequential modules, module k guessing k tokens further
(chapter 9).

DeepSeek-V3 trains its main model with D extra modules; module k (k = 1..D) at position i combines the previous
depth's representation h^{k-1}_i (h^0: the main model's last hidden state, before its final norm) with the
embedding of token i + k:

    h'_i = M_k [ RMSNorm(h^{k-1}_i) ; RMSNorm(embed(t_{i+k})) ]        (2d -> d projection)
    h^k  = TRM_k(h'_{<=i})                                              (one transformer block, causal)
    logits = lm_head(RMSNorm_k(h^k_i))   guesses token i + k + 1         (the LM head shared with the target)

Unlike EAGLE, each depth has its *own* module (no weights reused across steps), so D modules draft at most D
tokens; the chain keeps causality because module k sees the token module k - 1 drafted. Used for speculative
decoding, module 1 at the last position guesses the token after the one just sampled, module 2 (fed that guess)
the one after, and so on. Each module attends over the window of the last <= 64 positions, recomputed each step
(minillm.speculative.head_proposer); module k's window tokens are the window's shifted by k, the drafts so far
filling the end. Drafting runs each module with its norms as single kernels and its layer packed into a
FusedDraftBlock (static shapes: the D modules replay as one CUDA graph).
"""
from __future__ import annotations

import torch
from torch import nn

from minillm.layers.norm import rms_norm
from minillm.speculative.head_proposer import Chooser, HeadProposer, Window
from minillm.speculative.heads import DraftBlock, FusedDraftBlock, HeadConfig, draft_attention_bias, fused_norm


class MTPModule(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.eps = config.rms_norm_eps
        self.hidden_norm, self.embed_norm = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.layer = DraftBlock(config)
        self.out_norm = nn.Parameter(torch.ones(d))
        with torch.no_grad():  # start from "the normalised representation passes through"
            self.proj.weight.zero_()
            self.proj.weight[:, :d].copy_(torch.eye(d))

    def forward(self, hidden: torch.Tensor, token_embeds: torch.Tensor, positions: torch.Tensor,
                key_mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(torch.cat([rms_norm(hidden, self.hidden_norm, self.eps),
                                 rms_norm(token_embeds, self.embed_norm, self.eps)], dim=-1))
        return self.layer(x, positions, key_mask)[0]

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the shared LM head reads."""
        return rms_norm(hidden, self.out_norm, self.eps)


class MTPModules(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.mtp = nn.ModuleList(MTPModule(config) for _ in range(config.num_heads))


class FusedMTPModule(nn.Module):
    """An MTPModule's weights packed for drafting: its three norms as fused kernels, its layer a FusedDraftBlock."""

    def __init__(self, module: MTPModule, max_position: int) -> None:
        super().__init__()
        self.hidden_norm, self.embed_norm = fused_norm(module.hidden_norm, module.eps), \
            fused_norm(module.embed_norm, module.eps)
        self.proj, self.out_norm = module.proj, fused_norm(module.out_norm, module.eps)
        self.layer = FusedDraftBlock(module.layer, max_position)


class MTPProposer(HeadProposer):
    method = "mtp"
    hidden_state_kind = "pre_norm"

    def fuse(self) -> nn.Module:
        return nn.ModuleList(FusedMTPModule(module, self.window) for module in self.heads.mtp)

    def draft(self, window: Window, num_drafts: int, choose: Chooser) -> list[torch.Tensor]:
        hidden, tokens, drafted = window.features, window.next_tokens, []
        batch, width = tokens.shape
        first = self.fused[0].layer
        bias = draft_attention_bias(window.key_mask, width, first.num_heads // first.num_kv_heads, hidden.dtype)
        for module in self.fused[:num_drafts]:
            x = module.proj(torch.cat([module.hidden_norm(hidden), module.embed_norm(self.target.embed(tokens))],
                                      dim=-1))
            hidden = module.layer(x, window.positions, bias, module.layer.new_cache(batch, width, x))
            token = self.target.vocab.to_ids(choose(self.target.vocab.logits(module.out_norm(hidden[:, -1]))))
            drafted.append(token)
            # module k + 1 at position p reads token p + k + 1: the window's tokens one further, the draft last
            tokens = torch.cat([tokens[:, 1:], token[:, None]], dim=1)
        return drafted
