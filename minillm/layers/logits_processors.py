"""Logits processors: what a request asks to change in the model's logits before a token is picked (chapter 1).

vLLM's order, applied to the float32 logits of the rows that ask (SamplingParams documents each field):

    constraints       tokens outside the row's allowed mask (structured outputs, allowed_token_ids) and the
                      tokens bad_words bans set to -inf; the engine computes both per row on the host
                      (minillm/engine/constraints.py)
    min_tokens        EOS and the stop token ids set to -inf until min_tokens tokens are out
    logit_bias        a constant added per token id ({id: bias}; -100 all but bans a token, +100 all but forces it)
    penalties         on the sequence's own tokens so far, the model's logits of them lowered:
                        repetition r  (prompt and output)   logit > 0 -> logit / r, else logit * r   (CTRL, 2019)
                        frequency f   (output only)         logit -= f * count(token)                  (OpenAI)
                        presence  p   (output only)         logit -= p * [count(token) > 0]            (OpenAI)
    --- then the sampler: greedy rows take the argmax of the processed logits; the others divide by the
        temperature, apply min_p (keep tokens with p >= min_p * p_max), top-k, top-p, and draw ---

Everything before the temperature changes what greedy decoding returns, so it applies to greedy rows too;
min_p never removes the most likely token, so greedy rows skip it. Log-probabilities (SamplingParams.logprobs)
stay those of the raw logits, as vLLM returns by default.

The penalties need each row's token history. The engine sends it every step (LogitsProcessing.history: the
tokens before this step's; the step's own come from the device copy of its input ids, so a token sampled by the
step before and never seen by the host, under async scheduling, counts too). Counting is one scatter_add over a
[rows, history] tensor: O(history) per step for the rows that ask and nothing for the others. vLLM V1 keeps the
histories on the device across steps instead; sending them is simpler and survives preemption and recomputation
unchanged, at the price of host work that grows with the sequence.

Speculative decoding: a verify step samples one row per draft, and each row counts the drafts on its path (the
ones before it in a chain, its ancestors in a token tree), the history it has if they are accepted; the accepted
tokens are then exactly the processed model's. Where the rule reads probabilities instead of samples (drafts
sampled from a draft model's q, token trees at temperature > 0), the step returns `target_logits`: the processed
logits with min_p's removals, so the rule's p is the distribution plain decoding samples from.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from minillm.hooks import dispatch


@dataclass
class ProcessingTensors:
    """The device tensors of one step's logits processors, for the sampled rows `rows` that ask (int64 [R])."""

    rows: torch.Tensor
    min_p: torch.Tensor | None = None  # float32 [S] over all sampled rows; None when no row asks
    ban_rows: torch.Tensor | None = None  # int64 [N], int64 [N]: logits[rows[ban_rows], ban_ids] = -inf
    ban_ids: torch.Tensor | None = None
    bias_rows: torch.Tensor | None = None  # int64 [M] x2, float32 [M]: logits[rows[bias_rows], bias_ids] += bias
    bias_ids: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    allow_rows: torch.Tensor | None = None  # int64 [A], bool [A, V]: logits[rows[allow_rows]] kept where allow_mask
    allow_mask: torch.Tensor | None = None
    history: torch.Tensor | None = None  # int64 [R, L]: each row's tokens so far, -1 padded
    is_output: torch.Tensor | None = None  # bool [R, L]: the entry is a generated token (not the prompt's)
    presence: torch.Tensor | None = None  # float32 [R] each
    frequency: torch.Tensor | None = None
    repetition: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """float32 [S, V] logits after min_tokens, logit_bias and the penalties (a new tensor: the caller's
        logits stay raw for the log-probabilities). The sampler then draws from these, with `min_p`."""
        out = logits.to(torch.float32, copy=True)
        picked = out[self.rows]
        if self.allow_rows is not None:  # constraints: structured outputs, allowed_token_ids
            picked[self.allow_rows] = picked[self.allow_rows].masked_fill(~self.allow_mask, float("-inf"))
        if self.ban_rows is not None:
            picked[self.ban_rows, self.ban_ids] = float("-inf")
        if self.bias_rows is not None:
            picked[self.bias_rows, self.bias_ids] += self.bias_values
        if self.history is not None:
            penalize = dispatch("ch01.apply_penalties", apply_penalties)  # a learner's version plugs in here
            picked = penalize(picked, self.history, self.is_output, self.presence, self.frequency, self.repetition)
        out[self.rows] = picked
        return out

    def target_logits(self, processed: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        """The logits whose temperature / top-k / top-p distribution is what these rows sample from: `processed`
        (what `apply` returned) with min_p's removals as -inf (computed at each row's temperature; a -inf stays
        -inf whatever is applied after). Speculative decoding's rejection rule reads its target p from these."""
        if self.min_p is None:
            return processed
        temps = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures)).to(processed)
        kept = torch.isfinite(min_p_filter(processed / temps.unsqueeze(1), self.min_p))
        return processed.masked_fill(~kept, float("-inf"))


