"""`minillm bench serve`: load a running server with real prompts and measure what its users feel (chapter 10).

vLLM's benchmark_serving idea, small: prompts from a real text (the standard library's docstrings, the same
offline corpus quantization calibrates on), sent to /v1/completions as streams at a request rate:

    poisson   gaps drawn from an exponential with mean 1/rate: independent users arriving at `rate` per second
    burst     every request at t = 0 (rate "inf"): the server's best throughput, and its worst queueing

For each request the client records when each streamed chunk arrived, and from those:

    TTFT  time to first token: queueing + prefill, what a chat user waits before text appears
    ITL   inter-token latency: the gap between consecutive chunks (every one of them, all requests pooled)
    TPOT  time per output token after the first, per request: (E2E - TTFT) / (output tokens - 1)
    E2E   arrival to the last token

reported as mean, median, p90 and p99, with request and token throughput and the *goodput*: requests per second
that met the service-level objective (TTFT <= slo_ttft_ms and TPOT <= slo_tpot_ms), the number that says
how much load a server carries before its users notice. `sweep` runs several rates; `plot_latency_vs_rate`
draws the curve a learner reads: flat while the server keeps up, then TTFT climbing as requests queue.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import httpx
import numpy as np

ARRIVALS = ("poisson", "burst")
MAX_SCHEDULE_S = 86_400  # seconds: the longest a rate's arrivals may take on average (num_requests / rate)


def docstring_prompts(num_prompts: int, max_chars: int = 400, seed: int = 0) -> list[str]:
    """`num_prompts` prompts cut from standard-library docstrings at a word boundary, at most max_chars each,
    in a seeded random order (repeated if the corpus runs short)."""
    if num_prompts < 1 or max_chars < 8:
        raise ValueError(f"need num_prompts >= 1 and max_chars >= 8, got {num_prompts} and {max_chars}")
    from minillm.quant.calibration import stdlib_docstrings
    docs = stdlib_docstrings()
    random.Random(seed).shuffle(docs)
    prompts = []
    for doc in docs:
        text = " ".join(doc.split())
        if len(text) > max_chars:
            text = text[:max_chars].rsplit(" ", 1)[0]
        prompts.append(text)
    return [prompts[i % len(prompts)] for i in range(num_prompts)]


def check_rate(num_requests: int, request_rate: float, arrival: str = "poisson", name: str = "request_rate") -> None:
    """ValueError unless `request_rate` (requests/s; inf: a burst) can send `num_requests` with `arrival` within
    MAX_SCHEDULE_S: poisson arrivals take num_requests / request_rate seconds on average, and a rate of 1e-300 put
    the first request 7e299 s ahead (the run slept forever). `name` is the rate's name in the message."""
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival={arrival!r}; allowed: {', '.join(ARRIVALS)}")
    if not request_rate > 0:
        raise ValueError(f"{name} must be > 0 requests/s (inf for a burst), got {request_rate}")
    if arrival == "poisson" and num_requests / request_rate > MAX_SCHEDULE_S:
        raise ValueError(f"{name} {request_rate!r} sends {num_requests} requests over about "
                         f"{num_requests / request_rate:.3g} s; the schedule may last at most {MAX_SCHEDULE_S:,} s "
                         f"(a day): give a rate >= {num_requests / MAX_SCHEDULE_S:.3g} requests/s (inf for a burst)")


def arrival_times(num_requests: int, request_rate: float, arrival: str = "poisson", seed: int = 0) -> list[float]:
    """Seconds after the start at which each request is sent (see check_rate for what is refused)."""
    check_rate(num_requests, request_rate, arrival)
    if arrival == "burst" or math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1.0 / request_rate, size=num_requests)).tolist()


@dataclass
class RequestRecord:
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class ServeBenchResult:
    request_rate: float
    arrival: str
    num_requests: int
    completed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # prompt + output tokens / s
    goodput: float  # requests / s within the SLO
    slo_ttft_ms: float
    slo_tpot_ms: float
    latency_ms: dict[str, dict[str, float]]  # metric -> {mean, median, p90, p99}
    errors: list[str] = field(default_factory=list)


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {k: float("nan") for k in ("mean", "median", "p90", "p99")}
    ms = np.asarray(values) * 1000
    return {"mean": float(ms.mean()), "median": float(np.median(ms)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99))}


async def _send(client: httpx.AsyncClient, model: str, prompt: str, output_len: int) -> RequestRecord:
    rec = RequestRecord()
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                rec.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return rec
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = chunk["error"]["message"]
                    return rec
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
                # a chunk with text, or the last one (tokens that decode to no text yet are sent with it)
                if any(c.get("text") or c.get("finish_reason") for c in chunk.get("choices", [])):
                    now = time.perf_counter()
                    if rec.ttft is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
        rec.e2e = time.perf_counter() - start
    except httpx.HTTPError as err:
        rec.error = f"{type(err).__name__}: {err}"
    return rec


