"""The prefix cache's CPU tier on a GPU (EngineConfig.kv_offloading_size; minillm/engine/offload_tier.py).

Shared prefixes that no longer fit the device pool come back three ways: recomputed (prefix caching, no tier),
loaded from host memory (the tier), and loaded from host memory by stores that make the host wait for the GPU
(HostTransfers.wait: the copies as they were before minillm/engine/host_transfers.py). Workload: `--prefixes`
documents of `--prefix-len` tokens, asked about in `--rounds` rounds (each round every document once, a fresh
32-token question, 16 answer tokens, `--batch` requests at a time); the device pool holds about `--batch` of
them, so from the second round on every prefix was evicted since it was last used. Reported per mode: the wall
time and mean TTFT of rounds 2.., prefix-cache and tier hits, the tier's stores and loads.

    python benchmarks/bench_kv_offload.py --out kv_offload.json          # Llama-3-8B shape, random bf16 weights

CUDA graphs and async scheduling on (the defaults), as a server runs.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

import bench_scheduling as bs
from minillm.sampling_params import SamplingParams


def run_mode(setup: "bs.Setup", name: str, options: dict, prompts: list[list[list[int]]], batch: int,
             max_model_len: int, num_blocks: int, wait: bool = False) -> dict:
    llm = setup.llm(max_model_len=max_model_len, max_num_seqs=batch, num_kv_blocks=num_blocks,
                    enable_prefix_caching=True, **options)
    engine = llm.llm_engine
    engine.runner.kv_cache.transfers.wait = wait
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    rng = random.Random(1)
    warm = [setup.prompt(rng, 300) for _ in range(batch)]
    llm.generate(warm, params)  # kernels compiled and tuned first: a fresh prefill's,
    llm.generate([w + setup.prompt(rng, 32) for w in warm], params)  # and the paged prefill's over a cached prefix
    engine.reset_prefix_cache()  # (its autotuning took seconds out of the first mode that hit the cache)
    bm = engine.scheduler.block_manager
    walls, ttfts = [], []
    for r, round_prompts in enumerate(prompts):
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(round_prompts, params)
        torch.cuda.synchronize()
        if r:  # the first round only fills the caches
            walls.append(time.perf_counter() - start)
            ttfts += [o.metrics.ttft for o in outs]
        failed = [o.outputs[0].error for o in outs if o.outputs[0].finish_reason == "error"]
        if failed:
            raise RuntimeError(f"{name}: {len(failed)} requests failed: {failed[0]}")
    tier = bm.offload
    result = {"wall_s": sum(walls), "mean_ttft_s": sum(ttfts) / len(ttfts), "prefix_cache_hits": bm.prefix_cache_hits,
              "offload_hits": bm.offload_hits, "tier": None if tier is None else
              {"stores": tier.stores, "loads": tier.loads, "evictions": tier.evictions}}
    print(f"{name:>12}: rounds 2..: {result['wall_s']:.2f} s, mean TTFT {1e3 * result['mean_ttft_s']:.1f} ms, "
          f"hits {bm.prefix_cache_hits} (tier {bm.offload_hits}), tier {result['tier']}", flush=True)
    del llm, engine, bm, tier
    bs.release(setup)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefixes", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=32, help="of the Llama-3-8B shape (fewer: a quicker run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kv_offload measures host-device copies: it needs a GPU")
    bs.LLAMA3_8B = dict(bs.LLAMA3_8B, num_hidden_layers=args.layers)
    setup = bs.Setup(torch.device("cuda"), enforce_eager=False)
    rng = random.Random(0)
    documents = [setup.prompt(rng, args.prefix_len) for _ in range(args.prefixes)]
    prompts = [[doc + setup.prompt(rng, 32) for doc in documents] for _ in range(args.rounds)]
    max_model_len = args.prefix_len + 64
    block = 16
    num_blocks = args.batch * -(-max_model_len // block) + 8  # the running batch, and about nothing more
    block_bytes = bs.kv_bytes_per_block(setup.model_config, block, setup.dtype)
    tier_gib = 1.25 * args.prefixes * -(-max_model_len // block) * block_bytes / 2**30  # every document fits
    result = {"device": torch.cuda.get_device_name(), "shape": f"Llama-3-8B, {args.layers} layers, random bf16",
              "prefixes": args.prefixes, "prefix_len": args.prefix_len, "rounds": args.rounds, "batch": args.batch,
              "device_blocks": num_blocks, "tier_gib": tier_gib, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                        time.gmtime())}
    result["recompute"] = run_mode(setup, "recompute", {}, prompts, args.batch, max_model_len, num_blocks)
    result["tier"] = run_mode(setup, "tier", {"kv_offloading_size": tier_gib}, prompts, args.batch, max_model_len,
                              num_blocks)
    result["tier_waiting"] = run_mode(setup, "tier, waits", {"kv_offloading_size": tier_gib}, prompts, args.batch,
                                      max_model_len, num_blocks, wait=True)
    for mode in ("tier", "tier_waiting"):
        result[f"{mode}_speedup_over_recompute"] = result["recompute"]["wall_s"] / result[mode]["wall_s"]
    print(json.dumps({k: v for k, v in result.items() if k.endswith("speedup_over_recompute")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
