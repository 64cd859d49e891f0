"""Sweep the decode GEMV (kernels/gemv.py) against cuBLAS (F.linear) on Llama-3-8B's and SmolLM2's linear shapes.

    python benchmarks/sweep_gemv.py [--out gemv.json] [--m 1 2 4 8] [--budget-s 100] [--no-pdl]
    python benchmarks/sweep_gemv.py --m 1 2 6 --shapes smol_qkv smol_o smol_gate_up smol_down   (a verify step)
    python benchmarks/sweep_gemv.py --int8 --m 1 4 8 16   (int8 weight-only codes + per-row scales, W8A16)

At decode a linear layer is a weight read: the figure of merit is weight bytes / time as a fraction of the
copy bandwidth measured in the same run (a 1 GiB device-to-device copy, bytes read + written). For each shape
(qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096, lm_head 4096->128256; with --shapes also
SmolLM2-135M's four, whose small matrices make launch and reduction costs the whole story) and M, this
times F.linear and every GemvConfig of the space below (each with the split-K factors that make sense for the
grid), all inside CUDA graphs (what the engine replays), cycling through enough copies of the weight that it
never sits in the 50 MB L2 between calls. Every config is checked against an fp32 reference first.
Prints one row per (shape, M): cuBLAS, the kernel's default_config, the best config, and the best config
again with programmatic dependent launch (PDL: in a chain of calls each one's start overlaps the previous
one's end, as it would after any PDL-aware kernel in the engine); writes every timing to --out.
With --int8 the kernel reads int8 codes and per-row scales (`weight_scale`, int8_rtn's decode path; its bytes
are N*K); cuBLAS stays the bf16 baseline on the same values (N*K*2 bytes), and a third column times what
int8_rtn did before the kernel read its codes: dequantize to bf16, then F.linear.
Needs CUDA; about 1-2 minutes on one H200 (mostly Triton compiles), bounded by --budget-s.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time

# name -> (N, K): Llama-3-8B's, then SmolLM2-135M's (a speculative verify step runs them at M = 1 + k rows)
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096),
          "smol_qkv": (960, 576), "smol_o": (576, 576), "smol_gate_up": (3072, 576), "smol_down": (576, 1536)}
# (block_n, block_k, num_warps, num_stages) per M bucket on CUDA cores; tensor-core tiles for all M.
# Round 1 (H200, 2026-12-02): at M = 1, narrow tiles with long K rows won ((8, 1024) and (8, 512), 4 warps);
# split-K and a software prefetch lost everywhere. Round 2 adds longer rows (one or two load rounds per
# program: all of a row's bytes in flight at once) and more warps per program.
FMA_TILES = {1: [(8, 512, 4, 1), (8, 1024, 4, 1), (4, 1024, 4, 1), (16, 512, 4, 1),
                 (4, 2048, 4, 1), (2, 4096, 4, 1), (2, 2048, 4, 1), (1, 4096, 4, 1), (4, 4096, 8, 1),
                 (8, 2048, 8, 1), (8, 1024, 8, 1), (16, 1024, 8, 1), (4, 1024, 2, 1)],
             2: [(8, 256, 4, 1), (8, 512, 4, 1), (4, 512, 4, 1), (4, 1024, 4, 1), (2, 2048, 4, 1)],
             4: [(4, 256, 4, 1), (8, 256, 4, 1), (4, 512, 4, 1), (2, 1024, 4, 1)],
             # 5..8 rows: the tiles whose [8, block_n, block_k] accumulator fits without spilling (ptxas, sm_90:
             # 104-161 registers; 8 x 4 x 1024 over 2 warps spills)
             8: [(1, 1024, 4, 1), (2, 1024, 8, 1), (1, 1024, 8, 1), (2, 512, 4, 1), (4, 512, 8, 1)]}
# CUDA cores with the sum over K after every tile (reduce_each): wide tiles for M > 1, x re-read less often
REDUCE_TILES = {2: [(32, 256, 4, 1), (16, 512, 4, 1)], 4: [(16, 512, 8, 1), (16, 256, 4, 1)],
                8: [(16, 256, 4, 1), (8, 256, 4, 1), (8, 512, 4, 1), (4, 512, 4, 1)]}
# the last three: narrow tiles, more programs for SmolLM2's small matrices (9 programs of 64 rows fill 9 SMs)
# CUDA cores for M > 1 where a whole row of W fits one tile (K <= 2048): (block_n, num_warps), block_k = K rounded
# up to a power of two; W's tile is read once and each row of x makes one pass over it (GemvConfig.row_passes)
ROW_PASS_TILES = [(1, 1), (2, 2), (4, 2), (4, 4), (8, 4)]
DOT_TILES = [(64, 128, 4, 4), (64, 256, 8, 3), (32, 256, 4, 4), (128, 128, 8, 4), (64, 128, 4, 6),
             (16, 128, 4, 2), (32, 128, 4, 3), (16, 64, 4, 3)]
L2_FLUSH_BYTES = 256 << 20  # cycle through weight copies totalling at least this (H200 L2: 50 MB)
GRAPH_GPU_MS = 2.0  # GPU time per graph replay


def graph_time_us(calls, est_us: float) -> float:
    """Microseconds per call, `calls` (closures over different weight copies) replayed round-robin from one
    CUDA graph; the median of 5 replays."""
    import torch
    for c in calls:
        c()  # compile, grow workspaces: nothing of that may happen during capture
    torch.cuda.synchronize()
    n = max(len(calls), int(GRAPH_GPU_MS * 1e3 / max(est_us, 1.0)))
    n = -(-n // len(calls)) * len(calls)
    from minillm.bench.roofline import graph_us
    return graph_us(lambda i: calls[i % len(calls)](), n)


def split_factors(n: int, k: int, block_n: int, block_k: int, num_sms: int) -> list[int]:
    """Split-K factors worth timing for a tile: 1, and powers of two while the grid is under ~8 waves and every
    split keeps >= 2 K tiles."""
    grid_n = -(-n // block_n)
    out = [1]
    s = 2
    while s <= 16 and grid_n * s <= 8 * num_sms and k // s >= 2 * block_k:
        out.append(s)
        s *= 2
    return out


def configs_for(m: int, n: int, k: int, num_sms: int):
    from minillm.kernels.gemv_config import GemvConfig
    bucket = 1 if m == 1 else 2 if m == 2 else 4 if m <= 4 else 8 if m <= 8 else None
    tiles = [(t, False, False) for t in FMA_TILES.get(bucket, [])] + \
        [(t, False, True) for t in REDUCE_TILES.get(bucket, [])] + [(t, True, False) for t in DOT_TILES]
    for (bn, bk, warps, stages), dot, reduce_each in tiles:
        for s in split_factors(n, k, bn, bk, num_sms) if dot else [1]:  # split-K lost on CUDA cores (round 1)
            yield GemvConfig(block_n=bn, block_k=bk, split_k=s, use_dot=dot, num_warps=warps, num_stages=stages,
                             reduce_each=reduce_each)
    row = 1 << (k - 1).bit_length()
    if m > 1 and row <= 2048:
        for bn, warps in ROW_PASS_TILES:
            yield GemvConfig(block_n=bn, block_k=row, num_warps=warps, row_passes=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write every timing here as JSON")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8], help="rows of x (1..16)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-pdl", dest="pdl", action="store_false",
                        help="skip re-timing each best config with programmatic dependent launch")
    parser.add_argument("--budget-s", type=float, default=100.0, help="stop trying new configs after this")
    parser.add_argument("--int8", action="store_true", help="int8 codes + per-row scales (W8A16) in the kernel")
    args = parser.parse_args(argv)
    if any(not 1 <= m <= 16 for m in args.m):
        parser.error(f"--m values must lie in [1, 16], got {args.m}")
    import torch
    if not torch.cuda.is_available():
        print("sweep_gemv needs a CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    import torch.nn.functional as F
    import triton

    import minillm  # noqa: F401  (platform setup)
    from bench_decode import copy_bandwidth  # the same 1 GiB copy as P5's floor (benchmarks/ is on sys.path)
    from minillm.kernels.gemv import gemv
    from minillm.kernels.gemv_config import GemvConfig, default_config

    t_start = time.perf_counter()
    bw = copy_bandwidth()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    dtype = torch.bfloat16
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = dict(benchmark="gemv sweep", date=now,
                   device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   command="python benchmarks/sweep_gemv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   copy_bytes_per_s=round(bw), num_sms=num_sms, rows=[], entries=[], failures=[], skipped=0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    out_of_time = False
    for m in args.m:  # M outer: when the budget runs out, every shape has its M = 1 figures
        for name in args.shapes:
            n, k = SHAPES[name]
            nbytes = n * k * (1 if args.int8 else 2)  # what the kernel reads
            copies = max(1, -(-L2_FLUSH_BYTES // nbytes))
            if args.int8:  # the codes for the kernel; cuBLAS multiplies the same values in bf16
                scale = torch.rand(n, device="cuda", generator=gen) * 0.02 / 127 + 1e-5
                codes = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=gen)
                         for _ in range(copies)]
                weights = [(c.float() * scale[:, None]).to(dtype) for c in codes]
                kern_ws, scale_x = codes, scale.to(dtype)

                def kern(w, cfg, x=None):
                    return gemv(x, w, config=cfg, weight_scale=scale_x)
            else:
                weights = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) * 0.02 for _ in range(copies)]
                kern_ws = weights

                def kern(w, cfg, x=None):
                    return gemv(x, w, config=cfg)
            est_us = nbytes / bw * 1e6
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            ref = (x.float() @ weights[0].float().t())
            tol = 2e-2 * ref.abs().max().item() + 1e-3
            cublas_err = (F.linear(x, weights[0]).float() - ref).abs().max().item()
            cublas_us = graph_time_us([lambda w=w: F.linear(x, w) for w in weights], est_us)
            frac = lambda us: nbytes / (us * 1e-6) / bw  # noqa: E731  (bytes moved per second, as the copy)
            cublas_frac = n * k * 2 / (cublas_us * 1e-6) / bw
            row = dict(shape=name, n=n, k=k, m=m, weight_bytes=nbytes, cublas_us=round(cublas_us, 2),
                       cublas_frac=round(cublas_frac, 4), cublas_err=cublas_err)
            print(f"{name} M={m}: cuBLAS {cublas_us:.1f} us ({cublas_frac:.1%})", flush=True)
            if args.int8:
                deq_us = graph_time_us([lambda c=c: F.linear(x, c.to(dtype) * scale_x[:, None]) for c in codes],
                                       3 * est_us)
                row["dequant_us"] = round(deq_us, 2)
                print(f"  dequantize + F.linear {deq_us:.1f} us", flush=True)
            best = None
            default = default_config(m, n, k, num_sms)
            cands = list(configs_for(m, n, k, num_sms))
            if default not in cands:
                cands.insert(0, default)
            for cfg in cands:
                if time.perf_counter() - t_start > args.budget_s:
                    out_of_time = True
                    results["skipped"] += 1
                    continue
                entry = dict(shape=name, m=m, config=cfg.__dict__.copy(), default=cfg == default)
                try:
                    err = (kern(kern_ws[0], cfg, x).float() - ref).abs().max().item()
                    entry["err"] = err
                    if not err <= tol:
                        raise ValueError(f"max abs error {err:.3g} > tol {tol:.3g} (cuBLAS {cublas_err:.3g})")
                    us = graph_time_us([lambda w=w, c=cfg: kern(w, c, x) for w in kern_ws], est_us)
                except Exception as exc:  # noqa: BLE001  (a config that fails to compile or check: record it)
                    results["failures"].append(dict(entry, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                    print(f"  FAIL {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                entry.update(us=round(us, 2), frac=round(frac(us), 4), vs_cublas=round(cublas_us / us, 3))
                results["entries"].append(entry)
                if cfg == default:
                    row.update(default_us=entry["us"], default_frac=entry["frac"])
                if best is None or us < best["us"]:
                    best = entry
            if best is not None:
                row.update(best_us=best["us"], best_frac=best["frac"], best_vs_cublas=best["vs_cublas"],
                           best_config=best["config"])
                print(f"  best {best['us']:.1f} us ({best['frac']:.1%}): {best['config']}", flush=True)
                if args.pdl and time.perf_counter() - t_start <= args.budget_s + 20:
                    # the best config again, launched with programmatic dependent launch: back-to-back calls
                    # overlap one's start (first weight tile) with the previous one's end
                    cfg = dataclasses.replace(GemvConfig(**best["config"]), pdl=True)
                    try:
                        err = (kern(kern_ws[0], cfg, x).float() - ref).abs().max().item()
                        if not err <= tol:
                            raise ValueError(f"max abs error {err:.3g} > tol {tol:.3g}")
                        us = graph_time_us([lambda w=w, c=cfg: kern(w, c, x) for w in kern_ws], est_us)
                        row.update(pdl_us=round(us, 2), pdl_frac=round(frac(us), 4))
                        print(f"  same with PDL {us:.1f} us ({frac(us):.1%})", flush=True)
                    except Exception as exc:  # noqa: BLE001  (PDL is optional: record why it did not run)
                        row["pdl_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        print(f"  PDL failed: {row['pdl_error']}", flush=True)
            results["rows"].append(row)
            del x, ref, weights, kern_ws
            torch.cuda.empty_cache()
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)

    print(f"\nGEMV sweep, {results['device']}, copy bandwidth {bw / 1e12:.2f} TB/s (read+write); "
          f"fraction = weight bytes / time / copy bandwidth")
    print(f"{'shape':<9}{'M':>3}{'cuBLAS us':>11}{'frac':>7}{'default us':>12}{'frac':>7}{'best us':>9}"
          f"{'frac':>7}{'x cuBLAS':>9}{'PDL us':>8}{'frac':>7}  best config")
    print("  (best config: block_n, block_k, split_k, use_dot, num_warps, num_stages, reduce_each, row_passes)")
    for r in results["rows"]:
        c = r.get("best_config")
        fields = ("block_n", "block_k", "split_k", "use_dot", "num_warps", "num_stages", "reduce_each", "row_passes")
        cs = ", ".join(str(c[f]) for f in fields) if c else "-"
        print(f"{r['shape']:<9}{r['m']:>3}{r['cublas_us']:>11.1f}{r['cublas_frac']:>7.1%}"
              f"{r.get('default_us', float('nan')):>12.1f}{r.get('default_frac', float('nan')):>7.1%}"
              f"{r.get('best_us', float('nan')):>9.1f}{r.get('best_frac', float('nan')):>7.1%}"
              f"{r.get('best_vs_cublas', float('nan')):>9.2f}{r.get('pdl_us', float('nan')):>8.1f}"
              f"{r.get('pdl_frac', float('nan')):>7.1%}  {cs}")
    if args.int8:
        print("int8 weight-only: the kernel's default config against cuBLAS bf16 and against dequantize + F.linear")
        for r in results["rows"]:
            if "default_us" in r:
                us = r["default_us"]
                print(f"  {r['shape']:<9} M={r['m']:<3} {us:.1f} us: {r['cublas_us'] / us:.2f}x cuBLAS bf16, "
                      f"{r['dequant_us'] / us:.2f}x dequantize + F.linear")
    # one decoder layer (qkv, o, gate_up, down) per M: cuBLAS alone vs the faster of the two per shape
    layer = ("qkv", "o", "gate_up", "down")
    for m in args.m:
        rows = [r for r in results["rows"] if r["m"] == m and r["shape"] in layer]
        if len(rows) == len(layer):
            cub = sum(r["cublas_us"] for r in rows)
            mix = sum(min(r["cublas_us"], r.get("best_us", r["cublas_us"]), r.get("pdl_us", r["cublas_us"]))
                      for r in rows)
            results.setdefault("layer", []).append(dict(m=m, cublas_us=round(cub, 2), best_of_both_us=round(mix, 2)))
            print(f"decoder layer M={m}: cuBLAS {cub:.1f} us, best of both {mix:.1f} us "
                  f"({32 * (cub - mix) / 1e3:.3f} ms less per 32-layer step)")
    if out_of_time:
        print(f"budget of {args.budget_s} s reached: {results['skipped']} configs not timed")
    if results["failures"]:
        print(f"{len(results['failures'])} configs failed (see --out)")
    print(f"elapsed {results['elapsed_s']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
