"""Bytes each rank hands to torch.distributed per engine step, measured on CPU processes, against the analytic count.

    python benchmarks/bench_parallel_traffic.py [--prompt-len 24] [--decoders 4] [--out results.json]

Chapter 11's traffic table. Four ways to split a model over 2 worker processes (gloo on this CPU), each on a tiny
random model, each measured with the counters the parallel code keeps (minillm.parallel.state.comm_stats: what a
rank hands to a collective or a send, its own chunk of an all-to-all included; not what the wire algorithm then
moves), for one prefill step of --prompt-len tokens and one decode step of --decoders sequences:

    TP  tensor parallel 2        per layer 2 all-reduces of [T, hidden] + 1 after the embedding; the LM head's
                                 logits slice [rows, ceil(vocab / 2)] gathered from TP rank 1 to rank 0
    PP  pipeline parallel 2      stage 0 sends hidden and residual, [T, hidden] each; stage 1 sends nothing
    EP  expert parallel 2        per MoE layer: dispatch T_r x k rows, combine the rows its experts received,
                                 the split counts, an all-gather of ceil(T / 2) rows (minillm.parallel.expert)
    PD  prefill/decode disagg.   one KV message per request: 2 x layers x blocks x block_size x kv_heads x head_dim
                                 (minillm.parallel.kv_transfer.kv_transfer_bytes); decode steps send nothing

Every measured count must equal the analytic one (the script exits 1 otherwise). fp32 everywhere (the CPU's dtype):
a bf16 model sends half. Writes benchmarks/results/parallel_traffic_cpu.json, which the chapter reads.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.cache_config import resolve_engine_config
from minillm.engine.disagg_engine import DisaggregatedEngine
from minillm.engine.executor import MultiProcExecutor
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import RandomWeights
from minillm.loader.no_tokenizer import NoTokenizer
from minillm.parallel.expert import collect_load_stats, token_slice
from minillm.parallel.kv_transfer import kv_transfer_bytes
from minillm.sampling_params import SamplingParams

LLAMA = ModelConfig(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=257)
MIXTRAL = ModelConfig(architecture="mixtral", vocab_size=301, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                      num_experts_per_tok=2, max_position_embeddings=256, eos_token_id=257)
ENGINE = dict(max_model_len=128, max_num_seqs=8, block_size=8, num_kv_blocks=96)
FP32 = 4  # bytes per element
OUT = Path(__file__).resolve().parent / "results" / "parallel_traffic_cpu.json"


def _executor(config: ModelConfig, **parallel) -> MultiProcExecutor:
    engine_config = resolve_engine_config(EngineConfig(**ENGINE, **parallel), config, torch.device("cpu"))
    return MultiProcExecutor(dict(model_config=config, engine_config=engine_config, device=torch.device("cpu"),
                                  dtype=torch.float32, model_source=RandomWeights(seed=3), seed=0))


def _prompt(n: int, start: int) -> list[int]:
    return [(start + 7 * i) % 250 + 1 for i in range(n)]


def _steps(engine: LLMEngine, stats, prompt_len: int, decoders: int) -> dict[str, tuple[int, object]]:
    """{"prefill": (tokens, stats(reset=True) after it), "decode": (...)}: one prefill of prompt_len tokens alone, then
    `decoders` sequences prefilled together and one decode step of them (one token each)."""
    greedy = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    stats(reset=True)
    engine.add_request("prefill", _prompt(prompt_len, 0), greedy)
    engine.step()
    out = {"prefill": (prompt_len, stats(reset=True))}
    for i in range(decoders):
        engine.add_request(f"d{i}", _prompt(3 + i, 11 * i), SamplingParams(temperature=0, max_tokens=2,
                                                                           ignore_eos=True))
    engine.step()  # their prefill
    stats(reset=True)
    engine.step()  # one decode step: one new token per sequence
    out["decode"] = (decoders, stats(reset=True))
    while engine.has_unfinished_requests():
        engine.step()
    return out


def measure_tp(prompt_len: int, decoders: int) -> list[dict]:
    executor = _executor(LLAMA, tensor_parallel_size=2)
    try:
        engine = LLMEngine(None, NoTokenizer(), LLAMA, EngineConfig(**ENGINE), executor=executor)
        steps = _steps(engine, lambda reset: executor.collective_rpc("get_comm_stats", reset), prompt_len, decoders)
    finally:
        executor.shutdown()
    h, layers, rows_per_rank = LLAMA.hidden_size, LLAMA.num_hidden_layers, -(-LLAMA.vocab_size // 2)
    runs = []
    for step, (tokens, measured) in steps.items():
        sampled = 1 if step == "prefill" else decoders  # one logits row per sequence
        all_reduce = (2 * layers + 1) * tokens * h * FP32
        analytic = [{"all_reduce": all_reduce}, {"all_reduce": all_reduce, "gather": sampled * rows_per_rank * FP32}]
        runs.append(_run("TP", step, tokens, measured, analytic))
    return runs


def measure_pp(prompt_len: int, decoders: int) -> list[dict]:
    executor = _executor(LLAMA, pipeline_parallel_size=2)
    try:
        engine = LLMEngine(None, NoTokenizer(), LLAMA, EngineConfig(**ENGINE), executor=executor)
        steps = _steps(engine, lambda reset: executor.collective_rpc("get_comm_stats", reset), prompt_len, decoders)
    finally:
        executor.shutdown()
    return [_run("PP", step, tokens, measured, [{"send": 2 * tokens * LLAMA.hidden_size * FP32}, {}])
            for step, (tokens, measured) in steps.items()]


def measure_ep(prompt_len: int, decoders: int) -> list[dict]:
    executor = _executor(MIXTRAL, expert_parallel_size=2)

    def stats(reset: bool) -> tuple[list[dict], list[list[int]]]:
        """The counters and the step's routing (rows per expert per layer): the combine's bytes depend on it."""
        routing = collect_load_stats(executor, reset=True)["last"]
        return executor.collective_rpc("get_comm_stats", reset), routing

    try:
        engine = LLMEngine(None, NoTokenizer(), MIXTRAL, EngineConfig(**ENGINE), executor=executor)
        steps = _steps(engine, stats, prompt_len, decoders)
    finally:
        executor.shutdown()
    h, k, n, layers = MIXTRAL.hidden_size, MIXTRAL.num_experts_per_tok, 2, MIXTRAL.num_hidden_layers
    per_rank_experts = MIXTRAL.num_local_experts // n
    runs = []
    for step, (tokens, (measured, routing)) in steps.items():
        analytic = []
        for rank in range(n):
            first, end, rows_per_rank = token_slice(tokens, n, rank)
            received = sum(sum(row[rank * per_rank_experts:(rank + 1) * per_rank_experts]) for row in routing)
            analytic.append({"all_to_all_dispatch": layers * (end - first) * k * h * FP32,
                             "all_to_all_combine": received * h * FP32,
                             "all_to_all_counts": layers * n * (per_rank_experts + 1) * 8,
                             "all_gather": layers * rows_per_rank * h * FP32})
        runs.append(_run("EP", step, tokens, measured, analytic))
        runs[-1]["rows_per_expert"] = routing
    return runs


def measure_pd(prompt_len: int, decoders: int) -> list[dict]:
    engine = DisaggregatedEngine(RandomWeights(seed=3), NoTokenizer(), LLAMA, EngineConfig(**ENGINE),
                                 disaggregation={"prefill": 1, "decode": 1})
    lens = [prompt_len] + [3 + i for i in range(decoders)]
    try:
        engine.get_comm_stats(reset=True)
        for i, n in enumerate(lens):
            engine.add_request(f"r{i}", _prompt(n, 11 * i), SamplingParams(temperature=0, max_tokens=3,
                                                                          ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        stats = engine.get_comm_stats(reset=True)
        per_request = [engine.kv_bytes_sent[f"r{i}"] for i in range(len(lens))]
    finally:
        engine.shutdown()
    analytic = [kv_transfer_bytes(n, ENGINE["block_size"], LLAMA.num_hidden_layers, LLAMA.num_key_value_heads,
                                  LLAMA.head_dim, torch.float32) for n in lens]
    return [{"scheme": "PD", "step": "requests", "tokens": sum(lens), "prompt_lens": lens,
             "per_request": {"measured": per_request, "analytic": analytic},
             "ranks": [{"rank": 0, "role": "prefill", "measured": stats["prefill"],
                        "analytic": {"kv_send": sum(analytic)}},
                       {"rank": 1, "role": "decode", "measured": stats["decode"],
                        "analytic": {"kv_recv": sum(analytic)}}]}]


def _run(scheme: str, step: str, tokens: int, measured: list[dict], analytic: list[dict]) -> dict:
    return {"scheme": scheme, "step": step, "tokens": tokens,
            "ranks": [{"rank": r, "measured": dict(m), "analytic": a} for r, (m, a) in enumerate(zip(measured, analytic))]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=24, help="tokens of the measured prefill step")
    parser.add_argument("--decoders", type=int, default=4, help="sequences in the measured decode step")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for name in ("prompt_len", "decoders"):
        if getattr(args, name) < 1 or getattr(args, name) > 64:
            parser.error(f"--{name.replace('_', '-')} must be in [1, 64], got {getattr(args, name)}")
    torch.set_num_threads(1)
    runs = []
    for measure in tqdm([measure_tp, measure_pp, measure_ep, measure_pd], desc="schemes (2 processes each)"):
        runs.extend(measure(args.prompt_len, args.decoders))
    mismatches = [f"{r['scheme']} {r['step']} rank {rank['rank']}: measured {rank['measured']}, "
                  f"analytic {rank['analytic']}" for r in runs for rank in r["ranks"]
                  if rank["measured"] != rank["analytic"]]
    result = {"command": "python benchmarks/bench_parallel_traffic.py " + " ".join(argv or sys.argv[1:]),
              "device": f"CPU ({platform.processor() or platform.machine()}), gloo, 2 worker processes",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "dtype": "float32",
              "models": {"llama": {k: getattr(LLAMA, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                  "num_key_value_heads", "head_dim")},
                         "mixtral": {k: getattr(MIXTRAL, k) for k in ("hidden_size", "num_hidden_layers",
                                                                      "num_local_experts", "num_experts_per_tok")}},
              "block_size": ENGINE["block_size"], "runs": runs, "all_match": not mismatches}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        for rank in r["ranks"]:
            print(f"{r['scheme']} {r['step']:8s} rank {rank['rank']}: {sum(rank['measured'].values()):>9,d} B "
                  f"measured, {sum(rank['analytic'].values()):>9,d} B analytic  {rank['measured']}")
    print(f"wrote {args.out}")
    if mismatches:
        print("MISMATCH:\n  " + "\n  ".join(mismatches), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
