"""FP8 KV cache on the GPU (issue 10): how many blocks the pool gets, and decode speed at long context, vs bf16.

    python benchmarks/bench_kv_fp8.py [--batch 32] [--context 4096] [--output-len 64] [--out results.json]

Model: Llama-3-8B's shapes with random bf16 weights (benchmarks/bench_decode.py's build_model). Two measurements,
each for kv_cache_dtype "auto" (bf16, the baseline of the same run) and "fp8":

* pool: the blocks num_device_blocks finds for gpu_memory_utilization=0.9 after profiling (fp8 should give 2x);
* decode: `batch` requests of a (context - output_len)-token prompt, greedy, output_len new tokens, CUDA graphs
  on (the default); the time per decode step after the prefill. A step reads every weight once (16.06 GB) and
  every cached key and value of every sequence (bf16: 128 KiB per token, fp8: 64 KiB), so at batch 32 x 4k tokens
  the KV reads (17 GB in bf16) outweigh the weights and fp8 should cut the step by about a third. The floor
  is those bytes / the copy bandwidth measured in the same run; the fraction of it is printed.
Needs CUDA; prints a table and writes the raw numbers as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

from bench_decode import DummyTokenizer, build_model, copy_bandwidth, weight_bytes


def make_engine(model, config, kv_cache_dtype: str, max_model_len: int, batch: int, num_kv_blocks: int | None):
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    engine_config = EngineConfig(max_model_len=max_model_len, max_num_seqs=batch, block_size=16,
                                 num_kv_blocks=num_kv_blocks, max_num_batched_tokens=max(8192, max_model_len),
                                 kv_cache_dtype=kv_cache_dtype)
    return LLMEngine(model, DummyTokenizer(), config, engine_config, device="cuda", dtype=torch.bfloat16)


def time_decode(engine, config, batch: int, prompt_len: int, output_len: int) -> dict:
    from minillm.sampling_params import SamplingParams
    gen = torch.Generator().manual_seed(1)

    def generate(n_out: int) -> tuple[float, float]:
        """(seconds until every request has its first token, seconds per step while all `batch` decode)."""
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        for _ in range(batch):
            engine.add_request(None, torch.randint(0, config.vocab_size, (prompt_len,), generator=gen).tolist(),
                               params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        started: set[str] = set()
        while len(started) < batch:  # prefill steps (prompts in chunks of max_num_batched_tokens)
            started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        t1 = time.perf_counter()
        steps, finished = 0, False
        while not finished:  # full-batch decode steps: until the first request finishes
            finished = any(o.finished for o in engine.step())
            steps += 1
        t2 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return t1 - t0, (t2 - t1) / steps

    generate(4)  # warm-up: Triton JIT, autotuning, graphs already captured
    prefill_s, step_s = generate(output_len)
    return dict(prefill_s=round(prefill_s, 3), ms_per_decode_step=round(step_s * 1e3, 3),
                decode_tok_per_s=round(batch / step_s, 1))


def pool_size(model, config, kv_cache_dtype: str, max_model_len: int, batch: int) -> int:
    """The blocks the engine's profiling would give the pool at gpu_memory_utilization=0.9, without allocating
    it (a built engine's pool stays referenced by the model's attention layers until the next engine rebinds
    them, so building one only to read its size would hold 0.9 of the GPU)."""
    from minillm.config import EngineConfig
    from minillm.engine.cache_config import resolve_engine_config
    from minillm.engine.kv_cache import num_device_blocks
    engine_config = resolve_engine_config(
        EngineConfig(max_model_len=max_model_len, max_num_seqs=batch, block_size=16,
                     max_num_batched_tokens=max(8192, max_model_len), kv_cache_dtype=kv_cache_dtype),
        config, torch.device("cuda"))
    return num_device_blocks(engine_config, config, torch.bfloat16, torch.device("cuda"), model=model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096, help="prompt + output tokens per request")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a smoke test (not for figures)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kv_fp8 needs CUDA", file=sys.stderr)
        return 1
    if not 1 <= args.output_len < args.context:
        parser.error(f"--output-len must be in [1, --context={args.context})")
    model, config = build_model(args.layers)
    bandwidth = copy_bandwidth()
    max_model_len = -(-(args.context + 8) // 16) * 16
    blocks_needed = (args.batch + 1) * (max_model_len // 16)
    rows = []
    for kv_cache_dtype in ("auto", "fp8"):
        pool_blocks = pool_size(model, config, kv_cache_dtype, max_model_len, args.batch)
        engine = make_engine(model, config, kv_cache_dtype, max_model_len, args.batch, blocks_needed)
        kv_bytes_per_token = engine.runner.kv_cache.nbytes // (engine.runner.kv_cache.num_blocks * 16)
        timing = time_decode(engine, config, args.batch, args.context - args.output_len, args.output_len)
        mean_context = args.context - args.output_len / 2
        floor_s = (weight_bytes(model) + args.batch * mean_context * kv_bytes_per_token) / bandwidth
        rows.append(dict(kv_cache_dtype=kv_cache_dtype, pool_blocks=pool_blocks, kv_bytes_per_token=kv_bytes_per_token,
                         floor_ms=round(floor_s * 1e3, 3), **timing,
                         fraction_of_floor=round(floor_s * 1e3 / timing["ms_per_decode_step"], 3)))
        del engine
        for module in model.modules():  # the layers still hold views of the pool: drop them so it is freed
            if hasattr(module, "k_cache"):
                module.k_cache = module.v_cache = torch.tensor([])
        gc.collect()
        torch.cuda.empty_cache()
    base = rows[0]
    print(f"{'kv cache':8s} {'pool blocks':>11s} {'B/token':>8s} {'ms/step':>8s} {'floor ms':>8s} {'of floor':>8s} "
          f"{'tok/s':>8s}")
    for row in rows:
        print(f"{row['kv_cache_dtype']:8s} {row['pool_blocks']:11d} {row['kv_bytes_per_token']:8d} "
              f"{row['ms_per_decode_step']:8.2f} {row['floor_ms']:8.2f} {row['fraction_of_floor']:8.2f} "
              f"{row['decode_tok_per_s']:8.1f}")
    fp8 = rows[1]
    print(f"fp8 vs bf16 cache: {fp8['pool_blocks'] / base['pool_blocks']:.2f}x the blocks, "
          f"{base['ms_per_decode_step'] / fp8['ms_per_decode_step']:.2f}x decode speed")
    result = dict(command=" ".join(["python", *sys.argv]), date=datetime.date.today().isoformat(),
                  device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth_Bps=bandwidth,
                  batch=args.batch, context=args.context, output_len=args.output_len, layers=args.layers, rows=rows)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
