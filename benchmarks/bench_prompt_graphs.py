"""Time to first token of a lone prompt: whole-forward prompt graphs against piecewise graphs (issue 14, chapter 4).

    python benchmarks/bench_prompt_graphs.py --out prompt_graphs.json                 (H200: SmolLM2 and 8B shapes)
    python benchmarks/bench_prompt_graphs.py --quick --out /tmp/prompt_graphs.json    (CPU smoke test, eager only)

A request without a prefix-cache hit starts with a step that is one fresh prompt. With piecewise graphs
(minillm/engine/piecewise_graph.py) such a step still calls attention eagerly in every layer; with prompt graphs
(minillm/engine/prompt_graph.py) it replays one graph per token bucket. One engine per model shape, random bf16
weights of real shapes; each prompt length runs `--repeats` prefill-only requests (max_tokens=1) with the engine's
prompt graphs on, then with them set aside (`runner.prompt_graphs = None`: the piecewise path), alternating, and
the median wall time per request counts (TTFT as the user sees it: schedule, upload, forward, sample, download).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=8192),
}


def engine_for(shape: dict, device: torch.device):
    from minillm.bench.step_transfers import tiny_llama
    from minillm.config import EngineConfig, ModelConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.loader.no_tokenizer import NoTokenizer
    from minillm.engine.worker import RandomWeights
    if device.type == "cuda":
        config = ModelConfig(**shape)
        model = RandomWeights(0)(config, device, torch.bfloat16)
    else:
        model, config = tiny_llama()
    return LLMEngine(model, NoTokenizer(), config, EngineConfig(max_model_len=min(2048, config.max_position_embeddings), max_num_seqs=8),
                     device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)


def ttft_ms(engine, length: int, vocab: int, repeats: int) -> dict[str, float]:
    """Median ms per prefill-only request of `length` tokens with prompt graphs ("prompt") and without."""
    from minillm.sampling_params import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    g = torch.Generator().manual_seed(length)
    runner, graphs = engine.runner, engine.runner.prompt_graphs
    times: dict[str, list[float]] = {"prompt": [], "piecewise": []}
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    for i in range(repeats + 1):  # the first round warms up
        for label, use in (("prompt", graphs), ("piecewise", None)):
            runner.prompt_graphs = use
            ids = torch.randint(0, vocab, (length,), generator=g).tolist()
            sync()
            start = time.perf_counter()
            engine.add_request(None, ids, params)
            while engine.has_unfinished_requests():
                engine.step()
            sync()
            if i:
                times[label].append((time.perf_counter() - start) * 1e3)
    runner.prompt_graphs = graphs
    return {label: statistics.median(ts) for label, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 40, 100, 180, 400])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="CPU smoke test: a tiny model, two lengths, eager")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu" and not args.quick:
        print("no CUDA device: run with --quick for a CPU smoke test", file=sys.stderr)
        return 2
    if args.quick:
        args.shapes, args.lengths, args.repeats = args.shapes[:1], [5, 20], 1
    rows: list[dict] = []
    record = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name() if
              device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "repeats": args.repeats, "rows": rows}
    for name in args.shapes:
        engine = engine_for(SHAPES[name], device)
        vocab = engine.model_config.vocab_size
        for length in args.lengths:
            ms = ttft_ms(engine, length, vocab, args.repeats)
            ratio = ms["piecewise"] / ms["prompt"]
            rows.append({"shape": name, "prompt_tokens": length, "prompt_graph_ms": round(ms["prompt"], 3),
                         "piecewise_ms": round(ms["piecewise"], 3), "speedup": round(ratio, 3)})
            print(f"{name if device.type == 'cuda' else 'tiny (CPU)':14s} {length:5d} tokens: prompt graph {ms['prompt']:7.2f} ms, piecewise "
                  f"{ms['piecewise']:7.2f} ms ({ratio:.2f}x)", flush=True)
        print(f"  forwards: {dict(engine.runner.forward_counts)}")
        engine.shutdown()
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:  # after every shape: a run cut short keeps what it measured
            json.dump(record, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
