"""SamplingParams: how to pick each next token and when to stop (vLLM's names and defaults).

Validated on construction: every bad value raises ValueError naming the value and the allowed range.
The sampler that honours these is minillm.layers.sampler (chapter 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax), exactly
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p; in (0, 1]
    top_k: int = -1  # keep the k most likely tokens; -1 means all
    max_tokens: int = 16  # new tokens to generate at most; >= 1
    seed: int | None = None  # per-request generator: same tokens whatever else is in the batch
    stop: list[str] | str | None = None  # stop strings (not included in the output text)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    priority: int = 0  # lower runs first under priority scheduling
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop_list = stops
        ids = self.stop_token_ids or []
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
