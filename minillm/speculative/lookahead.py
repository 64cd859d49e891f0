"""Lookahead decoding as a proposer: a Jacobi window refreshed by the target's own outputs, and an n-gram pool
(Fu, Bailis, Stoica and Zhang 2024, "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding").

The paper's step runs two branches in one forward: a *lookahead* branch that performs one Jacobi iteration on a
2-D window of guesses (W positions x N-1 levels, with a special attention mask), and a *verification* branch that
checks the pool's n-grams starting with the last token. We keep the idea and drop the second branch:

    Jacobi iteration = our verify step. The drafts are a window of guesses w_1..w_k for the next k positions.
    The target scores them all in one forward, and its sample at draft row j, y_{j+1}, is its next token given the
    prefix and w_1..w_j: exactly one Jacobi update of the window. So every verify step *is* a Jacobi iteration, and
    the outputs past the accepted prefix are the refreshed window for the next step (they are guesses for the
    positions after the new last token).
    The pool. Consecutive iterations align by absolute position: the level-t guess at position p+1 was computed with
    the level-(t-1) guess at p as its input, so the diagonals (y_{t-N+1}(p), ..., y_t(p+N-1)) are n-grams the
    model itself produced (NGramPool.add_trajectory's layout). The pool also holds every n-gram of the text so far
    (prompt + accepted output), which makes it a prompt-lookup table as well.
    Proposal. A pool continuation of the last token when there is one (the most recent), then the Jacobi window.

Simplifications, said plainly: one candidate chain per step instead of G candidates verified as a tree; no separate
lookahead branch, so the window advances only when the verify step runs, and a diagonal n-gram is exact only when
the previous drafts were the window (a pool draft breaks the alignment; the n-gram is then a plausible guess that
verification filters like any other). Drafts are deterministic, so verification is lossless at any temperature.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from minillm.speculative.ngram import NGramPool
from minillm.speculative.proposer import Proposer, check_num_tokens

if TYPE_CHECKING:
    from minillm.engine.sequence import Sequence


@dataclass
class _LookaheadState:
    pool: NGramPool
    num_seen: int = 0  # tokens of the sequence whose n-grams are in the pool already
    window: list[int] = field(default_factory=list)  # guesses for the positions after the last token
    window_start: int = 0  # absolute position of window[0]
    levels: deque = field(default_factory=deque)  # the last N Jacobi levels: {absolute position: guess}


class LookaheadProposer(Proposer):
    method = "lookahead"

    def __init__(self, ngram: int = 3, max_per_key: int = 8) -> None:
        if isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 2:
            raise ValueError(f"lookahead ngram (N) must be an integer >= 2, got {ngram!r}")
        self.n, self.max_per_key = ngram, max_per_key
        self._states: dict[str, _LookaheadState] = {}

    def _state(self, seq: "Sequence") -> _LookaheadState:
        state = self._states.get(seq.request_id)
        if state is None:
            state = self._states[seq.request_id] = _LookaheadState(NGramPool(self.n, self.max_per_key))
        if seq.num_tokens > state.num_seen:  # the text's n-grams (prompt lookup through the pool)
            start = max(0, state.num_seen - self.n + 1)
            state.pool.add_sequence(seq.token_ids[start:])
            state.num_seen = seq.num_tokens
        return state

    def propose(self, seqs: list["Sequence"], num_tokens: list[int]) -> list[list[int]]:
        check_num_tokens(seqs, num_tokens)
        drafts = []
        for seq, k in zip(seqs, num_tokens):
            if k == 0:
                drafts.append([])
                continue
            state = self._state(seq)
            draft: list[int] = []
            candidates = state.pool.lookup(seq.last_token_id, 1)
            if candidates:
                draft = list(candidates[0][:k])
            # then the Jacobi window, from the first position the pool candidate did not cover
            offset = seq.num_tokens + len(draft) - state.window_start
            if 0 <= offset:
                draft += state.window[offset:offset + k - len(draft)]
            while len(draft) < k:  # extend through the pool: each guess's most recent continuation
                more = state.pool.lookup(draft[-1] if draft else seq.last_token_id, 1)
                if not more:
                    break
                draft += list(more[0][:k - len(draft)])
            drafts.append(draft)
        return drafts

    def observe(self, seq: "Sequence", drafts: list[int], sampled: list[int]) -> None:
        """One Jacobi iteration happened: sampled[j] is the target's guess for position num_tokens + j."""
        if len(sampled) != len(drafts) + 1:
            raise ValueError(f"observe needs len(drafts) + 1 samples, got {len(sampled)} for {len(drafts)} drafts")
        state = self._states.get(seq.request_id)
        if state is None or not drafts:
            return
        start = seq.num_tokens  # seq has not been updated yet: sampled[0] guesses position num_tokens
        level = {start + j: token for j, token in enumerate(sampled)}
        state.levels.append(level)
        while len(state.levels) > self.n:
            state.levels.popleft()
        if len(state.levels) == self.n:  # diagonals: level t-N+1+i at position p+i
            oldest = state.levels[0]
            for p in oldest:
                ngram = [state.levels[i].get(p + i) for i in range(self.n)]
                if None not in ngram:
                    state.pool.add(ngram)
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == sampled[accepted]:
            accepted += 1
        # the refreshed window: the guesses past the token this step emits (sampled[accepted])
        state.window = list(sampled[accepted + 1:])
        state.window_start = start + accepted + 1

    def free(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def active_requests(self) -> set[str]:
        return set(self._states)
