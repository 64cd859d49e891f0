"""Draft tokens without a draft model: n-grams from the sequence itself (chapter on speculative decoding).

A draft model costs memory and a forward pass per proposed token. Often the continuation is already written down:
a summary quotes its document, code repeats identifiers, a chat answer restates the question. Two cheap proposers
exploit that; both produce *deterministic* drafts (q is one-hot), which the rejection sampler verifies with
draft_probs=None (minillm.speculative.rejection), so the output distribution is still exactly the target's.

Prompt-lookup decoding (Saxena 2023, "Prompt Lookup Decoding"). Take the last n tokens of the sequence, find their
most recent earlier occurrence in the prompt-plus-output, and propose the k tokens that followed it. Try the longest
pattern first (n = max_n down to min_n): a longer match is stronger evidence that the continuation repeats. No
match, no proposal; the step then decodes one token as usual.

Lookahead decoding (Fu, Bailis, Stoica and Zhang 2024, "Break the Sequential Dependency of LLM Inference Using
Lookahead Decoding"). The model runs Jacobi iterations on a window of guessed future tokens alongside the real
decode; each iteration refines every guess given the previous iteration's guesses before it. A guess at step t,
position i+1, was produced as the continuation of the guess at step t-1, position i; following such a chain for
N-1 steps gives an n-gram the model itself found plausible. Those n-grams go into a pool keyed by their first token;
at each step, the pool's entries that start with the sequence's last token are candidate continuations, verified
in parallel (several candidates sharing prefixes form a token tree: minillm.speculative.tree).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch


def _as_tensor(token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    t = token_ids if isinstance(token_ids, torch.Tensor) else torch.tensor(list(token_ids), dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(f"token_ids must be one sequence (1-D), got shape {tuple(t.shape)}")
    return t.long().cpu()


# >>> exercise ch09.ngram_lookup
def propose_prompt_lookup(token_ids: list[int] | torch.Tensor, num_speculative_tokens: int, max_n: int = 3,
                          min_n: int = 1) -> list[int]:
    """Prompt-lookup drafts for one sequence: up to `num_speculative_tokens` tokens that followed the most recent
    earlier occurrence of the sequence's last n tokens, n tried from max_n down to min_n (never more than
    len - 1: the pattern needs an earlier occurrence). [] when nothing matches. Returns a list of Python ints,
    also when token_ids is a 1-D tensor.

    "Earlier" means the occurrence may not be the suffix itself (its window starts before len - n), but it may
    overlap the suffix: a repeated pattern proposes its own repetition. The proposal is shorter than requested
    when the match sits near the end of the sequence.

    Example: [1, 2, 3, 4, 1, 2], k = 3 -> the suffix (1, 2) occurred at 0..1 -> [3, 4, 1];
             [7, 7, 7, 7], k = 2, max_n 3 -> (7, 7, 7) occurred at 0..2, overlapping it -> [7]; [5], or no
             repeat -> [].
    Raise ValueError if num_speculative_tokens < 1 or not 1 <= min_n <= max_n (integers), or token_ids is not 1-D.
    """
    # >>> solution
    if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int) \
            or num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {num_speculative_tokens!r}")
    if not (isinstance(min_n, int) and isinstance(max_n, int) and 1 <= min_n <= max_n):
        raise ValueError(f"need integers 1 <= min_n <= max_n, got min_n={min_n!r}, max_n={max_n!r}")
    tokens = torch.as_tensor(token_ids if isinstance(token_ids, torch.Tensor) else list(token_ids),
                             dtype=torch.int64).cpu()
    if tokens.dim() != 1:
        raise ValueError(f"token_ids must be one sequence (1-D), got shape {tuple(tokens.shape)}")
    length = tokens.shape[0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # windows[j] = tokens[j : j+n]; the last window (j = length - n) is the pattern itself, excluded
        windows = tokens[: length - 1].unfold(0, n, 1)
        hits = (windows == tokens[length - n:]).all(dim=1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1]) + n  # most recent occurrence
            return tokens[start: start + num_speculative_tokens].tolist()
    return []
    # <<< solution
# <<< exercise


def propose_prompt_lookup_batch(token_ids: Sequence[Sequence[int] | torch.Tensor], num_speculative_tokens: int,
                                max_n: int = 3, min_n: int = 1) -> list[list[int]]:
    """propose_prompt_lookup for each sequence of a batch (their lengths differ, so one at a time)."""
    return [propose_prompt_lookup(t, num_speculative_tokens, max_n, min_n) for t in token_ids]


class NGramPool:
    """Lookahead decoding's n-gram pool: n-grams keyed by their first token, the (n-1) tokens after it stored.

    Each key keeps at most `max_per_key` distinct continuations, the most recently added first (adding one already
    present refreshes it); the oldest is evicted. Lookahead's paper caps the candidates verified per step (G) at
    the window size W, which is what max_per_key bounds here.
    """

    def __init__(self, n: int, max_per_key: int = 8) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n (the n-gram size) must be an integer >= 2, got {n!r}")
        if isinstance(max_per_key, bool) or not isinstance(max_per_key, int) or max_per_key < 1:
            raise ValueError(f"max_per_key must be an integer >= 1, got {max_per_key!r}")
        self.n = n
        self.max_per_key = max_per_key
        self._pool: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._pool.values())

    def add(self, ngram: Sequence[int]) -> None:
        """Insert one n-gram (a sequence of exactly n token ids)."""
        ngram = tuple(int(t) for t in ngram)
        if len(ngram) != self.n:
            raise ValueError(f"an n-gram of this pool has {self.n} tokens, got {len(ngram)}: {ngram}")
        entries = self._pool.setdefault(ngram[0], OrderedDict())
        entries[ngram[1:]] = None
        entries.move_to_end(ngram[1:], last=False)  # most recent first
        while len(entries) > self.max_per_key:
            entries.popitem(last=True)

    def add_window(self, window: torch.Tensor) -> None:
        """Collect the n-grams of a lookahead window [n, W] whose column i, read top to bottom, is one Jacobi
        trajectory: window[j, i] was generated as the continuation of window[j-1, i] (the layout in which lookahead
        keeps its levels, each shifted one position against the one before)."""
        if not isinstance(window, torch.Tensor) or window.dim() != 2 or window.shape[0] != self.n:
            raise ValueError(f"window must be a tensor [{self.n}, W], got {getattr(window, 'shape', window)!r}")
        for column in window.t().tolist():
            self.add(column)

    def add_trajectory(self, levels: Sequence[Sequence[int]]) -> None:
        """Collect n-grams from raw Jacobi iterations: levels[t][i] is the guess for window position i after
        iteration t (all levels the same width, the last n of them used). The guess at (t, i+1) continues the one
        at (t-1, i), so the n-grams run along diagonals: (levels[0][i], levels[1][i+1], ..., levels[n-1][i+n-1])."""
        rows = [list(level) for level in levels][-self.n:]
        if len(rows) < self.n or len({len(r) for r in rows}) != 1:
            raise ValueError(f"need at least {self.n} levels of equal width, got widths {[len(r) for r in levels]}")
        width = len(rows[0])
        for i in range(width - self.n + 1):
            self.add([rows[j][i + j] for j in range(self.n)])

    def add_sequence(self, token_ids: Sequence[int] | torch.Tensor) -> None:
        """Seed the pool with every n-gram of a sequence (the prompt): lookahead's pool then also does prompt lookup."""
        tokens = _as_tensor(token_ids)
        if tokens.shape[0] >= self.n:
            for ngram in tokens.unfold(0, self.n, 1).tolist():
                self.add(ngram)

    def lookup(self, last_token: int, max_candidates: int | None = None) -> list[tuple[int, ...]]:
        """Candidate continuations ((n-1) tokens each) of `last_token`, most recent first."""
        if max_candidates is not None and (not isinstance(max_candidates, int) or max_candidates < 1):
            raise ValueError(f"max_candidates must be None or an integer >= 1, got {max_candidates!r}")
        found = list(self._pool.get(int(last_token), ()))
        return found if max_candidates is None else found[:max_candidates]

    def lookup_tensor(self, last_token: int, max_candidates: int | None = None) -> torch.Tensor:
        """lookup() as an int64 tensor [G, n-1] (G may be 0), ready for the verification branch."""
        found = self.lookup(last_token, max_candidates)
        return torch.tensor(found, dtype=torch.int64).reshape(len(found), self.n - 1)
