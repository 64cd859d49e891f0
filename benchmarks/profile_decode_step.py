"""A decode step of the Llama-3-8B shape (or SmolLM2's), kernel by kernel (issue 14, P5).

    python benchmarks/profile_decode_step.py [--steps 64] [--layers N] [--quantization rtn] [--shape smollm2-135m]
                                             [--batch 8] [--dtype float16] [--async-scheduling]
                                             --out p5_profile.json

bench_decode's engine (random bf16 weights, paged KV, CUDA graphs, a 128-token prompt) decodes 40 warm-up steps,
then torch.profiler records 64 more. CUPTI sees the kernels inside CUDA-graph replays, so the table sums GPU time
per kernel name: us per step, calls per step, share of all kernel time. Against the weight-read floor (bytes of
weights / copy bandwidth) it shows what the GEMMs cost and what everything else around them does. Wall time per
step is inflated by the profiler; the kernel times are not. `--quantization rtn` profiles the INT4 model of
bench_int4_decode.py instead (decoder linears rounded to 4-bit g128 at load). --batch decodes that many requests
at once (each step then a batch of them); --shape takes bench_decode's other shapes. Needs CUDA.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None,
                        help="fewer layers for a smoke test (not for figures); default: the shape's")
    parser.add_argument("--shape", default="llama3-8b", help="one of bench_decode.SHAPES")
    parser.add_argument("--batch", type=int, default=1, help="requests decoded together")
    parser.add_argument("--quantization", choices=["rtn"], default=None, help="INT4 decoder linears (4-bit, g128)")
    parser.add_argument("--lm-head", action="store_true", help="with --quantization: the LM head in 4-bit too")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                        help="the model's dtype (bench_int4_decode's --int4-dtype)")
    parser.add_argument("--async-scheduling", action="store_true", help="the engine with async scheduling")
    parser.add_argument("--host-profile", action="store_true",
                        help="also run cProfile over the same number of steps (no torch profiler) and print the "
                             "host functions by cumulative time")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import bench_decode as bd
    if args.shape not in bd.SHAPES:
        raise SystemExit(f"--shape must be one of {sorted(bd.SHAPES)}, got {args.shape!r}")
    args.layers = args.layers or bd.SHAPES[args.shape]["num_hidden_layers"]
    if args.steps < 1 or args.layers < 1 or not 1 <= args.batch <= 256:
        raise SystemExit(f"--steps and --layers must be >= 1 and --batch in [1, 256], got {args.steps}, "
                         f"{args.layers} and {args.batch}")
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.loader.no_tokenizer import NoTokenizer
    from minillm.sampling_params import SamplingParams

    options = {"bits": 4, "group_size": 128, "lm_head": args.lm_head} if args.quantization else None
    model, config = bd.build_model(args.layers, args.quantization, options, shape=bd.SHAPES[args.shape],
                                   dtype=args.dtype)
    engine = LLMEngine(model, NoTokenizer(), config,
                       EngineConfig(max_model_len=512, max_num_seqs=args.batch, block_size=16,
                                    num_kv_blocks=32 * args.batch + 32,
                                    max_num_batched_tokens=max(512, 128 * args.batch),
                                    async_scheduling=args.async_scheduling),
                       device="cuda", dtype=getattr(torch, args.dtype))
    for _ in range(args.batch):
        engine.add_request(None, list(range(1, 129)),
                           SamplingParams(temperature=0.0, max_tokens=40 + 2 * args.steps + 8, ignore_eos=True))
    for _ in range(40):
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    if args.host_profile:
        host_profile(engine, args.steps)
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name[event.name][0] += getattr(event, "device_time_total", 0.0)
            by_name[event.name][1] += 1
    total = sum(us for us, _ in by_name.values())
    gaps = idle_gaps(prof)
    print(f"wall {1e3 * wall / args.steps:.3f} ms/step (profiled), GPU kernel time {total / args.steps / 1e3:.3f} "
          f"ms/step")
    rows = sorted(by_name.items(), key=lambda item: -item[1][0])
    for name, (us, calls) in rows[:30]:
        print(f"{us / args.steps:9.1f} us/step {calls / args.steps:6.1f} calls/step {100 * us / total:5.1f}%  "
              f"{name[:100]}")
    idle = sum(g for g, _ in gaps.values())
    print(f"GPU idle between kernels: {idle / args.steps:.1f} us/step; the largest gaps by the kernels around them:")
    gap_rows = sorted(gaps.items(), key=lambda item: -item[1][0])
    for (before, after), (us, count) in gap_rows[:8]:
        print(f"{us / args.steps:9.1f} us/step {count / args.steps:6.1f} gaps/step  {before[:45]} -> {after[:45]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
                       "batch": args.batch, "dtype": args.dtype, "async_scheduling": args.async_scheduling,
                       "wall_ms_per_step": 1e3 * wall / args.steps, "kernel_ms_per_step": total / args.steps / 1e3,
                       "kernels": [(n, us / args.steps, c / args.steps) for n, (us, c) in rows],
                       "idle_us_per_step": idle / args.steps,
                       "gaps": [(b, a, us / args.steps, c / args.steps) for (b, a), (us, c) in gap_rows[:30]]},
                      f, indent=0)


def host_profile(engine, steps: int) -> None:
    """cProfile over `steps` engine steps: where the host's time per step goes (cumulative, top 25)."""
    import cProfile
    import io
    import pstats

    import torch
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    profiler.disable()
    torch.cuda.synchronize()
    print(f"host profile: {1e3 * (time.perf_counter() - start) / steps:.3f} ms/step under cProfile")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
    print("\n".join(line[:150] for line in text.getvalue().splitlines()[6:40]))


def idle_gaps(prof, min_us: float = 1.0) -> dict:
    """GPU idle time between consecutive device activities (kernels and copies, in start order), summed per
    (activity before, activity after): where a step waits on the host rather than on its kernels."""
    import torch
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps = collections.defaultdict(lambda: [0.0, 0])
    busy_until, last = None, None
    for start, end, name in spans:
        if busy_until is not None and start - busy_until >= min_us:
            gaps[(last, name)][0] += start - busy_until
            gaps[(last, name)][1] += 1
        if busy_until is None or end >= busy_until:
            busy_until, last = end, name
    return gaps


if __name__ == "__main__":
    main()
