"""What the engine hands back for each request: RequestOutput, CompletionOutput and RequestMetrics.

The names and fields follow vLLM, so code written against `vllm.LLM.generate` reads the same here.
A RequestOutput is *cumulative* (all text so far); `LLM.generate_stream` turns consecutive ones into deltas.
The timestamps in RequestMetrics are what chapter 2 plots: time to first token (TTFT), time per output token
(TPOT) and end-to-end latency, the three numbers every serving benchmark reports.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minillm.engine.sequence import Sequence
    from minillm.speculative.metrics import SpecDecodeMetrics


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.perf_counter seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_output_tokens: int = 0
    num_preemptions: int = 0
    # speculative decoding (chapter 8): acceptance rate, mean acceptance length, acceptance by position;
    # None when the engine does not speculate
    spec_decode: "SpecDecodeMetrics | None" = None

    @property
    def ttft(self) -> float | None:
        """Time to first token: queueing + prefill + the first sample."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: the decode speed a user sees once text starts flowing."""
        if self.first_token_time is None or self.finish_time is None or self.num_output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def latency(self) -> float | None:
        """End-to-end time from arrival to the last token."""
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time


@dataclass
class CompletionOutput:
    """One generated continuation (minillm produces one per request: `n` is always 1)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    error: str | None = None  # the message when finish_reason == "error"
    logprobs: None = None  # not computed (vLLM's field, kept so code that reads it does not break)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=0.0))

    @property
    def text(self) -> str:
        """Shortcut for outputs[0].text."""
        return self.outputs[0].text

    @classmethod
    def from_sequence(cls, seq: "Sequence", text: str | None = None) -> "RequestOutput":
        """Snapshot a sequence; `text` overrides seq.output_text (the engine holds back a possible stop string)."""
        completion = CompletionOutput(
            index=0,
            text=seq.output_text if text is None else text,
            token_ids=list(seq.output_token_ids),
            finish_reason=seq.finish_reason,
            error=seq.error,
        )
        metrics = RequestMetrics(
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
            finish_time=seq.finish_time,
            num_output_tokens=seq.num_output_tokens,
            num_preemptions=seq.num_preemptions,
        )
        spec = getattr(seq, "spec_metrics", None)  # set by minillm.speculative.engine_hooks
        if spec is not None:
            metrics.spec_decode = spec.copy()
        return cls(request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=list(seq.prompt_token_ids),
                   outputs=[completion], finished=seq.is_finished, metrics=metrics)
