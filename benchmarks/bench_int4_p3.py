"""P3 in one run: every INT4 weight-only GEMM candidate, the dispatcher's pick and cuBLAS bf16 (issue 10).

    python benchmarks/bench_int4_p3.py --out int4_p3_h200.json      # one H200, < 2 minutes
    python benchmarks/bench_int4_p3.py --dry-run                      # CPU: candidate counts, no timing
    python benchmarks/bench_int4_p3.py --dtype float16                # fp16 activations (vLLM's AWQ/GPTQ dtype)

For the decoder's four Llama-3-8B shapes and 4096->14336 (g128 asymmetric, GPTQ layout) at M = 1 .. 256:
  bf16     cuBLAS (F.linear) on the dequantised weight: the baseline;
  best     the fastest correct launch among the dispatcher's candidates (int4_dispatch.candidates: int4_gemm.py's
           two paths, int4_mma.py's two kernels, int4_gemv.py with one row per program and, for M = 3..4, with all rows in one
           (gemv_rows), and from M = 16 dequantise-then-cuBLAS), and the fastest of each kernel on its own;
  auto     int4_gemm() itself: int4_dispatch.py's pick (timed by do_bench on its first call per shape).
Every launch is checked against x @ dequantize_int4(W)^T in fp32 (max error <= 1% of max|y|, the dispatcher's
rule) before it is timed; a wrong one is reported and never ranked. Timing: a CUDA graph of 20 launches replayed
5 times, median us per launch, weights rotated over enough copies to stay out of the 50 MB L2 (cold, as in a
decode step); bf16 is timed the same way in the same run, and the copy bandwidth of this run gives the INT4
read floor. Prints a table per shape, then the P3 verdict lines; writes everything to --out as JSON. With
--dtype float16 the activations, scales and the cuBLAS baseline are fp16 (the "bf16" column is then cuBLAS fp16,
which reads the same bytes) and the GEMV takes its 64-bit activation path.
"""
from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_int4_gemm import (GROUP, cold_operands, copy_bandwidth, gpu_bench_args, require_cuda,  # noqa: E402
                             row_operands, time_graph_us, weight_bytes, write_result)

SHAPES = {"4096->14336": (4096, 14336), "4096->6144": (4096, 6144), "4096->4096": (4096, 4096),
          "4096->28672": (4096, 28672), "14336->4096": (14336, 4096)}  # (K, N): P3's shape, then a decoder layer
MS = (1, 2, 4, 8, 16, 32, 64, 256)
P3_M1_US = 12.0  # P3: M = 1 on 4096->14336 within 12 us ...
P3_SPEEDUP = 2.5  # ... and >= 2.5x cuBLAS bf16 at every M <= 16
KERNELS = ("fma", "gemv", "gemv_rows", "dot", "mma", "mma_tile", "wgmma", "dequant")  # gemv_rows: int4_gemv.py with BLOCK_M > 1


def launches_for(m: int, n: int, k: int, sms: int, dtype=None) -> list:
    """Every candidate launch the dispatcher would time for this call (bf16 activations unless dtype)."""
    import torch

    from minillm.kernels.int4_dispatch import candidates

    return candidates(m, n, k, GROUP, dtype or torch.bfloat16, sms)


def _name(lc) -> str:
    if lc.kernel == "dequant":
        return f"dequant x{lc.split_k} slices"
    return (f"{lc.kernel} M{lc.block_m} N{lc.block_n} K{lc.block_k} w{lc.num_warps} sk{lc.split_k}"
            + (" prefetch" if lc.prefetch else ""))


def run_shape(label: str, k: int, n: int, sms: int, copy_bw: float, deadline: float, dtype=None) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from minillm.kernels.int4_dispatch import run_launch, tuned_launch
    from minillm.kernels.int4_gemm import int4_gemm

    copies, sets, ref_w, bf16_copies = cold_operands(k, n, dtype)
    rows = []
    for m in MS:
        x, ref, tol, y, ws, cnt = row_operands(m, k, n, ref_w, dtype)
        row = dict(shape=label, K=k, N=n, M=m, floor_us=weight_bytes(k, n, m) / copy_bw * 1e6)
        row["bf16_us"] = time_graph_us(lambda i: F.linear(x, bf16_copies[i]), len(bf16_copies))
        auto_err = (int4_gemm(x, *sets[0], GROUP).float() - ref).abs().max().item()  # tunes on this first call
        row["auto_us"] = time_graph_us(lambda i: int4_gemm(x, *sets[i], GROUP), copies)
        row["auto_ok"] = auto_err <= tol
        pick = tuned_launch(m, n, k, GROUP, x.dtype, x.device)
        row["auto_pick"] = vars(pick) if pick is not None else None
        row["launches"] = []
        for lc in launches_for(m, n, k, sms, x.dtype):
            kind = "gemv_rows" if lc.kernel == "gemv" and lc.block_m > 1 else lc.kernel
            rec = dict(name=_name(lc), kind=kind, launch=vars(lc))
            if time.time() > deadline:
                rec.update(ok=False, us=math.nan, error="skipped: time budget")
                row["launches"].append(rec)
                continue

            def step(i, lc=lc):
                run_launch(lc, x, *sets[i], GROUP, None, y, ws, cnt)
            try:
                y.fill_(float("nan"))
                step(0)
                err = (y.float() - ref).abs().max().item()
                rec.update(ok=err <= tol, max_err=err)
                rec["us"] = time_graph_us(step, copies) if rec["ok"] else math.nan
            except Exception as exc:  # noqa: BLE001  (a launch this Triton cannot run: recorded, not fatal)
                rec.update(ok=False, us=math.nan, error=f"{type(exc).__name__}: {str(exc)[:160]}")
            row["launches"].append(rec)
        good = [r for r in row["launches"] if r["ok"]]
        best = min(good, key=lambda r: r["us"]) if good else None
        row["best_us"], row["best"] = (best["us"], best["name"]) if best else (math.nan, None)
        row["best_by_kernel"] = {kind: min((r["us"] for r in good if r["kind"] == kind), default=math.nan)
                                 for kind in KERNELS}
        row["n_bad"] = sum(1 for r in row["launches"] if not r["ok"] and "skipped" not in r.get("error", ""))
        rows.append(row)
        _print_row(row)
    del sets, bf16_copies, ref_w
    torch.cuda.empty_cache()
    return rows


