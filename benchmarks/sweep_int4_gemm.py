"""Sweep the INT4 weight-only GEMM's launch space on a GPU, bypassing the autotuner (issue 10, P3).

    python benchmarks/sweep_int4_gemm.py --out int4_sweep.json            # the GPU sweep, < 2 minutes on an H200
    python benchmarks/sweep_int4_gemm.py --dry-run                          # CPU: configs + interpreter check

For the Llama-3-8B decode shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096, and
4096->14336) at M = 1, 2, 4, 8, 16, g128 asymmetric, it times:
  bf16     cuBLAS (F.linear) on the dequantized weights: the baseline;
  auto     the engine's entry point int4_gemm() (int4_dispatch.py's pick, timed on its first call per shape);
  fma      int4_gemm.py's kernel, CUDA-core path (BLOCK_M = 1: one row per program), explicit tiles and SPLIT_K;
  dot      the same kernel's tensor-core path (BLOCK_M = 16);
  gemv     int4_gemv.py's kernel (CUDA cores, one row per program, two weights per packed fp16 instruction);
  mma      int4_mma.py's kernel (tensor cores, two weights per LOP3 straight into bf16, offset and zero point
           removed after the dot).
Raw jitted kernels are called with explicit BLOCK_M/N/K, SPLIT_K, num_warps, num_stages (re-wrapped so that M
and SPLIT_K are not specialised: one compile per tile config). Compiles run first in worker processes that fill
Triton's on-disk cache.

Timing: a CUDA graph of 20 launches replayed 5 times (median per launch), with the weights *rotated* over enough
copies that they never sit in the 50 MB L2 (a decode step reads each layer's weights once: warm-L2 figures flatter
small layers); "warm" repeats the best config on one copy. Every config's output is checked against the torch
reference (x @ dequantize_int4(W)^T in fp32); a wrong one is reported and never ranked. Achieved bandwidth counts
packed weights, scales, zeros, x and y; the copy bandwidth of this run is the roofline.
Prints the best 5 per (shape, M, kernel) and a summary; writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "ffn_up": (4096, 14336)}  # name: (K, N)
MS = (1, 2, 4, 8, 16)
GROUP = 128
SPLITS = (1, 2, 4, 8, 16, 32)
L2_BYTES = 50 << 20


# ---------------------------------------------------------------------------------------------- config space
# The tiles below are pruned with the first H200 sweep (2026-12-02, int4_sweep_1): the CUDA-core path only wins at
# M <= 2, with narrow tiles and 1-2 warps or wide ones with 4; the tensor-core path only with BLOCK_K = 128.
def fma_configs() -> list[dict]:
    """int4_gemm.py, CUDA-core path: one row per program."""
    return [dict(kernel="fma", BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=False, num_warps=w, num_stages=3)
            for bn, bk, w in ((64, 64, 1), (64, 128, 1), (64, 128, 2), (128, 64, 1), (256, 64, 2), (512, 64, 4),
                              (128, 128, 4))]


def dot_configs() -> list[dict]:
    """int4_gemm.py, tensor-core path: BLOCK_M = 16."""
    return [dict(kernel="dot", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, USE_DOT=True, num_warps=w, num_stages=3)
            for bn, w in ((64, 2), (64, 4), (128, 4), (128, 8), (256, 4), (256, 8))]


def gemv_configs() -> list[dict]:
    """int4_gemv.py: one row per program, 4 or 8 columns x 4 or 8 packed rows per thread, with and without the
    next tile's prefetch."""
    return [dict(kernel="gemv", BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1, PREFETCH=pf)
            for bn, bk, w in ((64, 64, 1), (128, 64, 1), (128, 32, 1), (256, 64, 1), (256, 64, 2), (512, 64, 2))
            for pf in (True, False)]


