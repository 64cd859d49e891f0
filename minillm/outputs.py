"""What the engine hands back for each request: RequestOutput, CompletionOutput and RequestMetrics.

The names and fields follow vLLM, so code written against `vllm.LLM.generate` reads the same here.
A RequestOutput is *cumulative* (all text so far); `LLM.generate_stream` turns consecutive ones into deltas.
The timestamps in RequestMetrics are what chapter 2 plots: time to first token (TTFT), time per output token
(TPOT) and end-to-end latency, the three numbers every serving benchmark reports.
Log-probabilities (when SamplingParams.logprobs / prompt_logprobs ask for them) come as vLLM shapes them: per token
a dict {token_id: Logprob(logprob, rank, decoded_token)} holding the actual token and the top-k alternatives.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from minillm.engine.sequence import Sequence
    from minillm.speculative.metrics import SpecDecodeMetrics


@dataclass
class Logprob:
    """One token's log-probability under the model (raw logits, temperature 1), its 1-based rank in that
    distribution, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# per token: {token_id: Logprob} for the actual token first, then the top-k in decreasing order
TokenLogprobDict = dict[int, Logprob]


def logprob_dict(token_id: int, logprob: float, rank: int, top_ids: list[int], top_logprobs: list[float],
                 decode: Callable[[int], str | None]) -> TokenLogprobDict:
    """vLLM's per-token dict. The actual token keeps its own rank; when it is also one of the top-k, it appears
    once."""
    entries = {token_id: Logprob(logprob, rank, decode(token_id))}
    for top_rank, (top_id, top_lp) in enumerate(zip(top_ids, top_logprobs), start=1):
        if top_id not in entries:
            entries[top_id] = Logprob(top_lp, top_rank, decode(top_id))
    return entries


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.perf_counter seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_output_tokens: int = 0
    num_preemptions: int = 0
    # speculative decoding (chapter 9): acceptance rate, mean acceptance length, acceptance by position;
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
    """One generated continuation: RequestOutput.outputs holds SamplingParams.n of them, `index` 0..n-1 (each an
    engine request of its own: LLM.generate and the server run params.choices() and gather them)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"; None while running
    error: str | None = None  # the message when finish_reason == "error"
    # one dict per token of token_ids when SamplingParams.logprobs was set, else None
    logprobs: list[TokenLogprobDict] | None = None
    cumulative_logprob: float | None = None  # sum of the tokens' log-probabilities (with logprobs only)
    # vLLM's stop_reason, for finish_reason "stop": the stop string matched (not in `text`) or the stop_token_ids
    # entry sampled (the last of token_ids); None when EOS ended it, or while running, or for another finish
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """LLM.embed's result for one prompt (vLLM's): outputs.embedding is its vector (minillm/pooling.py)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True

    @classmethod
    def from_request_output(cls, out: "RequestOutput") -> "EmbeddingRequestOutput":
        if out.embedding is None:
            error = out.outputs[0].error if out.outputs else None
            raise RuntimeError(f"request {out.request_id} ended without an embedding"
                               + (f": {error}" if error else f" ({out.outputs[0].finish_reason})"))
        return cls(out.request_id, out.prompt, out.prompt_token_ids, EmbeddingOutput(out.embedding))


@dataclass
class ScoringOutput:
    score: float


@dataclass
class ScoringRequestOutput:
    """LLM.score's result for one pair (vLLM's): outputs.score, the cosine similarity of the two embeddings."""
    request_id: str
    prompt_token_ids: list[int]  # the second text's (the one scored against the first)
    outputs: ScoringOutput
    finished: bool = True


@dataclass
class ClassificationOutput:
    """One prompt's class probabilities (vLLM's `probs`: softmax over the labels, the sigmoid of the one logit of a
    reward model). minillm's additions: the raw `logits` (a reward model's reward, unsquashed) and the `label`
    name of the likeliest class."""
    probs: list[float]
    logits: list[float]
    label: str

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ClassificationRequestOutput:
    """LLM.classify's result for one prompt (vLLM's): outputs.probs, from the model's score head
    (minillm/classification.py)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: ClassificationOutput
    finished: bool = True


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=0.0))
    # with SamplingParams.prompt_logprobs: [None] (nothing predicts the first token), then per prompt position
    # p >= 1 the dict for prompt token p given the tokens before it
    prompt_logprobs: list[TokenLogprobDict | None] | None = None
    embedding: list[float] | None = None  # an embedding request's vector (pooling_params), once its prefill ran
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache, not computed (vLLM's field)

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
            stop_reason=seq.stop_reason if seq.finish_reason == "stop" else None,
        )
        logprobs = seq.logprobs  # kept by the engine when the request asked for them
        if logprobs is not None:
            completion.logprobs = list(logprobs)
            completion.cumulative_logprob = seq.cumulative_logprob
        metrics = RequestMetrics(
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
            finish_time=seq.finish_time,
            num_output_tokens=seq.num_output_tokens,
            num_preemptions=seq.num_preemptions,
        )
        spec = seq.spec_metrics  # set by minillm.speculative.engine_hooks
        if spec is not None:
            metrics.spec_decode = spec.copy()
        # an embeddings prompt has no token ids (its sequence's are placeholders): [] as for no prompt
        prompt_ids = [] if getattr(seq, "prompt_embeds", None) is not None else list(seq.prompt_token_ids)
        return cls(request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=prompt_ids,
                   outputs=[completion], finished=seq.is_finished, metrics=metrics,
                   prompt_logprobs=None if seq.prompt_logprobs is None
                   else list(seq.prompt_logprobs), embedding=seq.embedding,
                   num_cached_tokens=seq.num_cached_tokens)
