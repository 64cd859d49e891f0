"""Acceptance metrics of speculative decoding, per request and for the whole engine (chapter on speculative decoding).

Three numbers tell whether a proposer pays off (vLLM reports the same ones):
    acceptance_rate          accepted drafts / proposed drafts
    mean_acceptance_length   tokens emitted per verify step: 1 + accepted / steps (1.0 = speculation bought nothing,
                             k + 1 = every draft accepted); the wall-clock speedup is at most this
    acceptance by position   of the steps that proposed a draft at position i, the fraction that accepted it (it
                             falls with i: draft i counts only if drafts 0..i-1 were accepted too)

A verify step is a step in which the sequence carried at least one draft; steps without drafts are plain decodes
and are counted apart (`num_plain_steps`), so a proposer that rarely finds anything shows a low coverage rather
than a misleading acceptance rate.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeMetrics:
    num_verify_steps: int = 0  # steps in which drafts were scored
    num_plain_steps: int = 0  # decode steps without drafts (nothing proposed, or speculation switched off)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    drafted_at: list[int] = field(default_factory=list)  # drafted_at[i]: verify steps that had a draft at position i
    accepted_at: list[int] = field(default_factory=list)  # accepted_at[i]: of those, how many accepted it

    def record(self, num_drafts: int, num_accepted: int) -> None:
        """One decode step of one sequence: it carried num_drafts drafts and kept the first num_accepted."""
        if not 0 <= num_accepted <= num_drafts:
            raise ValueError(f"num_accepted must be in [0, num_drafts={num_drafts}], got {num_accepted}")
        if num_drafts == 0:
            self.num_plain_steps += 1
            return
        self.num_verify_steps += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for counts, n in ((self.drafted_at, num_drafts), (self.accepted_at, num_accepted)):
            counts.extend([0] * max(0, num_drafts - len(counts)))
            for i in range(n):
                counts[i] += 1

    def merge(self, other: "SpecDecodeMetrics") -> None:
        """Add another request's counts to these (the engine-level totals)."""
        self.num_verify_steps += other.num_verify_steps
        self.num_plain_steps += other.num_plain_steps
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        for mine, theirs in ((self.drafted_at, other.drafted_at), (self.accepted_at, other.accepted_at)):
            mine.extend([0] * max(0, len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += n

    @property
    def acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def mean_accepted_tokens(self) -> float | None:
        """Accepted drafts per verify step (0..k)."""
        return self.num_accepted_tokens / self.num_verify_steps if self.num_verify_steps else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """Tokens emitted per verify step, the bonus/resampled token included (1..k+1)."""
        mean = self.mean_accepted_tokens
        return None if mean is None else 1.0 + mean

    @property
    def acceptance_by_position(self) -> list[float]:
        """Per draft position i: accepted_at[i] / drafted_at[i]."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def copy(self) -> "SpecDecodeMetrics":
        """A snapshot (RequestOutputs are snapshots; the counts go on changing)."""
        return SpecDecodeMetrics(self.num_verify_steps, self.num_plain_steps, self.num_draft_tokens,
                                 self.num_accepted_tokens, list(self.drafted_at), list(self.accepted_at))

    def as_dict(self) -> dict:
        return {"num_verify_steps": self.num_verify_steps, "num_plain_steps": self.num_plain_steps,
                "num_draft_tokens": self.num_draft_tokens, "num_accepted_tokens": self.num_accepted_tokens,
                "acceptance_rate": self.acceptance_rate, "mean_acceptance_length": self.mean_acceptance_length,
                "acceptance_by_position": self.acceptance_by_position}
