"""Serving benchmark (chapter 10): start `minillm serve`'s app in a child process, sweep request rates with
`minillm bench serve`'s client from this one, print the table, save JSON (and a plot with --plot).

    python benchmarks/bench_serve.py [--rates 0.1,0.25,inf] [--num-prompts 8] [--output-len 16] [--out FILE]

Which model: on CPU the bundled SmolLM2-135M (fp32), prompts cut from the standard library's docstrings. On CUDA a
Llama-3-8B-shaped model with random bf16 weights (as vLLM's benchmarks use dummy weights) behind a byte-level
tokenizer (a prompt of N characters is N tokens; each output token decodes to " <id>", so the stream carries text
every step), unless --model names a checkpoint. The server runs in its own process so that the client's event loop
never competes with the engine's for the GIL. GPU machine: install fastapi, uvicorn, httpx and prometheus-client
wheels first (`pip install --no-index --no-deps wheels/*.whl`), then `pip install --no-deps -e .`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import sys
import time

import httpx
import torch

from minillm.bench.serve import docstring_prompts, format_result, plot_latency_vs_rate, sweep, to_json
from minillm.bench.cli import parse_rates


class ByteTokenizer:
    """Text in as UTF-8 bytes; a random model's tokens out as " <id>" each (prefix-stable, so it streams)."""

    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {t}" for t in token_ids)


def _serve(port: int, model: str | None, max_num_seqs: int, ready: multiprocessing.Event) -> None:
    from minillm import LLM
    from minillm.engine.async_llm import AsyncLLM
    from minillm.serve.app import build_app
    from minillm.serve.server import run
    if model is None and torch.cuda.is_available():
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_scheduling import random_llama  # the same Llama-3-8B shape as the scheduling benchmark
        from minillm.config import EngineConfig
        from minillm.engine.llm_engine import LLMEngine
        device = torch.device("cuda")
        net, config = random_llama(device, torch.bfloat16)
        engine = LLMEngine(net, ByteTokenizer(), config, EngineConfig(max_num_seqs=max_num_seqs, max_model_len=4096),
                           device=device, dtype=torch.bfloat16)
        name = "llama-3-8b-shape-random"
    else:
        llm = LLM(model, max_num_seqs=max_num_seqs)
        engine, name = llm.llm_engine, os.path.basename(llm.model_path or "model")
    app = build_app(AsyncLLM(engine), name)
    ready.set()
    run(app, "127.0.0.1", port, graceful_timeout=5.0, log_level="warning")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint to serve (default: see above)")
    parser.add_argument("--rates", type=parse_rates, default=None, help="default 0.1,0.25,inf (CPU), 2,8,32,inf")
    parser.add_argument("--num-prompts", type=int, default=None, help="default 8 (CPU), 256 (CUDA)")
    parser.add_argument("--output-len", type=int, default=None, help="default 16 (CPU), 128 (CUDA)")
    parser.add_argument("--max-prompt-chars", type=int, default=200)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default 8 (CPU), 64 (CUDA)")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="default 5000 (CPU), 500 (CUDA)")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="default 1000 (CPU), 50 (CUDA)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/results/serve_<device>.json)")
    parser.add_argument("--plot", default=None, help="PNG of latency against request rate")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    pick = (lambda given, cpu, gpu: given if given is not None else (gpu if cuda else cpu))
    rates = pick(args.rates, [0.1, 0.25, float("inf")], [2.0, 8.0, 32.0, float("inf")])
    num_prompts, output_len = pick(args.num_prompts, 8, 256), pick(args.output_len, 16, 128)
    max_num_seqs = pick(args.max_num_seqs, 8, 64)
    slo_ttft, slo_tpot = pick(args.slo_ttft_ms, 5000.0, 500.0), pick(args.slo_tpot_ms, 1000.0, 50.0)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # a shared CPU's numbers depend on it
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    server = ctx.Process(target=_serve, args=(args.port, args.model, max_num_seqs, ready), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{args.port}"
    try:
        ready.wait(600)
        for _ in range(600):  # the app is built; wait for uvicorn to answer
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        prompts = docstring_prompts(num_prompts, args.max_prompt_chars)
        # one short warm-up request (first-call compilation, CUDA graphs) outside the measurement
        sweep(url, prompts[:1], [float("inf")], output_len=4)
        results = sweep(url, prompts, rates, output_len=output_len, slo_ttft_ms=slo_ttft, slo_tpot_ms=slo_tpot)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    finally:
        server.terminate()
        server.join(30)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                         f"{os.cpu_count()} cores)"
    out = args.out or f"benchmarks/results/serve_{'cuda' if cuda else 'cpu'}.json"
    with open(out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "device": device, "model": model,
                   "date": datetime.date.today().isoformat(), "load_average_1min": load, "max_num_seqs": max_num_seqs,
                   "output_len": output_len, "results": json.loads(to_json(results))}, f, indent=2)
    if args.plot:
        plot_latency_vs_rate(results, args.plot)
    print(f"{model} on {device}, max_num_seqs {max_num_seqs}, {num_prompts} prompts, {output_len} output tokens")
    for r in results:
        print(format_result(r))
    print(f"raw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