async def _run(base_url: str, model: str | None, prompts: list[str], times: list[float], output_len: int,
               api_key: str | None) -> tuple[list[RequestRecord], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=None) as client:
        if model is None:
            model = (await client.get("/v1/models")).raise_for_status().json()["data"][0]["id"]
        start = time.perf_counter()

        async def at(t: float, prompt: str) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + t - time.perf_counter()))
            return await _send(client, model, prompt, output_len)
        records = await asyncio.gather(*(at(t, p) for t, p in zip(times, prompts)))
        return list(records), time.perf_counter() - start


def _run_sync(coro: Any) -> Any:
    """Run a coroutine to completion, also from inside a running event loop (a notebook's): then in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def bench_serve(base_url: str, prompts: Sequence[str], request_rate: float = math.inf, arrival: str = "poisson",
                output_len: int = 64, model: str | None = None, slo_ttft_ms: float = 1000.0,
                slo_tpot_ms: float = 200.0, seed: int = 0, api_key: str | None = None) -> ServeBenchResult:
    """Send every prompt to the server at `request_rate` and measure; one ServeBenchResult."""
    if not prompts:
        raise ValueError("prompts is empty")
    if output_len < 1:
        raise ValueError(f"output_len must be >= 1, got {output_len}")
    times = arrival_times(len(prompts), request_rate, arrival, seed)
    records, duration = _run_sync(_run(base_url.rstrip("/"), model, list(prompts), times, output_len, api_key))
    done = [r for r in records if r.error is None and r.e2e is not None]
    good = [r for r in done if r.ttft is not None and r.ttft * 1000 <= slo_ttft_ms
            and (r.tpot is None or r.tpot * 1000 <= slo_tpot_ms)]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    latency = {"ttft": _stats([r.ttft for r in done if r.ttft is not None]),
               "tpot": _stats([r.tpot for r in done if r.tpot is not None]),
               "itl": _stats([gap for r in done for gap in r.itl]), "e2e": _stats([r.e2e for r in done])}
    return ServeBenchResult(request_rate, "burst" if math.isinf(request_rate) else arrival, len(records), len(done),
                            duration, len(done) / duration, out_tokens / duration, (in_tokens + out_tokens) / duration,
                            len(good) / duration, slo_ttft_ms, slo_tpot_ms, latency,
                            [r.error for r in records if r.error is not None])


def sweep(base_url: str, prompts: Sequence[str], rates: Sequence[float], **kwargs: Any) -> list[ServeBenchResult]:
    """bench_serve at each rate, in order."""
    return [bench_serve(base_url, prompts, rate, **kwargs) for rate in rates]


def format_result(r: ServeBenchResult) -> str:
    rate = "burst" if math.isinf(r.request_rate) else f"{r.request_rate:g} req/s ({r.arrival})"
    lines = [f"== {rate}: {r.completed}/{r.num_requests} requests in {r.duration_s:.2f} s",
             f"   throughput {r.request_throughput:.2f} req/s, {r.output_throughput:.1f} output tok/s, "
             f"{r.total_token_throughput:.1f} total tok/s; goodput {r.goodput:.2f} req/s "
             f"(TTFT <= {r.slo_ttft_ms:g} ms, TPOT <= {r.slo_tpot_ms:g} ms)",
             f"   {'ms':5} {'mean':>9} {'median':>9} {'p90':>9} {'p99':>9}"]
    for name, s in r.latency_ms.items():
        lines.append(f"   {name.upper():5} {s['mean']:9.1f} {s['median']:9.1f} {s['p90']:9.1f} {s['p99']:9.1f}")
    if r.errors:
        lines.append(f"   {len(r.errors)} error(s), first: {r.errors[0]}")
    return "\n".join(lines)


def to_json(results: Sequence[ServeBenchResult]) -> str:
    return json.dumps([{**asdict(r), "request_rate": "inf" if math.isinf(r.request_rate) else r.request_rate}
                       for r in results], indent=2)


def plot_latency_vs_rate(results: Sequence[ServeBenchResult], path: str | None = None) -> Any:
    """TTFT, TPOT and ITL (mean and p99) against the request rate (one tick per rate; inf is "burst")."""
    from matplotlib.figure import Figure
    labels = ["burst" if math.isinf(r.request_rate) else f"{r.request_rate:g}" for r in results]
    xs = range(len(results))  # one tick per measured rate, in the order given
    fig = Figure(figsize=(11, 3.4))
    for ax, metric in zip(fig.subplots(1, 3), ("ttft", "tpot", "itl")):
        for stat, style in (("mean", "o-"), ("p99", "s--")):
            ax.plot(xs, [r.latency_ms[metric][stat] for r in results], style, label=stat)
        ax.set_xticks(list(xs), labels)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{metric.upper()} (ms)")
        ax.set_title(metric.upper())
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig
