"""Prefill/decode disaggregation against one engine: TTFT of long prompts and TPOT of running decodes.

    python benchmarks/bench_disagg.py [--modes colocated,chunked,disaggregated] [--out results.json]

The workload (DistServe's point): `--decoders` requests with short prompts decode steadily (their outputs are
long enough to outlast the run); meanwhile `--long-prompts` requests of `--prompt-len` tokens arrive every
`--interval` seconds, each wanting a few output tokens. Three ways to serve it:

    colocated       one engine, a long prompt prefilled whole in the step that admits it: every running decode
                    waits for that step (its inter-token latency spikes by a whole prefill)
    chunked         one engine with chunked prefill (Sarathi-Serve, --chunk tokens per step): the spikes are
                    cut into smaller ones, the long prompt's first token comes later
    disaggregated   LLM(disaggregation=...): a prefill worker and a decode worker; decodes never share a step
                    with a prefill, the first token pays one KV transfer

Reported per mode: TTFT of the long prompts (arrival to first token, mean / max) and the decoders'
inter-token latency (p50 / p99 / max) and mean TPOT over the window in which long prompts were arriving.
Arrival times are the schedule's, so a request that arrives while the driver waits in a step is charged the wait.

Which model: on CUDA a Llama-3-8B-shaped model with random bf16 weights (hidden 4096, 32 layers, 32/8 heads,
FFN 14336, vocab 128256; bench_scheduling's random_llama), drawn on the device in each process; defaults 32
decoders, 8 prompts of 4,096 tokens every 0.5 s. Real separation needs two GPUs (prefill on cuda:0, decode on
cuda:1, KV over NCCL); on one GPU both workers share it (each with --gpu-memory-utilization, 0.4 there) and the
KV goes through CPU memory: that checks that it runs, it does not measure disaggregation. On a CPU (the default
here) a tiny random model, 4 decoders and 4 prompts of 384 tokens, one torch thread per process: the colocated
engine has one core, the two workers one each, so the CPU numbers show the mechanism (no ITL spike from a
prefill), not a fair speed-up. Raw numbers go to --out as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from bench_scheduling import LLAMA3_8B, random_llama
from minillm.config import EngineConfig, ModelConfig
from minillm.engine.disagg_engine import DisaggregatedEngine
from minillm.engine.executor import UniProcExecutor
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import RandomWeights, Worker
from minillm.loader.no_tokenizer import NoTokenizer  # random weights: ids only, no text
from minillm.sampling_params import SamplingParams

CPU_TINY = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
MODES = ("colocated", "chunked", "disaggregated")


@dataclass(frozen=True)
class RandomLlama8B:
    """bench_scheduling's random_llama as a picklable ModelSource: each worker process draws the same weights on
    its own GPU (drawing 8B numbers on the device takes seconds; RandomWeights draws on the CPU)."""

    def __call__(self, model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        return random_llama(device, dtype)[0]


def build_engine(mode: str, model_config: ModelConfig, args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype) -> LLMEngine:
    options = dict(max_model_len=args.max_model_len, max_num_seqs=args.decoders + args.long_prompts,
                   max_num_batched_tokens=max(args.max_model_len, args.chunk))
    if device.type == "cuda":
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        options["num_kv_blocks"] = (args.decoders + args.long_prompts) * -(-args.max_model_len // 16)
    if mode == "chunked":
        options.update(enable_chunked_prefill=True, max_num_batched_tokens=args.chunk)
    config = EngineConfig(**options)
    source = RandomLlama8B() if device.type == "cuda" else RandomWeights(seed=0)
    if mode == "disaggregated":
        return DisaggregatedEngine(source, NoTokenizer(), model_config, config, device=device, dtype=dtype)
    from minillm.engine.cache_config import resolve_engine_config
    worker = Worker(model_config, resolve_engine_config(config, model_config, device), device, dtype, source)
    return LLMEngine(None, NoTokenizer(), model_config, config, device=device, dtype=dtype,
                     executor=UniProcExecutor(worker))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run(engine: LLMEngine, args: argparse.Namespace, vocab: int) -> dict:
    """Drive the workload through `engine.step()`; timestamps are the driver's (when a step's output shows a
    new token), the same clock for every mode."""
    rng = random.Random(0)
    decode_params = SamplingParams(temperature=0, max_tokens=args.max_model_len - 16, ignore_eos=True)
    long_params = SamplingParams(temperature=0, max_tokens=args.long_output, ignore_eos=True)
    # warm-up: one long prompt and one decode, not measured (first-call costs: allocator, kernels, graphs)
    engine.add_request("warm", [rng.randrange(vocab) for _ in range(args.prompt_len)], long_params)
    while engine.has_unfinished_requests():
        engine.step()
    start = time.perf_counter()
    decoders = [engine.add_request(f"d{i}", [rng.randrange(vocab) for _ in range(16)], decode_params,
                                   arrival_time=start) for i in range(args.decoders)]
    arrivals = [start + args.warmup + i * args.interval for i in range(args.long_prompts)]
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in arrivals]
    token_times: dict[str, list[float]] = {d: [] for d in decoders}
    seen: dict[str, int] = {d: 0 for d in decoders}
    first_token: dict[str, float] = {}
    added, finished = 0, set()
    bar = tqdm(total=args.long_prompts, desc="long prompts", leave=False)
    while len(finished) < args.long_prompts:
        now = time.perf_counter()
        while added < len(arrivals) and arrivals[added] <= now:
            engine.add_request(f"p{added}", prompts[added], long_params, arrival_time=arrivals[added])
            added += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[added] - now))
            continue
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            rid, count = out.request_id, len(out.outputs[0].token_ids)
            if out.outputs[0].finish_reason == "error":
                raise RuntimeError(f"request {rid} failed: {out.outputs[0].error}")
            if rid in seen:
                token_times[rid] += [now] * (count - seen[rid])
                seen[rid] = count
            elif count and rid not in first_token:
                first_token[rid] = now - arrivals[int(rid[1:])]
            if out.finished and rid.startswith("p"):
                finished.add(rid)
                bar.update(1)
    bar.close()
    window = (arrivals[0], time.perf_counter())
    for rid in decoders:
        engine.abort(rid)
    gaps = [b - a for times in token_times.values() for a, b in zip(times, times[1:]) if window[0] <= b <= window[1]]
    ttft = list(first_token.values())
    return dict(ttft_mean_s=statistics.mean(ttft), ttft_max_s=max(ttft),
                itl_p50_s=percentile(gaps, 0.5), itl_p99_s=percentile(gaps, 0.99), itl_max_s=max(gaps, default=0.0),
                tpot_mean_s=statistics.mean(gaps) if gaps else float("nan"), decode_tokens_in_window=len(gaps))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--decoders", type=int, default=32 if cuda else 4)
    parser.add_argument("--long-prompts", type=int, default=8 if cuda else 4)
    parser.add_argument("--prompt-len", type=int, default=4096 if cuda else 384)
    parser.add_argument("--long-output", type=int, default=16 if cuda else 8)
    parser.add_argument("--interval", type=float, default=0.5 if cuda else 1.0)
    parser.add_argument("--warmup", type=float, default=1.0 if cuda else 1.5, help="seconds of decode before")
    parser.add_argument("--chunk", type=int, default=512 if cuda else 64, help="chunked mode's token budget")
    parser.add_argument("--max-model-len", type=int, default=8192 if cuda else 2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; allowed: {', '.join(MODES)}")
    for name in ("decoders", "long_prompts", "prompt_len", "long_output", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.prompt_len + args.long_output > args.max_model_len:
        parser.error(f"--prompt-len + --long-output must fit --max-model-len ({args.max_model_len})")
    if args.gpu_memory_utilization is None:  # two workers on one GPU must share it
        args.gpu_memory_utilization = 0.9 if torch.cuda.device_count() != 1 else 0.4
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # one intra-op thread per process: two threads on a busy 2-core machine stall
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_config = ModelConfig(**(LLAMA3_8B if device.type == "cuda" else CPU_TINY))
    separate = device.type == "cpu" or torch.cuda.device_count() >= 2
    results = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                   gpus=torch.cuda.device_count(), separate_devices=separate, date=datetime.date.today().isoformat(),
                   command=" ".join([sys.executable, *sys.argv]), args=vars(args), modes={})
    if not separate:
        print("one GPU: both workers share it and the KV goes through CPU memory; disaggregated numbers check "
              "that it runs, they do not measure disaggregation (that needs 2 GPUs)")
    for mode in args.modes.split(","):
        engine = build_engine(mode, model_config, args, device, dtype)
        try:
            results["modes"][mode] = run(engine, args, model_config.vocab_size)
        finally:
            engine.shutdown()
            del engine
            gc.collect()  # the colocated engine's model and CUDA graphs, before the next mode allocates
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    print(f"{'mode':<15}{'TTFT mean':>11}{'TTFT max':>10}{'ITL p50':>10}{'ITL p99':>10}{'ITL max':>10}{'TPOT':>10}")
    for mode, r in results["modes"].items():
        print(f"{mode:<15}{r['ttft_mean_s'] * 1e3:>9.1f}ms{r['ttft_max_s'] * 1e3:>8.1f}ms"
              f"{r['itl_p50_s'] * 1e3:>8.1f}ms{r['itl_p99_s'] * 1e3:>8.1f}ms{r['itl_max_s'] * 1e3:>8.1f}ms"
              f"{r['tpot_mean_s'] * 1e3:>8.1f}ms")
    return results


if __name__ == "__main__":
    main()