# >>> exercise ch01.apply_penalties
def apply_penalties(logits: torch.Tensor, history: torch.Tensor, is_output: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """Repetition, frequency and presence penalties on float32 logits [R, V]; returns a new tensor.

    history: int64 [R, L], row r's tokens so far, padded with -1 (padding is no token: it counts for nothing).
    is_output: bool [R, L], True where history[r, j] was generated (False: a prompt token).
    presence, frequency, repetition: float32 [R], per row; 0, 0 and 1 leave a row as it is.

    For every token v of the vocabulary, with c = how many times v occurs among row r's *generated* tokens:
        repetition: if v occurs anywhere in the history (prompt or output): logit / r if logit > 0, else logit * r
        then        logit -= frequency * c + presence * (1 if c > 0 else 0)
    Vectorise over rows and vocabulary (a scatter_add into a [R, V] tensor of counts); no Python loop over tokens.
    """
    # >>> solution
    valid = history >= 0
    index = history.clamp(min=0)  # padding points at token 0 with weight 0: it counts for nothing
    counts = torch.zeros_like(logits).scatter_add_(1, index, (valid & is_output).to(logits.dtype))
    # "occurs anywhere" as a count > 0: a boolean scatter would let padding overwrite a real token 0 with False
    occurs = torch.zeros(logits.shape, dtype=torch.int32, device=logits.device)
    seen = occurs.scatter_add_(1, index, valid.to(torch.int32)) > 0
    r = repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)
    # <<< solution
# <<< exercise


