"""Mixtral-style MoE: one GPU against expert parallelism over two, throughput and all-to-all traffic (chapter 11).

    python benchmarks/bench_moe.py [--ep 1,2] [--layers 32] [--batch 64] [--out results.json]

The model is Mixtral-8x7B's shape (hidden 4096, 32 layers, 32/8 heads, 8 experts of FFN 14336, top-2, vocab
32000) with random bf16 weights drawn on each GPU: 47B parameters, 93 GB, which fits one H200. Every parameter is
drawn from a generator seeded by its name, so the replicated weights (attention, router, embeddings) are the
same on every rank and expert e is the same whichever rank holds it: EP=2 computes the model EP=1 does.

    ep 1    the engine and its one worker in this process, on cuda:0 (LLM's default)
    ep 2    two worker processes, cuda:0 and cuda:1, each with 4 of the 8 experts of every layer and the whole
            attention; tokens travel by all-to-all over NCCL (minillm.parallel.expert)

Reported per mode: prefill time of the batch (--batch prompts of --prompt-len tokens), decode step time and
output tokens/s at that batch, and for EP the bytes each rank hands to NCCL per decode step
(against the analytic count) and the router's load balance (max/mean tokens per expert). Weights are random, so
routing is close to uniform; a trained router is less balanced. Raw numbers go to --out as JSON.
On a CPU (no CUDA) a tiny random Mixtral runs instead: it checks that the script works, it measures nothing.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import time
import zlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from minillm.loader.no_tokenizer import NoTokenizer  # random weights: ids only, no text
from minillm.config import EngineConfig, ModelConfig
from minillm.engine.cache_config import resolve_engine_config
from minillm.engine.executor import MultiProcExecutor, UniProcExecutor
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import Worker
from minillm.parallel.expert import collect_load_stats
from minillm.sampling_params import SamplingParams

MIXTRAL_8X7B = dict(architecture="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                    num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=32768, eos_token_id=2)
CPU_TINY = dict(MIXTRAL_8X7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


@dataclass(frozen=True)
class RandomByName:
    """A picklable ModelSource: the model (this rank's share of it) built on the device, every parameter drawn
    N(0, 0.02) (norms 1) from a generator seeded by the parameter's name."""

    def __call__(self, model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
        from minillm.models import get_model_class
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = get_model_class(model_config.architecture)(model_config)
        finally:
            torch.set_default_dtype(previous)
        generator = torch.Generator(device=device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 1:
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator.manual_seed(zlib.crc32(name.encode())))
        return model.eval()


def build_engine(ep: int, model_config: ModelConfig, args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype) -> LLMEngine:
    options = dict(max_model_len=args.prompt_len + args.max_tokens + 16, max_num_seqs=args.batch,
                   max_num_batched_tokens=max(8192, args.batch * args.prompt_len), expert_parallel_size=ep)
    if device.type == "cuda":
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        options["num_kv_blocks"] = args.batch * -(-options["max_model_len"] // 16)
    config = resolve_engine_config(EngineConfig(**options), model_config, device)
    kwargs = dict(model_config=model_config, engine_config=config, device=device, dtype=dtype,
                  model_source=RandomByName(), seed=0)
    executor = MultiProcExecutor(kwargs) if ep > 1 else UniProcExecutor(Worker(**kwargs))
    return LLMEngine(None, NoTokenizer(), model_config, config, device=device, dtype=dtype, executor=executor)


def run(engine: LLMEngine, model_config: ModelConfig, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for _ in range(args.batch):
        prompt = torch.randint(0, model_config.vocab_size, (args.prompt_len,), generator=generator).tolist()
        engine.add_request(None, prompt, params)
    multi = hasattr(engine.executor, "collective_rpc")
    start = time.perf_counter()
    engine.step()  # the whole batch's prefill (max_num_batched_tokens holds it)
    prefill_s = time.perf_counter() - start
    step_times, comm, balance = [], [], []
    for _ in tqdm(range(args.max_tokens - 1), desc="decode", leave=False):
        if multi:
            engine.executor.collective_rpc("get_comm_stats", True)
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
        if multi:
            comm.append(engine.executor.collective_rpc("get_comm_stats", True))
        balance.append(statistics.mean(collect_load_stats(engine.executor)["max_over_mean"]))  # this step's
    step = statistics.median(step_times)
    result = dict(prefill_s=prefill_s, prefill_tokens_per_s=args.batch * args.prompt_len / prefill_s,
                  decode_step_ms=step * 1e3, decode_tokens_per_s=args.batch / step,
                  load_max_over_mean=statistics.mean(balance))  # per decode step, averaged over layers and steps
    if comm:
        hidden, k, layers = model_config.hidden_size, model_config.num_experts_per_tok, model_config.num_hidden_layers
        result["bytes_per_decode_step_per_rank"] = comm[-1]
        # the group's dispatch bytes: every token's k rows of hidden, once per layer
        result["analytic_dispatch_bytes"] = layers * args.batch * k * hidden * torch.finfo(dtype).bits // 8
        result["measured_dispatch_bytes"] = sum(r.get("all_to_all_dispatch", 0) for r in comm[-1])
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", default="1,2", help="expert-parallel sizes to run, comma-separated")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than Mixtral's 32 (faster)")
    parser.add_argument("--batch", type=int, default=None, help="requests (default 64 on CUDA, 4 on CPU)")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 512 on CUDA, 32 on CPU")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 64 on CUDA, 6 on CPU")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--out", default=None, help="write the raw results here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    shape = dict(MIXTRAL_8X7B if cuda else CPU_TINY)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    model_config = ModelConfig(**shape)
    args.batch = args.batch or (64 if cuda else 4)
    args.prompt_len = args.prompt_len or (512 if cuda else 32)
    args.max_tokens = args.max_tokens or (64 if cuda else 6)
    results = dict(device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                   date=datetime.date.today().isoformat(), torch=torch.__version__, model=shape,
                   batch=args.batch, prompt_len=args.prompt_len, max_tokens=args.max_tokens, modes={})
    for ep in (int(e) for e in args.ep.split(",")):
        if cuda and ep > torch.cuda.device_count():
            print(f"ep {ep}: skipped, {torch.cuda.device_count()} GPU(s) here")
            continue
        engine = build_engine(ep, model_config, args, device, dtype)
        try:
            results["modes"][f"ep{ep}"] = out = run(engine, model_config, args, dtype)
        finally:
            engine.shutdown()
            del engine  # the one-GPU model (93 GB) must be gone before the EP workers load theirs
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        print(f"ep {ep}: prefill {out['prefill_s']:.2f} s ({out['prefill_tokens_per_s']:,.0f} tok/s), decode "
              f"{out['decode_step_ms']:.1f} ms/step ({out['decode_tokens_per_s']:,.0f} tok/s), load max/mean "
              f"{out['load_max_over_mean']:.2f}" + (f", dispatch bytes {out['measured_dispatch_bytes']:,} "
                                                    f"(analytic {out['analytic_dispatch_bytes']:,})"
                                                    if "measured_dispatch_bytes" in out else ""), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
