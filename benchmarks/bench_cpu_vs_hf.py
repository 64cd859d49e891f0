"""The CPU path against Hugging Face generate: decode speed of `LLM()` on the bundled SmolLM2-135M, fp32.

    python benchmarks/bench_cpu_vs_hf.py [--batch 1 8] [--prompt-len 32] [--output-len 48] [--repeats 3]
                                         [--llm-kw '{"quantization": ...}'] [--out results.json]

The CPU path is what every learner runs first (`make run`, the notebooks), so it should not be slower than the
library it is checked against. Both engines get the same prompts (random token ids, the same for both), greedy,
exactly `output_len` new tokens (ignore_eos / min_new_tokens), on the same weights (the GGUF dequantized to fp32)
and the same torch thread count. Each (engine, batch) pair is warmed up once, then timed `repeats` times; the
engines alternate repeat by repeat, so a burst of load from another process on a shared machine hits both alike.
Reported: the median and the best output tok/s (output tokens / wall seconds, the prefill included, as a user
waits for it), the ratio ours / HF, whether the greedy tokens agree, and the load average before and after; and
the matmul layouts the CPU path chose per (N, K, bias, row class) with the bytes of weight copies they keep
(minillm.layers.cpu_matmul; MINILLM_CPU_MATMUL=linear gives the plain F.linear path to compare against).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time


def llm_runner(llm, prompts: list[list[int]], output_len: int):
    from minillm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    def run() -> tuple[float, list[list[int]]]:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]
    return run


def hf_runner(model, prompts: list[list[int]], output_len: int):
    import torch
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0, max_new_tokens=output_len, min_new_tokens=output_len)

    def run() -> tuple[float, list[list[int]]]:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            elapsed = time.perf_counter() - start
        return elapsed, out[:, ids.shape[1]:].tolist()
    return run


def summarise(times: list[float], n_tokens: int) -> dict:
    rates = [n_tokens / t for t in times]
    return dict(seconds=[round(t, 4) for t in times], output_tokens=n_tokens,
                median_tok_per_s=round(statistics.median(rates), 2), best_tok_per_s=round(max(rates), 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llm-kw", default="{}", help="JSON dict of extra LLM(...) arguments, e.g. a quantization")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    for name in ("prompt_len", "output_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.batch):
        parser.error(f"--batch sizes must be >= 1, got {args.batch}")
    import torch

    from minillm import LLM
    from minillm.loader.model_files import default_model_path
    if torch.cuda.is_available():
        print("note: this benchmark times the CPU path; CUDA is present but unused", file=sys.stderr)
    llm_kw = json.loads(args.llm_kw)
    llm = LLM(device="cpu", **llm_kw)
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM
        path = default_model_path()
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                  dtype=torch.float32).eval()
    results: dict = dict(benchmark="CPU path vs HF generate", device="cpu", torch=torch.__version__,
                         threads=torch.get_num_threads(), llm_kw=llm_kw,
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         command="python benchmarks/bench_cpu_vs_hf.py " + " ".join(argv or sys.argv[1:]),
                         prompt_len=args.prompt_len, output_len=args.output_len, repeats=args.repeats,
                         load_before=[round(x, 2) for x in os.getloadavg()], runs={})
    gen = torch.Generator().manual_seed(0)
    for batch in args.batch:
        prompts = torch.randint(100, 40000, (batch, args.prompt_len), generator=gen.manual_seed(batch)).tolist()
        runners = {"minillm": llm_runner(llm, prompts, args.output_len)}
        if hf is not None:
            runners["hf_generate"] = hf_runner(hf, prompts, args.output_len)
        times: dict[str, list[float]] = {name: [] for name in runners}
        tokens: dict[str, list[list[int]]] = {}
        for name, run in runners.items():  # warm-up (allocator, thread pool, HF's first-call set-up)
            run()
        for _ in range(args.repeats):
            for name, run in runners.items():
                elapsed, tokens[name] = run()
                times[name].append(elapsed)
        n_tokens = batch * args.output_len
        entry = {name: summarise(t, n_tokens) for name, t in times.items()}
        if hf is not None:
            ours, theirs = tokens["minillm"], tokens["hf_generate"]
            same = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y))
            entry["greedy_token_agreement"] = round(same / n_tokens, 4)
            entry["ratio_median"] = round(entry["minillm"]["median_tok_per_s"] / entry["hf_generate"]["median_tok_per_s"], 3)
            entry["ratio_best"] = round(entry["minillm"]["best_tok_per_s"] / entry["hf_generate"]["best_tok_per_s"], 3)
        results["runs"][f"b{batch}"] = entry
        print(f"batch {batch}:", json.dumps(entry), flush=True)
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    from minillm.layers.cpu_matmul import cpu_matmul_decisions, cpu_matmul_extra_bytes, cpu_matmul_mode
    results["cpu_matmul"] = dict(mode=cpu_matmul_mode(), extra_mb=round(cpu_matmul_extra_bytes() / 2**20, 1),
                                 decisions={f"{n}x{k}{'+b' if b else ''} rows {c}": choice
                                            for (n, k, b, c), choice in sorted(cpu_matmul_decisions().items())})
    print(f"\nCPU, SmolLM2-135M fp32, {results['threads']} threads, prompt {args.prompt_len}, {args.output_len} new "
          f"tokens, greedy; load average {results['load_before']} -> {results['load_after']}")
    print(f"{'batch':>5}{'ours med':>10}{'ours best':>10}{'HF med':>9}{'HF best':>9}{'ratio med':>11}{'best':>7}"
          f"{'agree':>7}")
    for name, entry in results["runs"].items():
        hf_e = entry.get("hf_generate", {})
        print(f"{name[1:]:>5}{entry['minillm']['median_tok_per_s']:>10}{entry['minillm']['best_tok_per_s']:>10}"
              f"{hf_e.get('median_tok_per_s', '-'):>9}{hf_e.get('best_tok_per_s', '-'):>9}"
              f"{entry.get('ratio_median', '-'):>11}{entry.get('ratio_best', '-'):>7}"
              f"{entry.get('greedy_token_agreement', '-'):>7}")
    print(f"CPU matmul ({results['cpu_matmul']['mode']}, {results['cpu_matmul']['extra_mb']} MB of weight copies): "
          + ", ".join(f"{key}: {c}" for key, c in results["cpu_matmul"]["decisions"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