def _print_row(r: dict) -> None:
    x = lambda us: r["bf16_us"] / us if us == us else math.nan  # noqa: E731
    kinds = " ".join(f"{kind} {us:.1f}" for kind, us in r["best_by_kernel"].items() if us == us)
    print(f"{r['shape']:>12} M={r['M']:<4} bf16 {r['bf16_us']:7.1f} | best {r['best_us']:7.1f} "
          f"({x(r['best_us']):4.2f}x) | auto {r['auto_us']:7.1f}{'' if r['auto_ok'] else ' WRONG'} "
          f"({x(r['auto_us']):4.2f}x) | floor {r['floor_us']:5.1f} | {r['best']} | {kinds}"
          + (f"  ({r['n_bad']} wrong/failed)" if r["n_bad"] else ""), flush=True)


def verdict(rows: list[dict]) -> list[str]:
    """The P3 lines: M = 1 on 4096->14336 within 12 us, and >= 2.5x bf16 at each M <= 16 (best and auto)."""
    lines = []
    m1 = [r for r in rows if r["shape"] == "4096->14336" and r["M"] == 1]
    if m1:
        r = m1[0]
        lines.append(f"P3 M=1 4096->14336: best {r['best_us']:.1f} us, auto {r['auto_us']:.1f} us (bf16 "
                     f"{r['bf16_us']:.1f}, floor {r['floor_us']:.1f}): <= {P3_M1_US} us? "
                     f"{'YES' if min(r['best_us'], r['auto_us']) <= P3_M1_US else 'NO'}")
    for shape in SHAPES:
        small = [r for r in rows if r["shape"] == shape and r["M"] <= 16]
        if small:
            parts = [f"M={r['M']} {r['bf16_us'] / min(r['best_us'], r['auto_us']):.2f}x" for r in small]
            ok = all(r["bf16_us"] / min(r["best_us"], r["auto_us"]) >= P3_SPEEDUP for r in small)
            lines.append(f"P3 >= {P3_SPEEDUP}x bf16 at M <= 16, {shape}: {', '.join(parts)}: {'YES' if ok else 'NO'}")
        big = [r for r in rows if r["shape"] == shape and r["M"] >= 32]
        if big:
            parts = [f"M={r['M']} {r['bf16_us'] / r['best_us']:.2f}x" for r in big]
            lines.append(f"prefill-sized M vs bf16 (target ~0.9x at M >= 64), {shape}: {', '.join(parts)}")
    return lines


def dry_run() -> None:
    import minillm  # noqa: F401

    for label, (k, n) in SHAPES.items():
        counts = {m: len(launches_for(m, n, k, 132)) for m in MS}
        print(f"{label:>12}: launches to time per M {counts}")


def main() -> None:
    parser = gpu_bench_args(__doc__, "benchmarks/results/int4_p3.json", "CPU: launch counts only", 100.0)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = parser.parse_args()
    if args.dry_run:
        dry_run()
        return
    t_start = time.time()
    torch = require_cuda("this benchmark")
    from minillm.kernels import int4_dispatch

    dtype = getattr(torch, args.dtype)
    try:  # fill Triton's disk cache in worker processes
        int4_dispatch.precompile([(m, n, k, GROUP, dtype) for k, n in SHAPES.values() for m in MS],
                                 args.workers)
    except Exception as exc:  # noqa: BLE001
        print(f"parallel precompile failed ({type(exc).__name__}: {exc}); compiling lazily", file=sys.stderr)
    print(f"compiled in {time.time() - t_start:.0f} s", flush=True)
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: {sms} SMs, copy bandwidth {copy_bw / 1e12:.2f} TB/s; times in us per "
          f"call (graph replay, cold weights), x = bf16 time / INT4 time", flush=True)
    rows = []
    per_shape = (args.budget_s - (time.time() - t_start)) / len(SHAPES)
    for label, (k, n) in SHAPES.items():
        rows += run_shape(label, k, n, sms, copy_bw, time.time() + max(per_shape, 10.0), dtype)
    lines = verdict(rows)
    print()
    print("\n".join(lines))
    write_result(args.out, t_start, copy_bw, rows=rows, verdict=lines, dtype=args.dtype)


if __name__ == "__main__":
    main()
