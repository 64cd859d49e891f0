"""Benchmark harness: run a workload through an LLM and turn its timestamps into serving metrics (chapter 1).

The four numbers every serving paper reports, computed from each RequestOutput's `metrics` timestamps
(arrival_time, first_token_time, finish_time; all from time.perf_counter):

* TTFT, time to first token = first_token_time - arrival_time. Queueing plus the prefill: what a chat user waits
  before the first word appears. Compute-bound (the prompt's tokens go through the weights together).
* TPOT, time per output token = (finish_time - first_token_time) / (num_output_tokens - 1): the average gap between
  later tokens, i.e. one decode step. Memory-bound at small batch (every step re-reads all the weights).
  Undefined for a request with a single output token.
* latency = finish_time - arrival_time = TTFT + TPOT x (n - 1).
* throughput = output tokens of all requests / wall time of the whole run (tokens per second): what batching buys.

Percentiles (p50, p90, p99) use linear interpolation between order statistics, as numpy's default does.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence


@dataclass(frozen=True)
class RequestStats:
    """One request's metrics in seconds. `tpot` is None when the request produced fewer than two tokens."""

    request_id: str
    num_prompt_tokens: int
    num_output_tokens: int
    ttft: float
    tpot: float | None
    latency: float
    queue_time: float | None = None  # first_scheduled_time - arrival_time, when the engine records it
    index: int | None = None  # its place in the workload (the prompt list's order); engine ids count warm-ups too


@dataclass
class BenchResult:
    requests: list[RequestStats]
    wall_time: float  # seconds from the first arrival to the last finish (or as measured around generate)
    percentiles: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {"mean", "p50", ...}
    failed: list[str] = field(default_factory=list)  # request ids that ended in an error (left out of the stats)

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    @property
    def total_prompt_tokens(self) -> int:
        return sum(r.num_prompt_tokens for r in self.requests)

    @property
    def total_output_tokens(self) -> int:
        return sum(r.num_output_tokens for r in self.requests)

    @property
    def output_throughput(self) -> float:
        """Generated tokens per second over the whole run."""
        return self.total_output_tokens / self.wall_time

    @property
    def total_throughput(self) -> float:
        """Prompt + generated tokens per second (prefill work counted too)."""
        return (self.total_prompt_tokens + self.total_output_tokens) / self.wall_time

    @property
    def request_throughput(self) -> float:
        return self.num_requests / self.wall_time


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation: rank = q/100 x (n - 1)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
    if len(values) == 0:
        raise ValueError("percentile of an empty list is undefined; need at least one value")
    xs = sorted(values)
    rank = q / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def request_stats(output: Any, num_output_tokens: int | None = None) -> RequestStats:
    """Metrics of one RequestOutput (or any object with the same fields: request_id, prompt_token_ids,
    outputs[0].token_ids, metrics.arrival_time / first_token_time / finish_time). `num_output_tokens` is for a
    streamed request, whose last delta holds only its newest tokens."""
    m = output.metrics
    arrival, first, finish = _get(m, "arrival_time"), _get(m, "first_token_time"), _get(m, "finish_time")
    if arrival is None or first is None or finish is None:
        raise ValueError(f"request {output.request_id!r} has incomplete metrics (arrival={arrival}, "
                         f"first_token={first}, finish={finish}); was it finished?")
    if not arrival <= first <= finish:
        raise ValueError(f"request {output.request_id!r}: timestamps out of order: arrival {arrival} <= "
                         f"first_token {first} <= finish {finish} must hold")
    n_out = len(output.outputs[0].token_ids) if num_output_tokens is None else num_output_tokens
    scheduled = _get(m, "first_scheduled_time")
    return RequestStats(
        request_id=str(output.request_id), num_prompt_tokens=len(output.prompt_token_ids or []),
        num_output_tokens=n_out, ttft=first - arrival,
        tpot=(finish - first) / (n_out - 1) if n_out > 1 else None, latency=finish - arrival,
        queue_time=None if scheduled is None else scheduled - arrival)


def summarize(outputs: Iterable[Any], wall_time: float | None = None,
              quantiles: tuple[float, ...] = (50, 90, 99)) -> BenchResult:
    """Per-request metrics plus mean and percentiles of TTFT, TPOT and latency. Without `wall_time` the run is
    taken to span the first arrival to the last finish. Requests that ended in an error (the engine isolates
    them) are listed in `failed` and left out of the statistics."""
    outputs = list(outputs)
    ok = [o.outputs[0].finish_reason != "error" and _get(o.metrics, "first_token_time") is not None
          for o in outputs]
    failed = [str(o.request_id) for o, good in zip(outputs, ok) if not good]
    reqs = [replace(request_stats(o), index=i) for i, (o, good) in enumerate(zip(outputs, ok)) if good]
    outputs = [o for o, good in zip(outputs, ok) if good]
    if not outputs:
        raise ValueError(f"summarize needs at least one finished request, got none ({len(failed)} failed)")
    if wall_time is None:
        wall_time = max(_get(o.metrics, "finish_time") for o in outputs) - min(
            _get(o.metrics, "arrival_time") for o in outputs)
    if wall_time <= 0:
        raise ValueError(f"wall_time must be > 0 seconds, got {wall_time!r}")
    pct: dict[str, dict[str, float]] = {}
    for name in ("ttft", "tpot", "latency"):
        vals = [getattr(r, name) for r in reqs if getattr(r, name) is not None]
        if vals:
            pct[name] = {"mean": sum(vals) / len(vals), **{f"p{q:g}": percentile(vals, q) for q in quantiles}}
    return BenchResult(reqs, wall_time, pct, failed)