def mma_configs() -> list[dict]:
    """int4_mma.py: BLOCK_M = 16 (tensor cores), BLOCK_K = 128 (one g128 group per tile)."""
    out = []
    for bn, w, st in itertools.product((32, 64, 128, 256, 512), (1, 2, 4, 8), (1, 3)):
        words = 16 * bn // (32 * w)
        if 4 <= words <= 64 and (st == 3 or (bn, w) in ((128, 4), (256, 8))):
            out.append(dict(kernel="mma", BLOCK_M=16, BLOCK_N=bn, BLOCK_K=128, num_warps=w, num_stages=st))
    return out


def _pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


def configs_for(m: int) -> list[dict]:
    small = m <= 2  # one row per program: each row re-reads and re-unpacks the weights
    families = [c for c in fma_configs() if small], dot_configs(), [c for c in gemv_configs() if small], mma_configs()
    # round robin over the families, so that a sweep cut short by its time budget still has some of each
    return [c for group in itertools.zip_longest(*families) for c in group if c is not None]


def splits_for(cfg: dict, m: int, n: int, k: int, num_sms: int) -> list[int]:
    """SPLIT_K values worth timing: each split keeps >= 1 K tile, the grid holds 0.5..20 programs per SM (the
    smallest split when even 1 gives more), and two splits giving the same tiles per program are timed once;
    int4_gemv.py's only where the shape divides into whole tiles."""
    from minillm.kernels.int4_gemv import gemv_fits

    k_tiles = -(-k // cfg["BLOCK_K"])
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    seen, out = set(), []
    for s in SPLITS:
        per = -(-k_tiles // s)
        fits = cfg["kernel"] != "gemv" or gemv_fits(n, k, GROUP, cfg["BLOCK_N"], cfg["BLOCK_K"], s)
        if (fits and s <= k_tiles and (s == 1 or tiles * s <= 20 * num_sms) and tiles * s * 2 >= num_sms
                and per not in seen):
            seen.add(per)
            out.append(s)
    return out or [max(s for s in SPLITS if s <= k_tiles and tiles * s <= 20 * num_sms)] if cfg["kernel"] != "gemv" else out


# ---------------------------------------------------------------------------------------------- kernels
_KERNELS: dict = {}


def kernels() -> dict:
    """The raw kernels, re-wrapped so that M and SPLIT_K are run-time values (one compile per tile config)."""
    if not _KERNELS:
        import triton

        from minillm.kernels import int4_gemm as g4
        from minillm.kernels import int4_gemv as gv

        base = triton.jit(g4._int4_gemm_kernel.fn, do_not_specialize=["M", "M_BUCKET", "SPLIT_K"])
        from minillm.kernels import int4_mma as mm

        _KERNELS.update(fma=base, dot=base,
                        gemv=triton.jit(gv.int4_gemv_kernel.fn, do_not_specialize=["M", "SPLIT_K"]),
                        mma=triton.jit(mm.int4_mma_kernel.fn, do_not_specialize=["M", "M_BUCKET", "SPLIT_K"]))
    return _KERNELS


def launch(cfg: dict, split: int, x, qw, s, qz, y, ws, cnt, group: int, warmup: bool = False):
    """Launch one config (or only compile it, warmup=True)."""
    import torch
    import triton

    from minillm.kernels.int4_mma import code_constants
    from minillm.platform import triton_interpreted

    m, k = x.shape
    n = qw.shape[1]
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    kern = kernels()[cfg["kernel"]]
    extra = {} if triton_interpreted() else dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    tiles = {key: cfg[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    if warmup:
        run = lambda *a, **kw: kern.warmup(*a, grid=grid, **kw)  # noqa: E731
    else:
        run = lambda *a, **kw: kern[grid](*a, **kw)  # noqa: E731
    common = (x, qw, s, qz, s, y, ws, cnt, m, n, k, x.stride(0), qw.stride(0), s.stride(0), qz.stride(0), y.stride(0))
    interp = triton_interpreted()
    if cfg["kernel"] == "gemv":
        tiles.pop("BLOCK_M")
        return run(*common, 0x000F000F, GROUP_SIZE=group, HAS_ZEROS=True, HAS_BIAS=False, PACKED=not interp, **tiles,
                   SPLIT_K=split, PREFETCH=cfg["PREFETCH"], **extra)
    if cfg["kernel"] == "mma":
        return run(*common, min(_pow2(m), 256), 0x000F000F, GROUP_SIZE=group, HAS_ZEROS=True, HAS_BIAS=False,
                   **code_constants(x.dtype), UPCAST=interp or x.dtype == torch.float32,
                   DOT_PRECISION="ieee" if interp else "tf32", **tiles, SPLIT_K=split, **extra)
    return run(*common, min(_pow2(m), 256), 0x4B000000, GROUP_SIZE=group, HAS_ZEROS=True, HAS_BIAS=False,
               DOT_PRECISION="ieee" if x.dtype == torch.float32 or interp else "tf32",
               UPCAST=interp and x.dtype == torch.bfloat16, **tiles, USE_DOT=cfg["USE_DOT"], SPLIT_K=split, **extra)


def _compile_worker(cfgs: list[dict]) -> int:
    """In a worker process: compile each config into Triton's on-disk cache (the parent then loads, not builds)."""
    import torch

    import minillm  # noqa: F401

    k, n = SHAPES["ffn_up"]  # every shape here has N, K (and strides) divisible by 16: one specialisation
    dev = "cuda"
    x = torch.zeros(2, k, dtype=torch.bfloat16, device=dev)
    qw = torch.zeros(k // 8, n, dtype=torch.int32, device=dev)
    s = torch.zeros(k // GROUP, n, dtype=torch.bfloat16, device=dev)
    qz = torch.zeros(k // GROUP, n // 8, dtype=torch.int32, device=dev)
    y = torch.zeros(2, n, dtype=torch.bfloat16, device=dev)
    ws = torch.zeros(16 * n, dtype=torch.float32, device=dev)
    cnt = torch.zeros(16 * n, dtype=torch.int32, device=dev)
    done = 0
    for cfg in cfgs:  # M and SPLIT_K are not specialised: one compile serves every M and split
        try:
            launch(cfg, 2, x, qw, s, qz, y, ws, cnt, GROUP, warmup=True)
            done += 1
        except Exception as exc:  # noqa: BLE001  (the parent reports failures when it launches)
            print(f"compile failed {cfg}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
    return done


def precompile(cfgs: list[dict], workers: int) -> None:
    import multiprocessing as mp

    t0 = time.time()
    chunks = [cfgs[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        done = sum(pool.map(_compile_worker, chunks))
    print(f"compiled {done}/{len(cfgs)} configs in {time.time() - t0:.0f} s with {workers} workers", flush=True)


# ---------------------------------------------------------------------------------------------- operands
def make_weights(k: int, n: int, copies: int, dtype):
    """Random g128 asymmetric INT4 weights in the GPTQ layout (copies of qweight/scales/qzeros for rotation) and the
    fp32 reference W [N, K]."""
    import torch

    from minillm.kernels.int4_layout import dequantize_int4, repack_int4
    from minillm.quant.rtn import QuantizedWeight

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
    zeros = torch.randint(0, 16, (n, k // GROUP), dtype=torch.int32, device=dev)
    scales = torch.rand(n, k // GROUP, device=dev) * 0.02 + 0.002
    packed = repack_int4(QuantizedWeight(codes, scales, zeros, 4, GROUP, False), dtype)
    ref = dequantize_int4(*packed.args())
    sets = [(packed.qweight, packed.scales, packed.qzeros)]
    sets += [tuple(t.clone() for t in sets[0]) for _ in range(copies - 1)]
    return sets, ref


def weight_bytes(k: int, n: int, m: int) -> int:
    return k * n // 2 + (k // GROUP) * n * 2 + (k // GROUP) * (n // 8) * 4 + 2 * m * (k + n)


def cold_operands(k: int, n: int, dtype=None):
    """(copies, INT4 weight sets, fp32 reference W, dense copies): enough copies of each that cycling through
    them keeps every read out of the 50 MB L2 (cold weights, as a decode step reads them). dtype: the model's,
    bf16 by default (scales and the dense copies are in it)."""
    import torch

    dtype = dtype or torch.bfloat16
    copies = max(1, math.ceil(3 * L2_BYTES / weight_bytes(k, n, 0)))
    sets, ref_w = make_weights(k, n, copies, dtype)
    dense_copies = [ref_w.to(dtype) for _ in range(max(1, math.ceil(3 * L2_BYTES / (2 * k * n))))]
    return copies, sets, ref_w, dense_copies


def row_operands(m: int, k: int, n: int, ref_w, dtype=None):
    """Fresh activations x [M, K] (bf16 unless dtype), the fp32 reference y, the check's tolerance (1% of
    max|y|: the dispatcher's rule), an output buffer and the split-K workspace."""
    import torch

    from minillm.kernels.int4_tuning import split_k_workspace

    dtype = dtype or torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = x.float() @ ref_w.t()
    y = torch.empty(m, n, device="cuda", dtype=dtype)
    return (x, ref, 0.01 * ref.abs().max().item(), y) + tuple(split_k_workspace(x.device, m, n))


# ---------------------------------------------------------------------------------------------- timing
def time_graph_us(step, copies: int, launches: int = 20, trials: int = 5) -> float:
    """Median us per launch of step(i) (i: which weight copy) over a CUDA graph of `launches` launches."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            step(i % copies)
    torch.cuda.current_stream().wait_stream(s)
    from minillm.bench.roofline import graph_us
    return graph_us(lambda i: step(i % copies), launches, trials)


def copy_bandwidth() -> float:
    import torch
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------- sweep
def sweep_shape(name: str, k: int, n: int, num_sms: int, copy_bw: float, deadline: float) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from minillm.kernels.int4_gemm import int4_gemm

    copies, sets, ref_w, bf16_copies = cold_operands(k, n)
    rows = []
    for m in MS:
        x, ref, tol, y, ws, cnt = row_operands(m, k, n, ref_w)
        wbytes = weight_bytes(k, n, m)
        row = dict(shape=name, K=k, N=n, M=m, bytes=wbytes, copies=copies)
        row["bf16_us"] = time_graph_us(lambda i: F.linear(x, bf16_copies[i]), len(bf16_copies))
        auto = lambda i: int4_gemm(x, sets[i][0], sets[i][1], sets[i][2], GROUP)  # noqa: E731
        auto_err = (auto(0).float() - ref).abs().max().item()
        row["auto_us"] = time_graph_us(auto, copies)
        row["auto_ok"] = auto_err <= tol
        results = []
        for cfg in configs_for(m):
            for split in splits_for(cfg, m, n, k, num_sms):
                if time.time() > deadline:
                    break
                rec = dict(cfg, split_k=split)
                try:
                    launch(cfg, split, x, *sets[0], y, ws, cnt, GROUP)
                    err = (y.float() - ref).abs().max().item()
                    rec["ok"] = err <= tol
                    rec["max_err"] = err
                    rec["us"] = time_graph_us(lambda i: launch(cfg, split, x, *sets[i], y, ws, cnt, GROUP), copies)
                except Exception as exc:  # noqa: BLE001  (a config that does not compile or launch: recorded)
                    rec.update(ok=False, us=math.nan, error=f"{type(exc).__name__}: {str(exc)[:160]}")
                results.append(rec)
        for rec in results:
            rec["bw_TBps"] = wbytes / (rec["us"] * 1e-6) / 1e12 if rec["us"] == rec["us"] else math.nan
            rec["bw_frac"] = rec["bw_TBps"] * 1e12 / copy_bw
            rec["x_bf16"] = row["bf16_us"] / rec["us"] if rec["us"] == rec["us"] else math.nan
        good = sorted((r for r in results if r["ok"] and r["us"] == r["us"]), key=lambda r: r["us"])
        row["configs"] = results
        row["n_bad"] = sum(not r["ok"] for r in results)
        row["best"] = {}
        for fam in ("fma", "dot", "gemv", "mma"):
            fam_best = [r for r in good if r["kernel"] == fam][:5]
            if fam_best:
                b = fam_best[0]
                b["warm_us"] = time_graph_us(lambda i: launch(b, b["split_k"], x, *sets[0], y, ws, cnt, GROUP), 1)
                row["best"][fam] = fam_best
        row["best_us"] = good[0]["us"] if good else math.nan
        row["best_cfg"] = {kk: v for kk, v in good[0].items() if kk not in ("max_err",)} if good else None
        rows.append(row)
        _print_row(row, copy_bw)
    del sets, bf16_copies, ref_w
    torch.cuda.empty_cache()
    return rows


def _fmt_cfg(r: dict) -> str:
    return (f"{r['kernel']:<4} M{r['BLOCK_M']:<2} N{r['BLOCK_N']:<3} K{r['BLOCK_K']:<3} sk{r['split_k']:<2} "
            f"w{r['num_warps']} s{r['num_stages']}")


def _print_row(row: dict, copy_bw: float) -> None:
    floor_us = row["bytes"] / copy_bw * 1e6
    print(f"\n{row['shape']} K={row['K']} N={row['N']} M={row['M']}: cuBLAS bf16 {row['bf16_us']:.1f} us, "
          f"int4_gemm() autotuned {row['auto_us']:.1f} us{'' if row['auto_ok'] else ' (WRONG)'}, "
          f"int4 read floor {floor_us:.1f} us, {len(row['configs'])} configs, {row['n_bad']} wrong/failed", flush=True)
    for fam, best in row["best"].items():
        for r in best:
            warm = f"  warm {r['warm_us']:.1f}" if "warm_us" in r else ""
            print(f"   {_fmt_cfg(r)}  {r['us']:6.1f} us  {r['bw_TBps']:.2f} TB/s ({100 * r['bw_frac']:.0f}%)  "
                  f"x{r['x_bf16']:.2f} vs bf16{warm}")


def summary(rows: list[dict]) -> None:
    print("\nsummary: best us per shape and M (x = speed-up over cuBLAS bf16, same run)")
    print(f"{'shape':>8} {'M':>3} {'bf16':>7} {'auto':>7} {'fma':>7} {'dot':>7} {'gemv':>7} {'mma':>7} {'best x':>7}"
          f"  best config")
    for r in rows:
        fam = {f: (r["best"][f][0]["us"] if f in r["best"] else math.nan) for f in ("fma", "dot", "gemv", "mma")}
        cfg = _fmt_cfg(r["best_cfg"]) if r["best_cfg"] else "-"
        print(f"{r['shape']:>8} {r['M']:>3} {r['bf16_us']:>7.1f} {r['auto_us']:>7.1f} {fam['fma']:>7.1f} "
              f"{fam['dot']:>7.1f} {fam['gemv']:>7.1f} {fam['mma']:>7.1f} {r['bf16_us'] / r['best_us']:>7.2f}  {cfg}")


# ---------------------------------------------------------------------------------------------- dry run
def dry_run() -> None:
    """CPU: count the configs and run a few of each kernel through the interpreter on tiny shapes."""
    import torch

    import minillm  # noqa: F401  (TRITON_INTERPRET=1 without CUDA)
    from minillm.kernels.int4_tuning import split_k_workspace as _workspace

    all_cfgs = {id(c): c for m in MS for c in configs_for(m)}
    print(f"compile configs: fma {len(fma_configs())}, dot {len(dot_configs())}, gemv {len(gemv_configs())}, "
          f"mma {len(mma_configs())}")
    for name, (k, n) in SHAPES.items():
        counts = [sum(len(splits_for(c, m, n, k, 132)) for c in configs_for(m)) for m in MS]
        print(f"  {name:>8} K={k:>5} N={n:>5}: timed launches per M {counts}")
    del all_cfgs
    torch.manual_seed(0)
    k, n = 256, 64
    sets, ref_w = make_weights(k, n, 1, torch.float32)
    picks = [c for c in fma_configs() if c["BLOCK_N"] == 64 and c["BLOCK_K"] == 64][:1]
    picks += [dict(c, BLOCK_N=32) for c in dot_configs() if c["BLOCK_K"] == 128][:1]
    picks += [dict(c, BLOCK_N=32) for c in gemv_configs() if c["BLOCK_K"] == 64][:1]
    picks += [dict(c, BLOCK_N=32) for c in mma_configs()][:1]
    for cfg in picks:
        for m in (1, 3):
            x = torch.randn(m, k)
            y = torch.empty(m, n)
            ws, cnt = _workspace(x.device, m, n)
            launch(cfg, 2, x, *sets[0], y, ws, cnt, GROUP)
            ref = x @ ref_w.t()
            err = (y - ref).abs().max().item() / ref.abs().max().item()
            print(f"  interpreter {_fmt_cfg(dict(cfg, split_k=2))} M={m}: max error {err:.2e} of max|y|")
            assert err < 3e-3, err  # gemv: fp16 arithmetic, ~1e-3; the others fp32


def gpu_bench_args(doc: str, out: str, dry_run_help: str, budget_s: float) -> argparse.ArgumentParser:
    """The INT4 GPU benchmarks' common options: --out, --dry-run, --budget-s, --workers."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=out)
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    parser.add_argument("--budget-s", type=float, default=budget_s, help="stop timing new launches after this long")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    return parser


def require_cuda(what: str):
    """Import torch and the package (whose setup picks Triton's mode) on a CUDA machine; exit with a message off it."""
    import torch

    import minillm  # noqa: F401

    if not torch.cuda.is_available():
        raise SystemExit(f"{what} needs a CUDA GPU (use --dry-run on a CPU)")
    return torch


def main() -> None:
    parser = gpu_bench_args(__doc__, "benchmarks/results/int4_sweep.json",
                            "CPU: config counts and an interpreter check", 105.0)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    args = parser.parse_args()
    if args.dry_run:
        dry_run()
        return
    t_start = time.time()
    torch = require_cuda("the sweep")
    names = [s for s in args.shapes.split(",") if s]
    for s in names:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}: choose from {', '.join(SHAPES)}")
    all_cfgs = list({tuple(sorted(c.items())): c for m in MS for c in configs_for(m)}.values())
    try:
        precompile(all_cfgs, args.workers)
        from minillm.kernels import int4_dispatch  # the candidates int4_gemm() times on its first call per shape

        int4_dispatch.precompile([(m, SHAPES[s][1], SHAPES[s][0], GROUP, torch.bfloat16) for s in names for m in MS],
                                 args.workers)
    except Exception as exc:  # noqa: BLE001  (compiles then happen lazily in this process)
        print(f"parallel precompile failed ({type(exc).__name__}: {exc}); compiling lazily", file=sys.stderr)
    torch.manual_seed(0)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: {num_sms} SMs, copy bandwidth {copy_bw / 1e12:.2f} TB/s "
          f"(bytes read + written)", flush=True)
    rows = []
    per_shape = (args.budget_s - (time.time() - t_start)) / len(names)
    for i, s in enumerate(names):
        k, n = SHAPES[s]
        rows += sweep_shape(s, k, n, num_sms, copy_bw, time.time() + per_shape)
    summary(rows)
    write_result(args.out, t_start, copy_bw, rows=rows)


def write_result(out: str, t_start: float, copy_bw: float, **fields) -> None:
    """Write the run's JSON (device, versions, command, roofline and `fields`) to `out`."""
    import torch
    import triton

    result = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "copy_bytes_per_s": copy_bw,
              "command": " ".join(["python"] + sys.argv), "group": GROUP, **fields, "wall_s": time.time() - t_start}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out} ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
