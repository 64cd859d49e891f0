"""Kernels of a plain decode step beside a speculative step's, by name, at batch 1 (issue 11, chapter 9).

    python benchmarks/profile_spec_step.py --out spec_kernels.json                 (H200: random SmolLM2 weights)
    python benchmarks/profile_spec_step.py --methods ngram eagle --k 5 --out ...   (any speculative_config methods)
    python benchmarks/profile_spec_step.py --quick --out /tmp/spec_kernels.json    (CPU smoke test, tiny model)

Speculation is "almost free" only if a verify step of 1 + k rows costs about what a one-row step costs. This script
measures how far that holds: for plain decoding and each method it generates --max-tokens greedy tokens from one
prompt under torch.profiler (after a warm-up that captures the CUDA graphs) and prints, per engine step, the GPU
time and launch count of every kernel name, largest first. The difference between the two tables is where a
verify step's extra time goes: on SmolLM2 on the H200 (benchmarks/RESULTS.md, twenty-first session) mostly the
linear layers, whose six rows go to tensor-core tiles padded to 16 where one row takes a CUDA-core pass.

The weights are bench_spec_host.py's (random, SmolLM2-135M's shapes on a GPU, a tiny model on the CPU, with a
random EAGLE head for the head methods): per-step times mean something, acceptance does not. On the CPU the
table lists the CPU ops' own time (there are no kernels), which is only a smoke test of the script.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_spec_host import base_llm, prompt_ids  # noqa: E402

from minillm import SamplingParams  # noqa: E402


def step_kernels(llm, spec: dict | None, ids: list[int], max_tokens: int, device: torch.device) -> dict:
    """{"steps", "per_step": [(name, calls per step, us per step)], "us_per_step"} for one variant."""
    variant = llm.share_model(max_num_seqs=2, num_kv_blocks=80, speculative_config=spec)
    engine = variant.llm_engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for _ in range(2):  # warm-up: compiles, graph captures of every bucket the timed run replays
        variant.generate([ids], params, use_tqdm=False)
    steps = [0]
    step = engine.step

    def counted_step():
        steps[0] += 1
        return step()
    engine.step = counted_step
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    if cuda:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        variant.generate([ids], params, use_tqdm=False)
        if cuda:
            torch.cuda.synchronize()
    totals = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time_total if cuda else e.self_cpu_time_total
        entry = totals[e.name[:100]]
        entry[0] += 1
        entry[1] += us
    engine.shutdown()
    n = max(steps[0], 1)
    rows = sorted(((name, calls / n, us / n) for name, (calls, us) in totals.items()), key=lambda r: -r[2])
    return dict(steps=steps[0], us_per_step=sum(r[2] for r in rows), per_step=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--methods", nargs="+", default=["ngram"], help="speculative_config methods beside plain")
    parser.add_argument("--k", type=int, default=5, help="num_speculative_tokens")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--top", type=int, default=12, help="kernel names printed per variant")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test with a tiny random model")
    args = parser.parse_args(argv)
    if args.k < 1 or args.max_tokens < 1 or args.top < 1:
        parser.error(f"--k, --max-tokens and --top must be >= 1, got {args.k}, {args.max_tokens}, {args.top}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if device.type == "cpu" and not args.quick:
        print("no CUDA device: run with --quick for a CPU smoke test", file=sys.stderr)
        return 2
    if args.quick:
        args.max_tokens = min(args.max_tokens, 16)
    llm, heads_dir = base_llm(argparse.Namespace(model=None), device)
    ids = prompt_ids(llm, llm.llm_engine.model_config.vocab_size)
    variants = [("plain", None)]
    for method in args.methods:
        spec = {"method": method, "num_speculative_tokens": args.k}
        if method in ("eagle", "eagle_tree", "medusa", "medusa_tree", "mtp"):
            spec["model"] = heads_dir
        variants.append((method, spec))
    results = {}
    for label, spec in variants:
        res = results[label] = step_kernels(llm, spec, ids, args.max_tokens, device)
        what, calls = ("kernels", "launches") if device.type == "cuda" else ("CPU ops", "op calls")
        print(f"{label}: {res['steps']} steps, {res['us_per_step']:.1f} us of {what} per step, "
              f"{sum(r[1] for r in res['per_step']):.1f} {calls} per step")
        for name, calls, us in res["per_step"][:args.top]:
            print(f"  {us:9.1f} us {calls:6.1f}x  {name}")
    record = dict(command="python benchmarks/profile_spec_step.py " + " ".join(argv if argv is not None else
                                                                              sys.argv[1:]),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), k=args.k,
                  max_tokens=args.max_tokens, results=results)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
