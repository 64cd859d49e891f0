"""P6's step-time breakdown (issue 14, item 4): where the wall time of the 256-request run goes, by step phase.

    python benchmarks/bench_p6_breakdown.py --modes graphs,piecewise --out p6_breakdown.json      (CUDA only)
    python benchmarks/bench_p6_breakdown.py --modes graphs --async-scheduling --out p6_async.json
    python benchmarks/bench_p6_breakdown.py --modes graphs --async-only --kv-cache-dtypes auto,fp8 --out p6_kv.json

Runs the P6 workload (bench_scheduling's: Llama-3-8B shape, random bf16 weights, 256 requests, input and output
lengths uniform in 100..1024, greedy) once per engine mode, with the engine's phases wrapped in perf_counter
timers and each forward's GPU span measured by CUDA events (recorded around the launch, read after the run: no
extra syncs). What the phases do not cover inside `engine step (all)` is the per-request output loop (stop
checks, incremental detokenization, RequestOutput building). The GPU is idle for wall - GPU span: that is the
host time a step does not overlap with the device.

`--async-scheduling` runs every mode twice, synchronous steps and then EngineConfig(async_scheduling=True)
(minillm/engine/async_step.py: step N+1 is scheduled and launched before step N's tokens are read), in the same
process. Under async scheduling the phases are: launch (prepare, upload, forward queued, download queued), read
(the wait for step N's tokens and the output loop) and expect (step N+1's placeholder bookkeeping).
`output tok/s` of the two rows is the comparison; `GPU busy` (forward span / wall) says how much idle time is left.
`--async-only` runs only the async rows. `--kv-cache-dtypes auto,fp8` repeats every row with each KV cache dtype
(EngineConfig.kv_cache_dtype; "fp8" stores K/V in one byte: half the bytes decode attention reads, twice the blocks).
P6's target is a bf16 figure ("auto"): the fp8 row says what the KV cache's bytes cost at this scale, not P6."""
import argparse
import collections
import json
import random
import sys
import time

import torch
sys.path.insert(0, "benchmarks")
import bench_scheduling as bs
import minillm.engine.async_step as async_step
import minillm.engine.llm_engine as le
from minillm import SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--modes", default="graphs,piecewise")
parser.add_argument("--n", type=int, default=256)
parser.add_argument("--async-scheduling", action="store_true",
                    help="run each mode with synchronous steps and with async scheduling")
parser.add_argument("--async-only", action="store_true", help="only the async-scheduling rows")
parser.add_argument("--kv-cache-dtypes", default="auto", help="comma-separated EngineConfig.kv_cache_dtype values")
parser.add_argument("--out", required=True)
args = parser.parse_args()
if not torch.cuda.is_available():
    raise SystemExit("P6's breakdown needs CUDA (an 8B-shaped model in bf16)")

def instrument(llm):
    engine = llm.llm_engine
    runner = engine.runner
    acc = collections.defaultdict(float)
    counts = collections.Counter()
    events = []
    def wrap(obj, name, key):
        fn = getattr(obj, name)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t
        setattr(obj, name, timed)
    wrap(engine.scheduler, "schedule", "schedule")
    wrap(engine.scheduler, "postprocess", "postprocess")
    wrap(runner, "prepare", "prepare (inputs, metadata, upload)")
    orig_forward = runner.forward
    def forward(prepared):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t = time.perf_counter()
        out = orig_forward(prepared)
        acc["forward (host: launch/replay)"] += time.perf_counter() - t
        end.record()
        n = prepared.input_ids.shape[0]
        mixed = n != len(prepared.metadata.seq_lens_list) if hasattr(prepared.metadata, "seq_lens_list") else None
        events.append((start, end, n, mixed))
        return out
    runner.forward = forward
    wrap(runner, "execute_model", "execute_model (all)")
    wrap(runner, "launch", "launch (prepare, forward and download queued)")
    wrap(runner, "collect", "collect (wait for step N's tokens)")
    if engine.async_steps is not None:
        wrap(engine.async_steps, "_read", "read step N (wait + output loop)")
        wrap(engine.async_steps, "_expect", "expect step N+1 (placeholders)")
    orig_build = build_step_input
    def build(*a, **k):
        t = time.perf_counter()
        try:
            return orig_build(*a, **k)
        finally:
            acc["build_step_input"] += time.perf_counter() - t
    le.build_step_input = async_step.build_step_input = build
    wrap(engine, "_step", "engine step (all)")
    return acc, events

