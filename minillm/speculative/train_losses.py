"""The losses of self-distillation: each draft head's distribution against the target's (chapter 9).

Every loss compares a head's distribution with the *target's* distribution for the same token, KL(p_target ||
q_head) (the cross-entropy against the target's soft labels, less their entropy): that is what verification will
accept, and it carries more signal than the one token the target happened to emit. With p_t = softmax(lm_head(
norm(f_t))), the target's law of token t + 1 (train_heads' docstring lists what each kind predicts):

    EAGLE (Li et al. 2024): L = L_reg + w_cls L_cls per pass of the drafting chain, L_reg = SmoothL1(g_t, f_{t+1})
    on features in units of their RMS, L_cls the KL to p_{t+1}, w_cls = 0.1 as in the paper; pass j weighted
    decay ** j (training-time test, EAGLE-3); only chains the engine drafts count (chain_weights: answer positions,
    inside one document).

The KL over the whole vocabulary without a second log-softmax: with z = W n the head's logits (n its normalised
feature, W the LM head) and p the target's law, KL(p || softmax(z)) = sum p log p - n . (W^T p) + logsumexp(z).
W^T p (the target's expected output embedding, [d]) and sum p log p are computed once per step from the target,
so each head prediction costs its logits and one fp32 logsumexp (`target_law`, `kl_to_target`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.forward_context import forward_context, prefill_metadata
from minillm.speculative.head_proposer import DEFAULT_WINDOW
from minillm.speculative.heads import TargetParts
from minillm.speculative.train_eval import unrolled_chain

EAGLE_CLS_WEIGHT, EAGLE_NOISE = 0.1, 0.2  # the paper's w_cls; noise U(-a/2, a/2) in units of the feature RMS


def distill_kl(logits: torch.Tensor, target_logits: torch.Tensor, weight: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Mean over rows of KL(p_target || q) = sum p (log p - log q), in fp32 (0 when the head is the target);
    with `weight` (one per row, 0 or 1) the mean over the weighted rows (0 when there are none)."""
    log_p = torch.log_softmax(target_logits.float(), dim=-1)
    kl = (log_p.exp() * (log_p - torch.log_softmax(logits.float(), dim=-1))).sum(-1)
    if weight is None:
        return kl.mean()
    return (kl * weight).sum() / weight.sum().clamp(min=1.0)


@torch.no_grad()
def target_law(target: TargetParts, features: torch.Tensor, rows_per_chunk: int = 1024
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the KL needs of the target's law p = softmax(W norm(f)) at each position: (W^T p [..., d] and
    sum p log p [...], both fp32), computed in chunks of rows so no more than one chunk's [rows, V] is alive."""
    flat = features.reshape(-1, features.shape[-1])
    weight = target.lm_head_weight
    expected, neg_entropy = [], []
    for start in range(0, flat.shape[0], rows_per_chunk):
        log_p = torch.log_softmax(target.logits(target.final_norm(flat[start:start + rows_per_chunk])).float(), -1)
        p = log_p.exp()
        expected.append((p.to(weight.dtype) @ weight).float())  # bf16 on a GPU: ~0.4% rounding per entry, any sign
        neg_entropy.append((p * log_p).sum(-1))
    return (torch.cat(expected).view(*features.shape[:-1], -1), torch.cat(neg_entropy).view(features.shape[:-1]))


