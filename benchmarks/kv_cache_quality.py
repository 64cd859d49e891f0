"""Held-out perplexity of SmolLM2-135M with an FP8 KV cache against the model's own dtype (chapter 5, issue 10).

    .venv/bin/python benchmarks/kv_cache_quality.py                      # 16 x 256 held-out tokens, chunks of 32
    .venv/bin/python benchmarks/kv_cache_quality.py --device cuda --dtype bfloat16 --n-samples 64 --seq-len 1024 \
        --out benchmarks/results/kv_cache_quality_h200.json

Why through the engine and with chunked prefill: a cache-less forward (benchmarks/quant_quality.py) never reads a
KV cache, and neither does a prompt prefilled in one piece (it attends to its fresh keys and values, as vLLM's
does). With `enable_chunked_prefill=True` and `max_num_batched_tokens=--chunk`, each window is prefilled in chunks
of at most --chunk tokens and every chunk after the first attends to everything before it *through the cache*,
so all but the first --chunk tokens of each window are scored on fp8 keys and values. The log-probabilities come
from `prompt_logprobs` (minillm.bench.quality.perplexity); both runs share the loaded weights (LLM.share_model)
and the same chunking, so the difference is the cache alone.

The text is the standard library's docstrings, held-out split (minillm.quant.calibration), cut into windows of
--seq-len tokens. The JSON (--out) holds the command, device, date and both perplexities.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from minillm import LLM
from minillm.bench.quality import perplexity
from minillm.quant.calibration import calibration_texts, tokenize_to_sequences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF or HF directory (default: bundled SmolLM2-135M)")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32, help="max_num_batched_tokens: the prefill chunk size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", help="the model's (and the 'auto' cache's) dtype")
    parser.add_argument("--out", default="benchmarks/results/kv_cache_quality_cpu.json")
    args = parser.parse_args(argv)
    if not 1 <= args.chunk < args.seq_len:
        parser.error(f"--chunk must be in [1, --seq-len={args.seq_len}) so that chunks read the cache, "
                     f"got {args.chunk}")
    options = dict(max_model_len=args.seq_len + 1, max_num_seqs=args.n_samples, enable_chunked_prefill=True,
                   max_num_batched_tokens=args.chunk)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, **options)
    windows = tokenize_to_sequences(calibration_texts("held_out"), llm.llm_engine.tokenizer, args.n_samples,
                                    args.seq_len).tolist()
    rows = []
    for label, kv_cache_dtype in (("model dtype", "auto"), ("fp8 kv cache", "fp8")):
        engine = llm if kv_cache_dtype == "auto" else llm.share_model(kv_cache_dtype=kv_cache_dtype, **options)
        start = time.perf_counter()
        ppl = perplexity(engine, windows, use_tqdm=True)
        seconds = time.perf_counter() - start
        rows.append(dict(label=label, kv_cache_dtype=kv_cache_dtype, perplexity=ppl, seconds=seconds,
                         kv_blocks=engine.llm_engine.runner.kv_cache.num_blocks))
        print(f"{label:14s} kv_cache_dtype={kv_cache_dtype:5s} perplexity {ppl:8.4f}  ({seconds:.1f} s)")
    base = rows[0]["perplexity"]
    for row in rows:
        row["relative_to_model_dtype"] = row["perplexity"] / base
    print(f"fp8 / model dtype: {rows[1]['relative_to_model_dtype']:.5f}")
    result = dict(command=" ".join([os.path.basename(sys.executable), *sys.argv]), date=datetime.date.today().isoformat(),
                  device=str(llm.device), device_name=torch.cuda.get_device_name() if llm.device.type == "cuda"
                  else platform.processor() or platform.machine(), dtype=str(llm.dtype), n_samples=args.n_samples,
                  seq_len=args.seq_len, chunk=args.chunk, scored_tokens=args.n_samples * (args.seq_len - 1),
                  rows=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
