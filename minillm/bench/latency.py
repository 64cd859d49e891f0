"""`minillm bench latency`: how long one batch takes from submission to its last token (vLLM's benchmark_latency;
a tool beside chapter 1's `minillm bench`, built in no exercise).

A throughput run (`minillm bench`) asks how many tokens per second the engine makes with every request queued
at once; this asks the other question, the one a user waiting on one batch feels: `batch_size` prompts of
`input_len` tokens (windows of real text, as in workload.py) each generate exactly `output_len` tokens, the whole
call is timed, `num_iters` times after `num_iters_warmup` untimed ones, and the result is the latency's mean and
percentiles. The prefix cache is reset before every iteration, so each one pays its prefill (the same prompts
again would otherwise be nearly free). Latency grows with output_len (one decode step per token) far more than
with batch_size at decode sizes: a step reads every weight once however many rows it carries (chapter 1's
roofline), which is why batching is nearly free until compute catches up.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from minillm.bench.harness import percentile, warm_up
from minillm.bench.workload import check_lengths, synthetic_prompts

PERCENTILES = (10, 25, 50, 75, 90, 99)


@dataclass
class LatencyResult:
    batch_size: int
    input_len: int
    output_len: int
    latencies: list[float]  # seconds, one per timed iteration
    mean: float = 0.0
    percentiles: dict[str, float] = field(default_factory=dict)  # "p50" -> seconds

    def __post_init__(self) -> None:
        self.mean = sum(self.latencies) / len(self.latencies)
        self.percentiles = {f"p{q}": percentile(self.latencies, q) for q in PERCENTILES}

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of one iteration at the mean latency."""
        return self.batch_size * self.output_len / self.mean


def check_iterations(num_iters: int, num_iters_warmup: int) -> None:
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be an integer >= 1, got {num_iters!r}")
    if isinstance(num_iters_warmup, bool) or not isinstance(num_iters_warmup, int) or num_iters_warmup < 0:
        raise ValueError(f"num_iters_warmup must be an integer >= 0, got {num_iters_warmup!r}")


def run_latency(batch_size: int = 8, input_len: int = 32, output_len: int = 128, num_iters: int = 10,
                num_iters_warmup: int = 2, model: str | None = None, device: str | None = None,
                dtype: str | None = None, seed: int = 0, max_model_len: int | None = None, llm: Any = None,
                verbose: bool = True, load_format: str = "auto") -> LatencyResult:
    """Load the model (unless `llm` is given; load_format="dummy": random weights of its shapes), then time
    `num_iters` runs of one batch; print and return the result. Sizes are checked before anything loads."""
    from minillm import LLM, SamplingParams

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be >= 1, got {input_len} and {output_len}")
    check_iterations(num_iters, num_iters_warmup)
    check_lengths(input_len, output_len, max_model_len, model, device, llm)
    if llm is None:
        if verbose:
            print("loading the model ...", flush=True)
        llm = LLM(model=model, device=device, dtype=dtype, seed=seed, max_model_len=max_model_len,
                  load_format=load_format)
    prompts = synthetic_prompts(llm.tokenizer, batch_size, input_len, seed)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    warm_up(llm)  # first steps of each shape (layout timing, kernel builds), untimed

    def one_batch() -> float:
        llm.reset_prefix_cache()  # every iteration pays its prefill
        start = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - start

    for _ in range(num_iters_warmup):
        one_batch()
    result = LatencyResult(batch_size, input_len, output_len, [one_batch() for _ in range(num_iters)])
    if verbose:
        print(format_latency(result))
    return result


def format_latency(result: LatencyResult) -> str:
    lines = [f"batch {result.batch_size}, {result.input_len} prompt + {result.output_len} generated tokens each, "
             f"{len(result.latencies)} iterations",
             f"avg latency {result.mean:.3f} s ({result.tokens_per_s:,.1f} generated tok/s)"]
    lines += [f"  {name:>4} {seconds:.3f} s" for name, seconds in result.percentiles.items()]
    return "\n".join(lines)


def to_dict(result: LatencyResult) -> dict:
    return {**asdict(result), "tokens_per_s": result.tokens_per_s}