def kl_to_target(target: TargetParts, hidden: torch.Tensor, law: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """KL(p || softmax(W norm(hidden))) per position, exact over the whole vocabulary, from `target_law`:
    sum p log p - n . (W^T p) + logsumexp(W n). Only the logsumexp sees the vocabulary (logits in the autocast
    dtype, reduced in fp32); its gradient, softmax(z) - p in logit space, is the usual one."""
    normed = target.final_norm(hidden)
    expected, neg_entropy = law
    log_normalizer = torch.logsumexp(target.logits(normed).float(), dim=-1)
    return neg_entropy - (normed.float() * expected).sum(-1) + log_normalizer


def chain_weights(shape: torch.Size, depth: int, segments: torch.Tensor | None, drafted: torch.Tensor | None,
                  device: torch.device) -> torch.Tensor:
    """fp32 [B, L - 1]: 1 where pass `depth` at position t counts in EAGLE's loss, else 0. Its chain starts at
    p = t - depth >= 0; with `drafted` [B, L] p must be an answer position, with `segments` [B, L] the target
    position t + 1 must lie in p's document (rows pack documents end to end)."""
    b, length = shape
    t = torch.arange(length - 1, device=device)
    start = (t - depth).clamp(min=0)
    keep = (t >= depth).expand(b, -1)
    if drafted is not None:
        keep = keep & drafted[:, start]
    if segments is not None:
        keep = keep & (segments[:, start] == segments[:, 1:])
    return keep.float()


class HeadLoss:
    """loss(heads, tokens [B, L], features [B, L, d]) -> (loss, {name: value tensor}) for one head kind;
    `predictions` gives each head's (or draft step's) logits with the target's logits for the same tokens.
    EAGLE: `unroll` passes of the drafting chain after the teacher-forced one, pass j weighted decay ** j."""

    def __init__(self, kind: str, target: TargetParts, feature_rms: float, unroll: int = 0, decay: float = 0.8,
                 window: int = DEFAULT_WINDOW) -> None:
        self.kind, self.target, self.scale = kind, target, feature_rms
        self.unroll, self.decay, self.window = unroll, decay, window

    def __call__(self, heads: nn.Module, tokens: torch.Tensor, features: torch.Tensor,
                 segments: torch.Tensor | None = None, drafted: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "eagle":
            return self.eagle_loss(heads, tokens, features, segments, drafted)
        pairs, _ = self.predictions(heads, tokens, features)
        kls = [distill_kl(q, p) for q, p in pairs]
        prefix = "head" if self.kind == "medusa" else "module"
        return sum(kls) / len(kls), {f"{prefix}{k + 1}": v.detach() for k, v in enumerate(kls)}

    def eagle_loss(self, heads: nn.Module, tokens: torch.Tensor, features: torch.Tensor,
                   segments: torch.Tensor | None = None, drafted: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Pass j at position t predicts f_{t+1} and the target's law p_{t+1}, whatever j: the same targets for
        every pass, computed once. It counts where its chain, started at p = t - j, is one the engine drafts:
        p inside the row, drafted[p] (an answer position) and the target f_{t+1} in p's document (chain_weights)."""
        inputs = features[:, :-1]
        inputs = inputs + (torch.rand_like(inputs) - 0.5) * (EAGLE_NOISE * self.scale)  # pass 0's input only
        inner = None if segments is None else segments[:, :-1]
        passes = unrolled_chain(heads, inputs, self.target.embed(tokens[:, 1:]), 1 + self.unroll, self.window,
                                segments=inner)
        truth = features[:, 1:].float() / self.scale
        law = target_law(self.target, features[:, 1:])
        total, weights, parts = 0.0, 0.0, {}
        for j, g in enumerate(passes):
            weight = chain_weights(tokens.shape, j, segments, drafted, tokens.device)
            share = weight / weight.sum().clamp(min=1.0)
            regression = F.smooth_l1_loss(g.float() / self.scale, truth, reduction="none").mean(-1)
            kl = kl_to_target(self.target, g, law)
            regression, kl = ((torch.where(weight > 0, v, 0.0) * share).sum() for v in (regression, kl))
            total = total + self.decay ** j * (regression + EAGLE_CLS_WEIGHT * kl)
            weights += self.decay ** j
            parts.update({"reg": regression.detach(), "cls": kl.detach()} if j == 0 else {f"cls{j + 1}": kl.detach()})
        return total / weights, parts

    def predictions(self, heads: nn.Module, tokens: torch.Tensor, features: torch.Tensor
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """([(head logits, target logits)] per head / module, EAGLE's feature regression loss or None), every input
        the target's (teacher forcing; EAGLE's later drafts: train_eval.simulated_acceptance)."""
        b, length, _ = features.shape
        with torch.no_grad():
            p_logits = self.target.logits(self.target.final_norm(features))

        def window(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.arange(n, device=features.device).expand(b, -1),
                    torch.ones(b, n, dtype=torch.bool, device=features.device))
        if self.kind == "medusa":  # head k at t guesses token t + 1 + k: the target's law at t + k
            z = heads(self.target.final_norm(features))  # [K, B, L, d]
            return [(self.target.logits(z[k - 1][:, :-k]), p_logits[:, k:]) for k in range(1, z.shape[0] + 1)], None
        if self.kind == "eagle":  # g_t from (f_t, x_{t+1}) ~ f_{t+1}, which guesses token t + 2
            g = unrolled_chain(heads, features[:, :-1], self.target.embed(tokens[:, 1:]), 1, self.window)[0]
            regression = F.smooth_l1_loss(g.float() / self.scale, features[:, 1:].float() / self.scale)
            return [(self.target.logits(self.target.final_norm(g)), p_logits[:, 1:])], regression
        hidden, pairs = features, []  # mtp: module k at t reads token t + k, guesses token t + k + 1
        for k, module in enumerate(heads.mtp, start=1):
            n = length - k  # positions t whose token t + k is known
            hidden = module(hidden[:, :n], self.target.embed(tokens[:, k:]), *window(n))
            pairs.append((self.target.logits(module.normed(hidden)), p_logits[:, k:]))
        return pairs, None


def draft_loss(draft: nn.Module, target: TargetParts, tokens: torch.Tensor, features: torch.Tensor,
               drafted: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The draft model's distribution against the target's (a cache-less prefill of each row), at every position,
    or with `drafted` [B, L] only where the engine drafts: positions whose next token is an answer token. A
    draft never proposes a prompt's next token, and a small one has no capacity to spend on the system prompt and
    the user's text (EAGLE's loss is restricted the same way)."""
    b, length = tokens.shape
    with torch.no_grad():
        p_logits = target.logits(target.final_norm(features))
    with forward_context(prefill_metadata([length] * b, device=tokens.device)):
        hidden = draft(tokens.flatten(), torch.arange(length, device=tokens.device).repeat(b))
    weight = None if drafted is None else drafted.float()
    loss = distill_kl(draft.compute_logits(hidden).view(b, length, -1), p_logits, weight)
    return loss, {"kl": loss.detach()}