def warm_up(llm: Any) -> float:
    """Run the engine through the step shapes a timed run meets, untimed, and return the seconds it took.

    The first step of each shape pays one-time costs that no later step pays: on the CPU, cpu_matmul times its
    candidate layouts once per weight shape and row class (one row, 2-16 rows, 17 or more: a prefill), and oneDNN
    builds its primitives; on a GPU, Triton compiles on first launch (LLM() captures the CUDA graphs already). A
    benchmark that bills them to its first request reports a TTFT of warm-up, not of the engine. So: one prompt
    of 24 tokens alone (a prefill, then one-row decode steps), then two at once (2-row decode steps); shorter
    where max_model_len is (a prompt and its two tokens must fit)."""
    from minillm import SamplingParams

    start = time.perf_counter()
    length = max(1, min(24, llm.llm_engine.max_model_len - 2))
    prompt = [llm.tokenizer.encode("warm up", add_special_tokens=False)[0]] * length
    params = SamplingParams(temperature=0, max_tokens=max(1, min(2, llm.llm_engine.max_model_len - length)),
                            ignore_eos=True)
    for batch in (1, 2):
        llm.generate([prompt] * batch, params)
    return time.perf_counter() - start


def run_workload(llm: Any, prompts: list, sampling_params: Any, chat: bool = False) -> tuple[list, BenchResult]:
    """Send every prompt at once (an offline batch), time the whole call, and summarise. `chat=True` passes
    the prompts to llm.chat (each a list of {"role", "content"} messages) so the chat template is applied."""
    start = time.perf_counter()
    outputs = llm.chat(prompts, sampling_params) if chat else llm.generate(prompts, sampling_params)
    wall = time.perf_counter() - start
    return outputs, summarize(outputs, wall_time=wall)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def format_requests(result: BenchResult) -> str:
    """One line per request (numbered in the workload's order, as the prompts are), then the totals."""
    head = f"{'request':<10}{'prompt':>8}{'output':>8}{'TTFT ms':>10}{'TPOT ms':>10}{'latency ms':>12}"
    lines = [head, "-" * len(head)]
    for r in result.requests:
        label = r.request_id[:10] if r.index is None else str(r.index)
        lines.append(f"{label:<10}{r.num_prompt_tokens:>8}{r.num_output_tokens:>8}"
                     f"{_ms(r.ttft):>10}{_ms(r.tpot):>10}{_ms(r.latency):>12}")
    lines.append("-" * len(head))
    lines.append(f"{result.num_requests} requests, {result.total_prompt_tokens} prompt + "
                 f"{result.total_output_tokens} output tokens in {result.wall_time:.2f} s"
                 + (f" ({len(result.failed)} failed: {', '.join(result.failed)})" if result.failed else ""))
    lines.append(f"throughput: {result.output_throughput:.1f} output tok/s, {result.total_throughput:.1f} total tok/s, "
                 f"{result.request_throughput:.2f} req/s")
    return "\n".join(lines)


def format_percentiles(result: BenchResult) -> str:
    """mean / p50 / p90 / p99 of TTFT, TPOT and latency, in milliseconds."""
    cols = list(next(iter(result.percentiles.values()), {}).keys())
    head = f"{'metric':<10}" + "".join(f"{c + ' ms':>11}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, vals in result.percentiles.items():
        lines.append(f"{name.upper():<10}" + "".join(f"{_ms(vals[c]):>11}" for c in cols))
    return "\n".join(lines)


def to_dict(result: BenchResult) -> dict:
    """A JSON-ready summary (seconds), for benchmarks/RESULTS.md's raw files."""
    return {"num_requests": result.num_requests, "wall_time_s": result.wall_time,
            "total_prompt_tokens": result.total_prompt_tokens, "total_output_tokens": result.total_output_tokens,
            "output_throughput_tok_s": result.output_throughput, "total_throughput_tok_s": result.total_throughput,
            "request_throughput_req_s": result.request_throughput, "percentiles_s": result.percentiles,
            "failed": result.failed,
            "requests": [r.__dict__ for r in result.requests]}