def min_p_filter(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the row's largest one (after the temperature);
    set the rest to -inf. scaled: float32 [S, V]; min_p: float32 [S] in [0, 1], 0 keeps everything. The most
    likely token always survives (its ratio is 1)."""
    probs = torch.softmax(scaled, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return scaled.masked_fill(probs < threshold, float("-inf"))


def row_path(row: int, ancestors: int = -1) -> list[int]:
    """The step's rows (offsets in a sequence's query rows) on query row `row`'s path, itself included: every row
    before it in a chain (ancestors -1), the rows set in its ancestor bitmask in a token tree. The history a sampled
    row's processors see (penalties here, constraints in engine/constraints.py) is the host's tokens plus these."""
    return list(range(row + 1)) if ancestors == -1 else [j for j in range(row + 1) if ancestors >> j & 1]


def processing_tensors(specs: list, sample_seqs: list[int], input_ids: torch.Tensor, query_starts: list[int],
                       query_lens: list[int], vocab_size: int,
                       tree_masks: list[list[int] | None] | None = None) -> ProcessingTensors | None:
    """The device tensors for the sampled rows whose SamplingSpec carries a LogitsProcessing, or None.

    specs[r] / sample_seqs[r]: sampled row r's parameters and sequence; a sequence's sampled rows are the last of its
    query_lens[i] rows, which sit at input_ids[query_starts[i]:][:query_lens[i]] on the device (already resolved when
    the step took deferred ids from the step before). A row counts as history the host's tokens before the step
    (LogitsProcessing.history) and the step's own tokens on its path: in a verify step of speculative decoding, the
    drafts before it, the history it has if they are accepted. That path is rows 0..j for row j of a chain, and the
    rows set in its ancestor bitmask (StepInput.tree_masks, itself included) for a node of a token tree."""
    rows = [r for r, s in enumerate(specs) if s.processing is not None]
    if not rows:
        return None
    device = input_ids.device
    num_sampled = [0] * len(query_lens)
    for i in sample_seqs:
        num_sampled[i] += 1
    # each processed row's sequence and the rows of that sequence on its path (offsets in its query rows)
    seqs, paths, seen, nth = [], [], [0] * len(query_lens), []
    for r in rows:
        i = sample_seqs[r]
        row = query_lens[i] - num_sampled[i] + seen[i]
        nth.append(seen[i])  # which of its sequence's sampled rows this is (constraints come in that order)
        seen[i] += 1
        mask = tree_masks[i][row] if tree_masks is not None and tree_masks[i] is not None else -1
        seqs.append(i)
        paths.append(row_path(row, mask))
    procs = [specs[r].processing for r in rows]  # minillm.engine.step_input.LogitsProcessing, one per row
    t = ProcessingTensors(rows=torch.tensor(rows, dtype=torch.int64, device=device))
    if any(p.min_p > 0 for p in procs):
        t.min_p = torch.tensor([s.processing.min_p if s.processing is not None else 0.0 for s in specs],
                               dtype=torch.float32, device=device)
    bans = [(n, tok) for n, (p, path) in enumerate(zip(procs, paths))  # outputs so far: context - prompt
            if p.start + len(path) - p.num_prompt_tokens < p.min_tokens for tok in p.stop_ids if tok < vocab_size]
    bans += [(n, tok) for n, p in enumerate(procs) if p.bans for tok in p.bans[nth[n]] if tok < vocab_size]
    allowed = [(n, p.allowed[nth[n]]) for n, p in enumerate(procs) if p.allowed and p.allowed[nth[n]] is not None]
    if allowed:
        t.allow_rows = torch.tensor([n for n, _ in allowed], dtype=torch.int64, device=device)
        # stacked with numpy, not torch: torch's CPU ops wake its thread pool, whose spinning threads then slowed
        # the tokenizer's threads in the same step's output loop 10-17x (H100 host, batch 64)
        host = np.zeros((len(allowed), vocab_size), dtype=bool)  # logits past the tokenizer: never allowed
        for a, (_, mask) in enumerate(allowed):
            width = min(len(mask), vocab_size)
            host[a, :width] = mask.numpy()[:width]
        t.allow_mask = torch.from_numpy(host).to(device)
    if bans:
        t.ban_rows, t.ban_ids = torch.tensor(bans, dtype=torch.int64, device=device).unbind(1)
    biases = [(n, tok, b) for n, p in enumerate(procs) for tok, b in p.logit_bias]
    if biases:
        t.bias_rows, t.bias_ids = torch.tensor([b[:2] for b in biases], dtype=torch.int64, device=device).unbind(1)
        t.bias_values = torch.tensor([b[2] for b in biases], dtype=torch.float32, device=device)
    penalized = [n for n, p in enumerate(procs) if p.history is not None]
    if penalized:
        width = max(len(procs[n].history) + len(paths[n]) for n in penalized)
        history = torch.full((len(procs), width), -1, dtype=torch.int64)
        dst, src = [], []  # this step's tokens on each row's path, gathered from the device's input ids
        for n in penalized:
            known = procs[n].history
            history[n, :len(known)] = torch.tensor(known, dtype=torch.int64)
            first = n * width + len(known)
            dst.extend(range(first, first + len(paths[n])))
            src.extend(query_starts[seqs[n]] + j for j in paths[n])
        history = history.to(device)
        history.view(-1)[torch.tensor(dst, device=device)] = input_ids[torch.tensor(src, device=device)]
        num_prompt = torch.tensor([p.num_prompt_tokens for p in procs], dtype=torch.int64, device=device)
        t.history = history
        t.is_output = torch.arange(width, device=device).unsqueeze(0) >= num_prompt.unsqueeze(1)
        t.presence, t.frequency, t.repetition = torch.tensor(
            [[p.presence_penalty, p.frequency_penalty, p.repetition_penalty] for p in procs],
            dtype=torch.float32, device=device).unbind(1)
    return t
