"""The proposer side shared by Medusa, EAGLE and MTP: the target's features per request, windows, draft sampling
(chapter 9).

Every step the engine hands the proposer the target's hidden states of the rows it keeps
(`record_hidden_states`, called by SpeculativeDecoder.record_step before the scheduler's postprocess): a prefill
chunk's rows, a plain decode's one row, a verify step's rows up to the last accepted draft (the rows of rejected
drafts belong to tokens that never happened and are dropped here, as their KV is rolled back there). Row p holds
f_p, the feature that predicted token p + 1. A request's features are kept for its last `window` positions only.

To propose for a sequence of n tokens (token n - 1 just sampled, not yet computed) the proposer needs f_{n-2}: the
feature that chose token n - 1. A request without it (just swapped in, or prefix-cached so its prompt rows were
never computed) gets no drafts this step; its next decode step records what is missing. The window handed to the
heads is, for positions p of the last <= `window` features: f_p and the token x_{p+1} that followed it.

Draft KV ("keep it simple and correct"): the heads keep no cache across steps. EAGLE and MTP recompute their one
layer over the window every step, and keep K/V only within one proposal for the drafts they feed back in; a
rollback therefore needs no bookkeeping at all. Medusa has no attention and needs only f_{n-2}.

Sampling: a greedy request drafts the argmax; a sampled one draws its drafts from q = the head's distribution under
the request's own temperature/top-k/top-p, and returns q so that verification applies the rejection rule with it
(min(1, p/q) and the residual resample), which keeps the target's distribution exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.speculative.heads import HeadConfig, TargetParts, window_positions
from minillm.speculative.proposer import SampledDraftProposer, check_num_tokens, sample_drafts

DEFAULT_WINDOW = 64  # positions of context the EAGLE / MTP layer attends to when drafting


@dataclass
class Window:
    """A batch of left-padded windows: features [B, W, d] at positions p, the tokens x_{p+1} [B, W] that followed
    them, window-relative positions [B, W] and key_mask [B, W] (False on padding)."""

    features: torch.Tensor
    next_tokens: torch.Tensor
    positions: torch.Tensor
    key_mask: torch.Tensor


# choose(logits [B, V]) -> the drafted tokens [B] (on the logits' device): argmax or a sample from q
Chooser = Callable[[torch.Tensor], torch.Tensor]


class HeadProposer(SampledDraftProposer):
    """Base of the head proposers: subclasses set `method`, `hidden_state_kind`, `max_drafts` and `draft`."""

    method = "heads"
    hidden_state_kind = "pre_norm"
    seed_offset = 0x4EAD  # the heads' own stream for seeded requests

    def __init__(self, heads: nn.Module, config: HeadConfig, target: TargetParts, window: int = DEFAULT_WINDOW,
                 seed: int = 0) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.heads, self.config, self.target, self.window = heads.eval(), config, target, window
        self.generator = torch.Generator().manual_seed(seed + 3)  # draft draws of unseeded requests (CPU)
        self._generators: dict[str, torch.Generator] = {}
        self._features: dict[str, tuple[int, torch.Tensor]] = {}  # request_id -> (end, f at positions [end-L, end))

    @property
    def max_drafts(self) -> int:
        """The most tokens one proposal can draft (Medusa: its heads; MTP: its modules; EAGLE: no limit)."""
        return self.config.num_heads

    def draft(self, window: Window, num_drafts: int, choose: Chooser) -> list[torch.Tensor]:
        """num_drafts steps; step j returns choose(logits of draft j) for every row."""
        raise NotImplementedError

    # -- the target's features ----------------------------------------------------------------------------
    def record_hidden_states(self, batch: ScheduledBatch, hidden_states: list[torch.Tensor],
                             accepted: list[list[int]]) -> None:
        if len(hidden_states) != len(batch.seqs) or len(accepted) != len(batch.seqs):
            raise ValueError(f"{len(hidden_states)} hidden-state blocks and {len(accepted)} token lists for "
                             f"{len(batch.seqs)} sequences")
        for seq, n, rows, tokens in zip(batch.seqs, batch.num_new_tokens, hidden_states, accepted):
            if rows.shape[0] != n:
                raise ValueError(f"request {seq.request_id!r}: {rows.shape[0]} hidden rows for {n} new tokens")
            drafts = len(seq.spec_token_ids)
            keep = n - drafts + max(len(tokens) - 1, 0) if drafts else n  # rows of rejected drafts never happened
            start = seq.num_computed_tokens  # not yet advanced: postprocess runs after this
            end, kept = self._features.get(seq.request_id, (start, rows[:0]))
            if end < start:  # a gap (positions never computed here): start afresh
                kept = rows[:0]
            else:  # rows from `start` on are recomputed now (after a preemption): drop the old ones
                kept = kept[:max(0, kept.shape[0] - (end - start))]
            # cat copies (the rows may be views of a CUDA-graph buffer, rewritten next step); clone keeps only
            # the window alive, not the whole concatenation
            features = torch.cat([kept, rows[:keep]])[-self.window:].clone()
            self._features[seq.request_id] = (start + keep, features)

    def free(self, request_id: str) -> None:
        self._features.pop(request_id, None)
        self._generators.pop(request_id, None)

    def active_requests(self) -> set[str]:
        return set(self._features)

    def _window_of(self, seq: Sequence) -> tuple[torch.Tensor, list[int]] | None:
        """(features [L, d], the tokens after them) when f_{n-2} is known, else None."""
        end, features = self._features.get(seq.request_id, (0, None))
        if features is None or end != seq.num_tokens - 1 or features.shape[0] == 0:
            return None
        length = features.shape[0]
        return features, seq.token_ids[end - length + 1:end + 1]

    def _batch(self, windows: list[tuple[torch.Tensor, list[int]]]) -> Window:
        """Left-padded windows of the batch. The host's numbers (each row's tokens, then every row's length) go to
        the device in one non-blocking copy from pinned memory; the features are already there."""
        width = max(f.shape[0] for f, _ in windows)
        first = windows[0][0]
        batch = len(windows)
        features = first.new_zeros(batch, width, first.shape[1])
        host = [0] * (batch * width)
        lengths = []
        for row, (f, next_tokens) in enumerate(windows):
            if len(next_tokens) != f.shape[0]:
                raise ValueError(f"a window of {f.shape[0]} features needs as many tokens, got {len(next_tokens)}")
            features[row, width - f.shape[0]:] = f
            host[(row + 1) * width - len(next_tokens):(row + 1) * width] = next_tokens
            lengths.append(f.shape[0])
        packed = torch.tensor(host + lengths, dtype=torch.int64)
        if first.device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(first.device, non_blocking=True)
        positions, key_mask = window_positions(packed[batch * width:], width, first.device)
        return Window(features, packed[:batch * width].view(batch, width), positions, key_mask)

    # -- drafting -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose_with_probs(self, seqs: list[Sequence], num_tokens: list[int]
                           ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        check_num_tokens(seqs, num_tokens)
        drafts: list[list[int]] = [[] for _ in seqs]
        probs: list[torch.Tensor | None] = [None] * len(seqs)
        ready, windows = [], []
        for i, (seq, k) in enumerate(zip(seqs, num_tokens)):
            window = self._window_of(seq) if k > 0 else None
            if window is not None:
                ready.append((i, min(k, self.max_drafts)))
                windows.append(window)
        if not ready:
            return drafts, probs
        params = [seqs[i].sampling_params for i, _ in ready]
        sampled_rows = [r for r, p in enumerate(params) if p.temperature > 0]
        gens = [self._generator_of(seqs[ready[r][0]]) for r in sampled_rows]
        q_steps: list[torch.Tensor] = []

        def choose(logits: torch.Tensor) -> torch.Tensor:
            tokens = logits.argmax(dim=-1)
            if sampled_rows:  # q under each request's own temperature / top-k / top-p, then x ~ q
                picked, q = sample_drafts(logits[sampled_rows], [params[r] for r in sampled_rows], gens,
                                          self.generator)
                tokens[sampled_rows] = picked.to(tokens.device)
                q_steps.append(q)
            return tokens

        steps = self.draft(self._batch(windows), max(k for _, k in ready), choose)
        table = torch.stack(steps, dim=1).tolist()  # [B, steps]
        for row, (i, k) in enumerate(ready):
            drafts[i] = table[row][:k]
        for j, r in enumerate(sampled_rows):
            i, k = ready[r]
            probs[i] = torch.stack([q[j] for q in q_steps[:k]])
        return drafts, probs
