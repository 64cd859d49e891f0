"""The proposer interface every drafting method implements, and the simplest one: prompt lookup (chapter 9).

    proposer.propose(seqs, num_tokens) -> drafts          list[list[int]], up to num_tokens[i] tokens for seqs[i]
    proposer.propose_with_probs(seqs, num_tokens)         (drafts, per sequence a [len(drafts), V] tensor of the
                                                          distributions they were *sampled* from, or None when the
                                                          drafts are deterministic: n-grams, greedy drafts)
    proposer.observe(seq, drafts, sampled)                after a verify step: the target's samples at every draft
                                                          row (lookahead's Jacobi iteration feeds on them)
    proposer.free(request_id)                             drop a request's state (finished, aborted, preempted)

The engine (minillm.speculative.engine_hooks) calls propose before the scheduler runs, for the running sequences
that will decode next step. A proposer may return fewer tokens than asked for, or none; the scheduler may trim them
further (token budget, free blocks, max_model_len). Drafts never change what the target samples: verification keeps
the target's distribution exactly (minillm.speculative.rejection), so a bad proposer costs speed, never quality.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from minillm.hooks import dispatch
from minillm.speculative.rejection import logits_to_probs, sample_from_probs

if TYPE_CHECKING:
    from minillm.engine.sequence import Sequence


class Proposer:
    """Base class: deterministic drafts and no per-request state."""

    method = "base"

    def propose(self, seqs: list["Sequence"], num_tokens: list[int]) -> list[list[int]]:
        raise NotImplementedError

    def propose_with_probs(self, seqs: list["Sequence"], num_tokens: list[int]
                           ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        drafts = self.propose(seqs, num_tokens)
        return drafts, [None] * len(drafts)

    def observe(self, seq: "Sequence", drafts: list[int], sampled: list[int]) -> None:
        """The target's tokens sampled at the rows of `drafts` (len(drafts) + 1 of them). Default: ignored."""

    def free(self, request_id: str) -> None:
        """Drop the state kept for a request. Default: there is none."""

    def active_requests(self) -> set[str]:
        """Request ids that hold state here (the engine frees those no longer running)."""
        return set()

    def keep_streams(self, alive: set[str]) -> None:
        """Drop the random streams of requests not in `alive` (they have left the scheduler). Default: none kept."""


class SampledDraftProposer(Proposer):
    """Base of proposers that sample the drafts of requests with temperature > 0 (and return q with them): `propose`
    keeps the drafts of propose_with_probs; a seeded request draws from its own generator, seed + seed_offset (a
    stream apart from the target's). Subclasses create `self._generators = {}`; `free` leaves it alone and
    `keep_streams` drops a request's stream once the request has left the scheduler (a preempted one keeps it)."""

    seed_offset = 0x5EED

    def propose(self, seqs: list["Sequence"], num_tokens: list[int]) -> list[list[int]]:
        return self.propose_with_probs(seqs, num_tokens)[0]

    def _generator_of(self, seq: "Sequence") -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None:
            return None
        if seq.request_id not in self._generators:
            self._generators[seq.request_id] = torch.Generator().manual_seed(seed + self.seed_offset)
        return self._generators[seq.request_id]

    def keep_streams(self, alive: set[str]) -> None:
        for request_id in set(self._generators) - alive:
            del self._generators[request_id]


