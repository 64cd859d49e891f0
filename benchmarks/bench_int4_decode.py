"""End-to-end INT4 decode (issue 10, chapter 8): decode of a Llama-3-8B-shaped model, bf16 against 4-bit.

    python benchmarks/bench_int4_decode.py [--quick] [--group-size 128] [--async-scheduling] [--int4-dtype float16]
                                           [--lm-head] [--batch 1] [--pdl {on,off,ab}] [--out results.json]

Both runs go through the same engine (LLMEngine, paged KV, CUDA graphs) on the same random bf16 weights
(bench_decode.py's model). The INT4 run rounds every decoder linear to 4-bit asymmetric codes in groups of
--group-size input channels (round-to-nearest at load: `quantization="rtn"`), packs them in GPTQ's layout and
computes with minillm.kernels.int4_gemm through quant.int4.int4_linear. AWQ and GPTQ checkpoints end in exactly
this layout and kernel (AWQ's words are repacked at load), so the speed is theirs too: decode speed does not
depend on the values, only on the bytes read. The embedding and the LM head stay bf16 (as in AWQ/GPTQ models);
--lm-head rounds the head too (RTN's lm_head=True, GPTQModel's option): 1.05 GB of bf16 rows, read once per
step, become ~0.28 GB.

The figure of merit: INT4 decode tok/s over bf16 decode tok/s in the same run at batch 1 (target >= 2.5x, P3's
end-to-end half); --batch B decodes B requests at once (the INT4 GEMMs then run with M = B rows: the GEMV up to
M = 4, int4_mma beyond). --async-scheduling runs both with the engine's async scheduling (the host prepares step
N + 1 while the GPU runs step N), which takes the ~1 ms of host work per step off the clock. Weight bytes shrink
from 16.06 GB to about 5.0 GB (4.5 bits per weight with scales and zeros, plus the bf16 embedding and head), so the
floor ratio is about 3.2x. --int4-dtype float16 runs the INT4 model in fp16 (as
vLLM serves AWQ and GPTQ checkpoints; the GEMV then reads activations as 64-bit words), against the same bf16
baseline: both read the same bytes per dense weight.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time

import torch

from bench_decode import build_model, copy_bandwidth, run_engine, weight_bytes
from minillm.kernels import pdl as pdl_module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 output tokens instead of 256")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--async-scheduling", action="store_true", help="both runs with async scheduling")
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a smoke test (not for figures)")
    parser.add_argument("--batch", type=int, default=1, help="requests decoded together (default 1)")
    parser.add_argument("--int4-dtype", choices=["bfloat16", "float16"], default="bfloat16",
                        help="the INT4 model's activations (the baseline stays bf16)")
    parser.add_argument("--lm-head", action="store_true",
                        help="also round the LM head to 4-bit (RTN's lm_head=True; the bf16 baseline stays dense)")
    parser.add_argument("--pdl", choices=["on", "off", "ab"], default="on",
                        help="programmatic dependent launch (kernels/pdl.py): on (the default), off, or ab: each "
                             "model without it, then with it, in this process")
    parser.add_argument("--out", default=None, help="write the raw results here as JSON")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if not torch.cuda.is_available():
        print("bench_int4_decode needs CUDA (the INT4 kernel replaces the reference matmul only on a GPU)")
        return 1
    output_len = 64 if args.quick else 256
    bandwidth = copy_bandwidth()
    rows = {}
    models = (("bf16", lambda: build_model(args.layers)),
              (f"int4 g{args.group_size}",
               lambda: build_model(args.layers, "rtn", {"bits": 4, "group_size": args.group_size,
                                                        "lm_head": args.lm_head}, dtype=args.int4_dtype)))
    settings = {"on": [(True, "")], "off": [(False, "")], "ab": [(False, " no PDL"), (True, "")]}[args.pdl]
    for (name, build), (pdl, suffix) in [(m, p) for m in models for p in settings]:
        label = name + suffix
        pdl_module.set_enabled(pdl)  # read at every launch: the graphs of this engine are captured with it
        t0 = time.perf_counter()
        model, config = build()
        nbytes = weight_bytes(model)
        result = run_engine(model, config, prompt_len=128, output_len=output_len, batch=args.batch,
                            enforce_eager=False,
                            async_scheduling=args.async_scheduling)
        result.update(weight_gb=round(nbytes / 1e9, 3), build_s=round(time.perf_counter() - t0, 1),
                      floor_tok_per_s=round(args.batch * bandwidth / nbytes, 1))  # a step reads the weights once
        result["fraction_of_floor"] = round(result["decode_tok_per_s"] / result["floor_tok_per_s"], 3)
        rows[label] = result
        print(f"{label:>10}: {result['decode_tok_per_s']:8.1f} tok/s  ({result['ms_per_step']:.2f} ms/step, "
              f"{nbytes / 1e9:.2f} GB of weights, {100 * result['fraction_of_floor']:.0f}% of the floor)", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    base, int4 = rows["bf16"], rows[f"int4 g{args.group_size}"]
    speedup = int4["decode_tok_per_s"] / base["decode_tok_per_s"]
    print(f"INT4 / bf16 decode speed at batch {args.batch}: {speedup:.2f}x (target >= 2.5x at batch 1)")
    if args.pdl == "ab":
        for name, _ in models:
            gain = rows[name]["decode_tok_per_s"] / rows[name + " no PDL"]["decode_tok_per_s"]
            print(f"{name}: PDL on / off {gain:.3f}x")
    record = dict(command=" ".join(["benchmarks/bench_int4_decode.py", *(argv or sys.argv[1:])]),
                  device=torch.cuda.get_device_name(), torch=torch.__version__, date=str(datetime.date.today()),
                  copy_bandwidth_tb_s=round(bandwidth / 1e12, 3), output_len=output_len, runs=rows,
                  int4_dtype=args.int4_dtype, lm_head=args.lm_head, pdl=args.pdl, batch=args.batch,
                  int4_over_bf16=round(speedup, 3))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
