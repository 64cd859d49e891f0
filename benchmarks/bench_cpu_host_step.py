"""Host time of one engine step, by part, on a CPU with a toy model (issue 14, item 6).

    python benchmarks/bench_cpu_host_step.py [--batch 1 64 256] [--prompt-len 128] [--steps 30]
                                             [--tokenizer smollm2|none] [--ab BASELINE_TREE] [--out results.json]

On the H200, P6 (256 requests) spends about 6.7 ms of host work per step while the GPU idles (benchmarks/RESULTS.md,
"P6, the step-time breakdown"): scheduling, building the step's input, laying out its tensors, post-processing,
and the per-request output loop (stop checks, incremental detokenization, a RequestOutput per request). That work
does not depend on the device, so it can be measured here, with a model so small (hidden 64, 2 layers) that the
forward is a sliver of the step, and cut here.

Each part is timed by wrapping the engine's own methods, in *thread CPU time* (time.thread_time: other processes on
a shared machine do not inflate it; torch runs single-threaded here so the forward's work is on this thread too):

    schedule     Scheduler.schedule: block tables grown, batch chosen
    build        build_step_input: the step's plain lists
    prepare      ModelRunner.prepare: the step's tensors, one upload
    forward      ModelRunner.forward (the toy's compute; reported, not host overhead)
    sample       the rest of execute_model: logits, argmax, the download, the per-sequence token lists
    postprocess  Scheduler.postprocess: new tokens appended, computed counts
    output       the rest of LLMEngine.step: stop checks, detokenizer, RequestOutputs

`--tokenizer smollm2` detokenizes with the bundled SmolLM2 tokenizer (what LLM() does); `none` returns "" (what
bench_scheduling's random-weights P6 does). `--ab TREE` runs the same measurement with another minillm source tree
(e.g. `git archive HEAD~3 minillm | tar -x -C /tmp/base`) in a subprocess, alternately, and prints both.
Medians over --steps decode steps; the load average is recorded with every run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PARTS = ("schedule", "build", "prepare", "forward", "sample", "postprocess", "output")


def measure(batch: int, prompt_len: int, steps: int, tokenizer: str) -> dict:
    """Median thread-CPU ms per decode step, by part, for `batch` requests decoding together."""
    import torch
    torch.set_num_threads(1)
    import minillm.engine.llm_engine as llm_engine
    from minillm.config import EngineConfig, ModelConfig
    from minillm.engine.worker import RandomWeights
    from minillm.sampling_params import SamplingParams

    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    model = RandomWeights(0)(config, torch.device("cpu"), torch.float32)
    if tokenizer == "smollm2":
        from minillm.loader.model_files import default_model_path
        from minillm.loader.tokenizer import Tokenizer
        tok = Tokenizer.from_gguf(default_model_path())
    else:
        from minillm.loader.no_tokenizer import NoTokenizer
        tok = NoTokenizer()
    max_len = (prompt_len + steps + 32 + 15) // 16 * 16
    engine_config = EngineConfig(max_model_len=max_len, max_num_seqs=batch, block_size=16,
                                 num_kv_blocks=(batch + 1) * (max_len // 16),
                                 max_num_batched_tokens=max(max_len, prompt_len * batch))
    engine = llm_engine.LLMEngine(model, tok, config, engine_config, device="cpu", dtype=torch.float32)
    clock = time.thread_time
    spent = dict.fromkeys(PARTS, 0.0)

    def timed(part: str, fn):
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += clock() - start
        return wrapper
    runner, scheduler = engine.runner, engine.scheduler
    scheduler.schedule = timed("schedule", scheduler.schedule)
    scheduler.postprocess = timed("postprocess", scheduler.postprocess)
    build = llm_engine.build_step_input
    llm_engine.build_step_input = timed("build", build)
    runner.prepare = timed("prepare", runner.prepare)
    runner.forward = timed("forward", runner.forward)
    execute = engine.executor.execute_model
    engine.executor.execute_model = timed("sample", execute)  # minus prepare and forward, below
    try:
        gen = torch.Generator().manual_seed(0)
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        for _ in range(batch):
            engine.add_request(None, torch.randint(0, config.vocab_size, (prompt_len,), generator=gen).tolist(), params)
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in scheduler.running) or scheduler.waiting:
            engine.step()  # prefills, untimed
        engine.step()
        rows = []
        for _ in range(steps):
            spent.update(dict.fromkeys(PARTS, 0.0))
            start = clock()
            engine.step()
            total = clock() - start
            row = dict(spent)
            row["sample"] -= row["prepare"] + row["forward"]
            row["output"] = total - sum(row[p] for p in PARTS if p != "output")
            row["step"], row["host"] = total, total - row["forward"]
            rows.append(row)
    finally:
        llm_engine.build_step_input = build
    return {key: round(1e3 * statistics.median(r[key] for r in rows), 3) for key in (*PARTS, "step", "host")}


def run_tree(tree: str | None, args: argparse.Namespace, batch: int) -> dict:
    """One measurement in a fresh interpreter, with `tree` (a minillm source tree) first on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if tree:
        env["PYTHONPATH"] = os.path.abspath(tree) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, __file__, "--_one", str(batch), "--prompt-len", str(args.prompt_len), "--steps",
           str(args.steps), "--tokenizer", args.tokenizer]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["load"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokenizer", choices=("smollm2", "none"), default="smollm2")
    parser.add_argument("--ab", default=None, help="a baseline minillm source tree, measured alternately")
    parser.add_argument("--rounds", type=int, default=2, help="alternations per batch with --ab")
    parser.add_argument("--out", default=None)
    parser.add_argument("--_one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prompt_len < 1 or args.steps < 1 or args.rounds < 1 or any(b < 1 for b in args.batch):
        parser.error(f"--prompt-len, --steps, --rounds and --batch must be >= 1, got {args.prompt_len}, "
                     f"{args.steps}, {args.rounds}, {args.batch}")
    if args._one is not None:
        print(json.dumps(measure(args._one, args.prompt_len, args.steps, args.tokenizer)))
        return 0
    trees = {"this tree": None} if args.ab is None else {"baseline": args.ab, "this tree": None}
    results: dict = dict(benchmark="CPU host time per engine step", prompt_len=args.prompt_len, steps=args.steps,
                         tokenizer=args.tokenizer, runs={})
    for batch in args.batch:
        for _ in range(args.rounds if args.ab else 1):
            for name, tree in trees.items():  # alternately, so a burst of load hits both
                results["runs"].setdefault(f"b{batch}", {}).setdefault(name, []).append(run_tree(tree, args, batch))
    print(f"\nthread CPU ms per decode step (median of {args.steps}), toy model, prompt {args.prompt_len}, "
          f"tokenizer {args.tokenizer}; min over rounds")
    print(f"{'batch':>5} {'tree':<10}" + "".join(f"{p:>12}" for p in (*PARTS, "host")) + "   load")
    for key, by_tree in results["runs"].items():
        for name, runs in by_tree.items():
            best = {p: min(r[p] for r in runs) for p in (*PARTS, "host")}
            print(f"{key[1:]:>5} {name:<10}" + "".join(f"{best[p]:>12.3f}" for p in (*PARTS, "host"))
                  + f"   {runs[-1]['load']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