def sample_drafts(logits: torch.Tensor, params: list, generators: list[torch.Generator | None],
                  default_generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts of sampled requests: q = logits [R, V] under each row's request parameters (temperature, top-k,
    top-p: the transform the target's probabilities get in verification), then x ~ q. Returns (tokens [R], q)
    on the CPU; q goes to the rejection rule with the drafts."""
    q = logits_to_probs(logits.float().cpu(), torch.tensor([p.temperature for p in params], dtype=torch.float32),
                        torch.tensor([p.top_k for p in params], dtype=torch.int64),
                        torch.tensor([p.top_p for p in params], dtype=torch.float32))
    return sample_from_probs(q, generators, default_generator), q


def check_num_tokens(seqs: list, num_tokens: list[int]) -> None:
    if len(num_tokens) != len(seqs):
        raise ValueError(f"num_tokens must give one count per sequence: {len(seqs)} sequences, "
                         f"{len(num_tokens)} counts")
    bad = [n for n in num_tokens if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad:
        raise ValueError(f"num_tokens must be integers >= 0, got {bad[0]!r}")


def known_tokens(seq: "Sequence") -> tuple[int, int]:
    """(how many of seq.token_ids the host knows, how many it does not yet): with async scheduling the token of a
    step in flight is a placeholder (< 0) at the end of token_ids (engine/async_step.py)."""
    tokens = seq.token_ids
    behind = int(tokens[-1] < 0)
    return len(tokens) - behind, behind


class NGramProposer(Proposer):
    """Prompt-lookup decoding (Saxena 2023): the tokens that followed the latest earlier occurrence of the sequence's
    last n tokens, n from prompt_lookup_max down to prompt_lookup_min. Free, strong on summaries and code edits that
    quote their input; useless on open-ended chat (then it proposes nothing and the step is a decode).

    The answer is propose_prompt_lookup's, but found through an index instead of a scan: per request and per n, a
    dict from each n-gram to where its latest occurrence ended, extended by the few n-grams each step's new tokens
    complete. A step then costs O(max_n) dict lookups instead of O(length) comparisons, which matters at batch 128
    with long prompts (the scan would cost more than the target's forward)."""

    method = "ngram"

    def __init__(self, prompt_lookup_max: int = 3, prompt_lookup_min: int = 1) -> None:
        if not (isinstance(prompt_lookup_min, int) and isinstance(prompt_lookup_max, int)
                and 1 <= prompt_lookup_min <= prompt_lookup_max):
            raise ValueError(f"need integers 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{prompt_lookup_min!r}, {prompt_lookup_max!r}")
        self.max_n, self.min_n = prompt_lookup_max, prompt_lookup_min
        # request_id -> (tokens indexed so far, {n: {n-gram: end of its latest occurrence}})
        self._index: dict[str, tuple[int, dict[int, dict[tuple[int, ...], int]]]] = {}

    def _lookup_table(self, seq: "Sequence", last: int | None = None) -> dict[int, dict[tuple[int, ...], int]]:
        """The request's index covering every n-gram that ends before token `last` (default: the last token; the
        suffix itself is not an earlier occurrence of itself). The index only grows: `last` never moves back."""
        done, table = self._index.get(seq.request_id, (0, None))
        if table is None:
            table = {n: {} for n in range(self.min_n, self.max_n + 1)}
        tokens = seq.token_ids
        last = seq.num_tokens - 1 if last is None else last
        for end in range(max(done, 1), last + 1):  # n-grams tokens[end - n: end], later ones overwrite
            for n in range(self.min_n, min(self.max_n, end) + 1):
                table[n][tuple(tokens[end - n:end])] = end
        self._index[seq.request_id] = (max(done, last + 1), table)
        return table

    def _continuation(self, seq: "Sequence", want: int, scan) -> list[int]:
        """Up to `want` known tokens that followed the latest earlier occurrence of the sequence's known suffix (the
        longest n-gram, max_n down to min_n, that has one): from the index, or from a learner's scan (exercise
        ch09.ngram_lookup), which gives the same answer."""
        length, _ = known_tokens(seq)
        if want <= 0 or length < 2:
            return []
        tokens = seq.token_ids
        if scan is not None:
            return list(scan(list(tokens[:length]), want, self.max_n, self.min_n))
        table = self._lookup_table(seq, length - 1)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = table[n].get(tuple(tokens[length - n:length]))
            if end is not None:
                return list(tokens[end:min(end + want, length)])
        return []

    def propose(self, seqs: list["Sequence"], num_tokens: list[int]) -> list[list[int]]:
        """Drafts by prompt lookup. The engine proposes with every token known; a sequence whose last token is
        still a placeholder gets the drafts after the continuation's first token (its guess for that token)."""
        check_num_tokens(seqs, num_tokens)
        scan = dispatch("ch09.ngram_lookup", None)
        drafts = []
        for seq, k in zip(seqs, num_tokens):
            behind = known_tokens(seq)[1]
            drafts.append(self._continuation(seq, k + behind, scan)[behind:] if k > 0 else [])
        return drafts

    def predicts_drafts(self, seqs: list["Sequence"]) -> bool:
        """Whether the next step of these decoding sequences will probably carry drafts (SpeculativeDecoder.
        steps_async: if not, that step runs async, as plain decoding would). Exact when every token is known: the
        lookup propose would do. With a step in flight the answer is one token behind, as propose's drafts are: the
        continuation must hold a guess for the token in flight and at least one draft after it."""
        scan = dispatch("ch09.ngram_lookup", None)
        for seq in seqs:
            behind = known_tokens(seq)[1]
            if len(self._continuation(seq, 1 + behind, scan)) > behind:
                return True
        return False

    def free(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def active_requests(self) -> set[str]:
        return set(self._index)