build_step_input = le.build_step_input

def run(mode, setup, asynchronous, kv_cache_dtype="auto"):
    rng = random.Random(6)
    lo, hi = 100, 1024
    in_lens = [rng.randint(lo, hi) for _ in range(args.n)]
    out_lens = [rng.randint(lo, hi) for _ in range(args.n)]
    prompts = [setup.prompt(rng, k) for k in in_lens]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in out_lens]
    llm = setup.llm(max_model_len=2 * hi, max_num_seqs=256, async_scheduling=asynchronous,
                    kv_cache_dtype=kv_cache_dtype)
    llm.generate(prompts[:16], [SamplingParams(temperature=0, max_tokens=4 + 4 * (i % 4), ignore_eos=True)
                                for i in range(len(prompts[:16]))])
    acc, events = instrument(llm)
    steps0 = llm.llm_engine.num_steps
    outs, wall, _ = bs.timed_generate(llm, prompts, params)
    steps = llm.llm_engine.num_steps - steps0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    gpu_fwd = sum(s.elapsed_time(e) for s, e, _, _ in events) / 1e3
    gpu_fwd_mixed = sum(s.elapsed_time(e) for s, e, n, m in events if m) / 1e3
    n_mixed = sum(1 for *_, m in events if m)
    mode = mode + (" + async" if asynchronous else "") + (f" + {kv_cache_dtype} KV" if kv_cache_dtype != "auto" else "")
    res = {"mode": mode, "async_scheduling": asynchronous, "kv_cache_dtype": kv_cache_dtype, "wall_s": wall,
           "output_tok_s": produced / wall, "steps": steps,
           "mixed_steps": n_mixed, "gpu_forward_s": gpu_fwd, "gpu_forward_mixed_s": gpu_fwd_mixed,
           "kv_blocks": llm.llm_engine.scheduler.block_manager.num_blocks,
           "preemptions": llm.llm_engine.scheduler.num_preemptions, "phases_s": dict(acc)}
    print(f"== {mode}: {produced / wall:,.0f} output tok/s, wall {wall:.2f} s, {steps} steps ({n_mixed} with "
          f"prefill tokens), GPU forward span {gpu_fwd:.2f} s (mixed steps {gpu_fwd_mixed:.2f} s), GPU busy "
          f"{100 * gpu_fwd / wall:.0f}%", flush=True)
    for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"   {k:38s} {v:7.3f} s  {1e3 * v / max(steps, 1):7.3f} ms/step  {100 * v / wall:5.1f}%")
    del llm, outs
    bs.release(setup)
    return res

results = []
for m in args.modes.split(","):
    setup = bs.Setup(torch.device("cuda"), enforce_eager=False, piecewise=(m == "piecewise"))
    for kv_cache_dtype in args.kv_cache_dtypes.split(","):
        for asynchronous in ((True,) if args.async_only else (False, True) if args.async_scheduling else (False,)):
            results.append(run(m, setup, asynchronous, kv_cache_dtype))
    del setup
    bs.release()
print("\nmode                                output tok/s   wall s   steps   GPU busy")
for r in results:
    print(f"{r['mode']:34s} {r['output_tok_s']:13,.0f} {r['wall_s']:8.2f} {r['steps']:7d} "
          f"{100 * r['gpu_forward_s'] / r['wall_s']:8.0f}%")
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results},
          open(args.out, "w"), indent=1)
