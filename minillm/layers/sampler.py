"""The sampler: from the logits of the last position to one token per sequence (chapter 1).

Each row of the batch carries its own SamplingParams, so temperature, top-k and top-p are tensors of shape [B],
applied row by row in one pass:

    greedy rows (temperature 0)   -> argmax of the raw logits, exactly (no division by zero, no randomness)
    the others                    -> logits / T -> top-k filter -> top-p filter -> softmax -> one draw

A request's logits processors (penalties, logit_bias, min_tokens; minillm/layers/logits_processors.py) change
its row's logits before they reach the sampler (the model runner applies them, greedy rows included); its min_p
filters here, after the temperature.

The draw uses the *exponential race* (a form of the Gumbel-max trick): with E_v ~ Exp(1) independent,
argmax_v p_v / E_v is distributed exactly as Categorical(p). It needs no cumulative sums, is a single
vectorised argmax, and makes seeding easy: a request with its own `seed` draws its E from its own
torch.Generator, so its tokens do not depend on what else shares the batch. Unseeded rows share the engine's
generator (itself seeded by `LLM(seed=...)`).

The two filters are graded exercises; the engine calls them through `dispatch`, so a learner's version can be
plugged into the running engine with `LLM(..., overrides={"ch01.top_k_filter": my_fn})`.
"""
from __future__ import annotations

import math  # noqa: F401  (available to the exercise regions, which must be self-contained)

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from minillm.hooks import dispatch
from minillm.layers.logits_processors import min_p_filter


# >>> exercise ch01.top_k_filter
def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's `top_k` largest logits; set every other entry to -inf.

    logits: float [B, V]. top_k: int64 [B]; -1 (or any value >= V) keeps the whole row (SamplingParams refuses
    0, so the rows you are given ask for -1 or at least 1).
    Returns a new tensor of the same shape and dtype; `logits` is not modified.

    Exactly k entries survive in a row even when several logits tie at the boundary: rank the entries
    by a sort (ties broken by position), keep ranks 0..k-1. Softmax of the result gives 0 probability to the
    removed tokens because exp(-inf) = 0.
    """
    # >>> solution
    vocab = logits.shape[-1]
    k = torch.where(top_k < 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    _, order = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(logits)
    remove_sorted = ranks >= k.to(logits.device).unsqueeze(-1)  # rank r is removed when r >= k
    # scatter the decision back from sorted order to vocabulary order
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))
    # <<< solution
# <<< exercise


# >>> exercise ch01.top_p_filter
def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sum reaches `top_p`.

    logits: float [B, V] (may already contain -inf). top_p: float [B] in (0, 1]; 1 keeps every token that
    has non-zero probability. The most likely token is always kept. Others become -inf.

    Sort probabilities in decreasing order; a token is kept when the mass of the tokens *before* it is
    still below top_p (so the token that crosses the threshold is kept, and the first one always is).
    """
    # >>> solution
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    sorted_probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    top_p = top_p.to(logits.device, torch.float32).unsqueeze(-1)
    # top_p 1 keeps every token: in fp32 the running sum reaches 1.0 before the last tokens of a large vocabulary
    remove_sorted = (mass_before >= top_p) & (top_p < 1)
    remove_sorted[:, 0] = False  # never empty a row, whatever rounding did to the cumulative sum
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))
    # <<< solution
