"""How fast can P6's workload run at all? A roofline of the whole run, not of one kernel (issue 14, item 4).

    python benchmarks/p6_bound.py                                   (the H200's figures measured 2026-12-02)
    python benchmarks/p6_bound.py --bandwidth 4.24e12 --peak 7.0e14 --measured 10031 --out p6_bound.json

P6 (benchmarks/bench_scheduling.py) serves 256 requests with input and output lengths uniform in 100..1024 on a
Llama-3-8B-shaped model in bf16. Whatever the scheduler does, the run must
  * read every weight once per forward step, and there are at least max(output length) steps, because a request's
    tokens come one per step (no speculation here);
  * read, for every generated token, the K and V of every position before it (128 KB per position in this model);
  * do 2 x (parameters touched) FLOPs per token for the GEMMs, prompt tokens included.
An engine that runs one kernel at a time (ours, vLLM's, HF's) spends on attention's KV reads time that the GEMMs
cannot use, so with B the HBM bandwidth and F the GEMM rate

    T >= KV_bytes / B + max(steps x weight_bytes / B, gemm_flops / F)                        (a lower bound)

because a sum of per-step maxima is at least the maximum of the sums. The bound holds for every schedule: chunked
prefill that fills decode's idle compute is as good as it gets. A second figure, "prefill first", prices the
schedule the engine actually follows at P6 (the prompts' prefills, then decode steps whose batch drains as
requests finish): per step max(weights / B, flops / F) + its KV / B. Neither counts launch gaps, norms,
activations, sampling or the host: real runs sit above both.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scheduling import LLAMA3_8B, p6_lengths  # noqa: E402

BYTES = 2  # bf16 weights and KV


def model_sizes(cfg: dict) -> tuple[int, int, int]:
    """(parameters of the decoder layers' linears, of the LM head, KV bytes per cached position)."""
    d, ffn, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * ffn  # q, k, v, o, gate, up, down
    return layers * per_layer, d * cfg["vocab_size"], layers * 2 * kv * BYTES


def bound(in_lens: list[int], out_lens: list[int], bandwidth: float, peak: float, cfg: dict = LLAMA3_8B) -> dict:
    """Lower bound and prefill-first estimate (seconds, output tokens/s) of serving these requests."""
    layer_params, head_params, kv_per_pos = model_sizes(cfg)
    weight_bytes = (layer_params + head_params) * BYTES
    steps = max(out_lens)
    # a request of input p and output n: its first token comes from the prefill, then n - 1 decode steps, the one
    # at position p + t reading p + t cached positions (t = 0 .. n - 2)
    kv_positions = sum((n - 1) * p + (n - 1) * (n - 2) // 2 for p, n in zip(in_lens, out_lens))
    prompt_tokens, decode_tokens = sum(in_lens), sum(n - 1 for n in out_lens)
    flops = 2 * layer_params * (prompt_tokens + decode_tokens) + 2 * head_params * sum(out_lens)
    kv_s, weights_s, gemm_s = kv_positions * kv_per_pos / bandwidth, steps * weight_bytes / bandwidth, flops / peak
    lower = kv_s + max(weights_s, gemm_s)
    # prefill first (at least one forward: compute-bound at P6's sizes), then decode steps, the batch draining
    prefill_s = max(weight_bytes / bandwidth, 2 * layer_params * prompt_tokens / peak)
    decode_s = 0.0
    for t in range(steps - 1):
        running = [(p, n) for p, n in zip(in_lens, out_lens) if n - 1 > t]
        if not running:
            break
        step_flops = 2 * (layer_params + head_params) * len(running)
        kv_bytes = sum(p + t for p, _ in running) * kv_per_pos
        decode_s += max(weight_bytes / bandwidth, step_flops / peak) + kv_bytes / bandwidth
    out_tokens = sum(out_lens)
    return {"output_tokens": out_tokens, "steps_at_least": steps, "weight_bytes": weight_bytes,
            "kv_bytes": kv_positions * kv_per_pos, "gemm_tflop": flops / 1e12,
            "seconds": {"kv_reads": kv_s, "weight_reads": weights_s, "gemm": gemm_s, "lower_bound": lower,
                        "prefill_first": prefill_s + decode_s, "prefill_first_prefill": prefill_s},
            "tok_s": {"lower_bound": out_tokens / lower, "prefill_first": out_tokens / (prefill_s + decode_s)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth", type=float, default=4.24e12, help="HBM bytes/s (copy, read + write)")
    parser.add_argument("--peak", type=float, default=7.0e14, help="bf16 GEMM FLOP/s (cuBLAS 8192^3)")
    parser.add_argument("--measured", type=float, default=10031.0, help="a measured P6 output tok/s to compare")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for name, value in (("bandwidth", args.bandwidth), ("peak", args.peak), ("measured", args.measured)):
        if not value > 0:
            raise SystemExit(f"--{name} must be > 0, got {value}")
    _, in_lens, out_lens = p6_lengths()
    result = bound(in_lens, out_lens, args.bandwidth, args.peak)
    s, r = result["seconds"], result["tok_s"]
    print(f"P6: {len(in_lens)} requests, {result['output_tokens']:,} output tokens, >= {result['steps_at_least']} "
          f"steps; bandwidth {args.bandwidth / 1e12:.2f} TB/s, GEMM {args.peak / 1e12:.0f} TFLOP/s")
    print(f"  KV reads {result['kv_bytes'] / 1e12:.1f} TB: {s['kv_reads']:.2f} s; weight reads "
          f"{result['steps_at_least']} x {result['weight_bytes'] / 1e9:.1f} GB: {s['weight_reads']:.2f} s; "
          f"GEMMs {result['gemm_tflop']:,.0f} TFLOP: {s['gemm']:.2f} s")
    print(f"  lower bound  {s['lower_bound']:6.2f} s = {r['lower_bound']:8,.0f} output tok/s")
    print(f"  prefill first {s['prefill_first']:5.2f} s = {r['prefill_first']:8,.0f} output tok/s "
          f"(prefill {s['prefill_first_prefill']:.2f} s)")
    print(f"  measured {args.measured:,.0f} tok/s = {args.measured / r['lower_bound']:.0%} of the lower bound, "
          f"{args.measured / r['prefill_first']:.0%} of prefill-first; 12,500 would be "
          f"{12500 / r['lower_bound']:.0%} / {12500 / r['prefill_first']:.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "date": datetime.date.today().isoformat(),
                       "bandwidth": args.bandwidth, "peak": args.peak, "measured": args.measured, **result}, f,
                      indent=1)


if __name__ == "__main__":
    main()
