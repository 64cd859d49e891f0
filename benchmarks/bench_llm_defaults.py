"""What a user gets from `LLM()` with no options: decode speed on the bundled SmolLM2, default vs eager vs HF.

    python benchmarks/bench_llm_defaults.py [--batch 1 8] [--output-len 256] [--out results.json]

Each run: `batch` requests of a 128-token prompt (the same random ids for every variant), greedy, ignore_eos,
`output_len` new tokens, timed after a warm-up. Variants in one process, one after another:
  default        LLM()                        (on CUDA: Triton kernels + CUDA graphs for decode)
  eager          LLM(enforce_eager=True)      (what the default was before it was resolved per device)
  hf_generate    transformers' generate on the same GGUF weights (the baseline of the same run)
Prints a table and writes the raw numbers as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time


def time_llm(llm, prompts: list[list[int]], output_len: int) -> dict:
    from minillm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([p[:16] for p in prompts], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    result = dict(seconds=round(elapsed, 4), output_tokens=n_out, output_tok_per_s=round(n_out / elapsed, 2),
                  tokens=[o.outputs[0].token_ids[:8] for o in outs])
    return result


def time_hf(path: str, prompts: list[list[int]], output_len: int, device: str) -> dict:
    import os

    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 torch_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = model.to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:, :16], max_new_tokens=8, min_new_tokens=8, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    n_out = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return dict(seconds=round(elapsed, 4), output_tokens=n_out, output_tok_per_s=round(n_out / elapsed, 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    from minillm import LLM
    from minillm.loader.model_files import default_model_path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = default_model_path()
    results: dict = dict(benchmark="LLM() defaults", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                         date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         command="python benchmarks/bench_llm_defaults.py " + " ".join(argv or sys.argv[1:]),
                         torch=torch.__version__, prompt_len=args.prompt_len, output_len=args.output_len, runs={})
    gen = torch.Generator().manual_seed(0)
    for name, kw in (("default", {}), ("eager", {"enforce_eager": True})):
        llm = LLM(**kw)
        config = llm.llm_engine.engine_config
        for batch in args.batch:
            prompts = torch.randint(100, 40000, (batch, args.prompt_len), generator=gen.manual_seed(batch)).tolist()
            run = time_llm(llm, prompts, args.output_len)
            run.update(enforce_eager=config.enforce_eager, cuda_graphs=llm.llm_engine.runner.cuda_graphs is not None)
            results["runs"][f"{name}_b{batch}"] = run
            print(name, batch, json.dumps(run), flush=True)
        del llm
        if device == "cuda":
            torch.cuda.empty_cache()
    if not args.no_hf:
        for batch in args.batch:
            prompts = torch.randint(100, 40000, (batch, args.prompt_len), generator=gen.manual_seed(batch)).tolist()
            try:
                run = time_hf(path, prompts, args.output_len, device)
            except Exception as err:  # keep our figures
                run = dict(error=f"{type(err).__name__}: {err}")
            results["runs"][f"hf_generate_b{batch}"] = run
            print("hf_generate", batch, json.dumps(run), flush=True)
    print(f"\nLLM() on {results['device']}, prompt {args.prompt_len}, {args.output_len} new tokens, greedy")
    print(f"{'run':<20}{'tok/s':>10}{'vs HF':>8}")
    for name, run in results["runs"].items():
        hf = results["runs"].get("hf_generate_b" + name.rsplit("_b", 1)[1], {}).get("output_tok_per_s")
        rate = run.get("output_tok_per_s")
        ratio = f"{rate / hf:.2f}x" if rate and hf else "-"
        print(f"{name:<20}{rate if rate else run.get('error', '-'):>10}{ratio:>8}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