# <<< exercise


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary of [B, V] logits, int64 [B]. On a GPU, the two-stage kernel of
    minillm.kernels.argmax (a one-row argmax in torch runs on a single SM; the kernel spreads the row over
    many, and reads bf16 without an fp32 copy); elsewhere torch.argmax."""
    if logits.is_cuda and logits.dim() == 2 and logits.stride(-1) == 1 and logits.is_floating_point():
        from minillm.kernels.argmax import argmax_last_dim
        return argmax_last_dim(logits)
    return logits.argmax(dim=-1)


class Sampler(nn.Module):
    """Turns [B, V] logits into [B] token ids under per-row sampling parameters.

    Three branches depend on the parameters: all rows greedy (argmax only), some top-k, some top-p. Decided from
    the device tensors, each costs a sync (the host reads a bool back from the GPU); a caller that holds the
    parameters on the host too (the model runner) passes the answers as `all_greedy` / `use_top_k` / `use_top_p`,
    and sampling then runs without a single sync."""

    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor,
                top_ps: torch.Tensor, generators: list[torch.Generator | None] | None = None,
                default_generator: torch.Generator | None = None, *, all_greedy: bool | None = None,
                use_top_k: bool | None = None, use_top_p: bool | None = None,
                min_p: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, V]; temperatures float [B] (0 = greedy); top_ks int64 [B] (-1 = all); top_ps float [B];
        generators: per-row torch.Generator or None (None rows use `default_generator`). all_greedy / use_top_k /
        use_top_p: the host's answers to "every temperature <= 0", "any top_k > 0", "any top_p < 1" (None: read
        them from the tensors). min_p: float [B] (0 = off), or None when no row asks."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch = logits.shape[0]
        for name, t in (("temperatures", temperatures), ("top_ks", top_ks), ("top_ps", top_ps)):
            if t.shape != (batch,):
                raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")
        tokens = greedy_tokens(logits)
        logits = logits.float()  # sampling in fp32: bf16 rounds small probabilities to zero
        greedy = temperatures <= 0
        if all_greedy if all_greedy is not None else bool(greedy.all()):
            return tokens
        # greedy rows are divided by 1 (their result is overwritten below), the others by their temperature
        temps = torch.where(greedy, torch.ones_like(temperatures), temperatures).to(logits)
        scaled = logits / temps.unsqueeze(-1)
        if min_p is not None:
            scaled = min_p_filter(scaled, min_p)
        if use_top_k if use_top_k is not None else bool((top_ks > 0).any()):
            scaled = dispatch("ch01.top_k_filter", top_k_filter)(scaled, top_ks.to(logits.device))
        if use_top_p if use_top_p is not None else bool((top_ps < 1).any()):
            scaled = dispatch("ch01.top_p_filter", top_p_filter)(scaled, top_ps.to(logits.device))
        probs = torch.softmax(scaled, dim=-1)
        race = self._exponentials(probs, generators, default_generator)
        sampled = (probs / race).argmax(dim=-1)
        return torch.where(greedy.to(logits.device), tokens, sampled)

    @staticmethod
    def _exponentials(probs: torch.Tensor, generators: list[torch.Generator | None] | None,
                      default_generator: torch.Generator | None) -> torch.Tensor:
        """Exp(1) noise of probs' shape. Rows with their own generator draw from it (a full row each, so the
        draw does not depend on the row's position in the batch); the rest draw together from the default, in row
        order, and go into place run by run (slices: an index list would be one more host-to-device copy)."""
        generators = generators if generators is not None else [None] * probs.shape[0]
        if len(generators) != probs.shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {probs.shape[0]} rows")
        shared = [i for i, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):
            race = torch.empty_like(probs).exponential_(generator=default_generator)
        else:
            race = torch.empty_like(probs)
            if shared:
                noise = torch.empty((len(shared), probs.shape[1]), device=probs.device, dtype=probs.dtype)
                noise.exponential_(generator=default_generator)
                start = 0  # runs of consecutive shared rows: race[a:b] = noise[start:start + b - a]
                for a, b in _runs(shared):
                    race[a:b] = noise[start:start + b - a]
                    start += b - a
            for i, g in enumerate(generators):
                if g is not None:
                    race[i].exponential_(generator=g)
        # Exp(1) can be exactly 0 in float arithmetic; keep the division finite
        return race.clamp_min_(torch.finfo(race.dtype).tiny)


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in sorted `rows`, as [a, b) pairs: [0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs
