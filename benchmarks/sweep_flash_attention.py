"""Sweep FlashAttention on the H200: SDPA (default and each backend), our portable kernel, our Hopper kernel.

    python benchmarks/sweep_flash_attention.py --out fa_sweep.json           # the config sweep (issue 14, item 1)
    python benchmarks/sweep_flash_attention.py --final --out fa_final.json   # the P1 table: autotuned entry point

Shapes: causal bf16, 32 query heads, GQA 4:1 (8 kv heads) and 8:1 (4 kv heads), head_dim 64 and 128, seq 2k / 8k /
16k with the batch chosen so that every shape holds 32k tokens. FLOPs of causal attention = 4 * b * h * s^2 * d / 2.
Sweep mode times every Hopper config of flash_attention_hopper.SWEEP_CONFIGS explicitly (no autotuner), checks
every one against SDPA, and prints per shape the best config and its ratio to SDPA, then per config its mean
ratio over the shapes (what AUTOTUNE_CONFIGS should keep). Final mode times `flash_attention(q, k, v)` as the
engine calls it, and, on sm_90, the Hopper kernel through its own autotuner (whether or not "auto" picks it:
see flash_attention_hopper.AUTO_DISPATCH). The roofline (bf16 GEMM 8192^3, cuBLAS) is measured in the same run.
Compiling ~50 kernels one after another would take minutes, so worker processes compile them first (each
launches its configs once on a small problem with the same specialisation) and this process then loads them
from Triton's on-disk cache. Needs an sm_90 GPU for the Hopper rows (elsewhere they are skipped).
Setup on the GPU machine: `pip install --no-deps --no-build-isolation -e .` (so that `minillm.kernels` imports).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

HEADS, SEQS, TOKENS = 32, (2048, 8192, 16384), 32768
BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
ATOL = RTOL = 2e-2
DEVICE = "cuda"


def _qkv(batch, seq, kv_heads, d, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.randn(batch, n, seq, d, device=DEVICE, dtype=torch.bfloat16, generator=g)
            for n in (HEADS, kv_heads, kv_heads)]


def _bench_ms(fn) -> float:
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=5, rep=40, return_mode="median"))


def _sdpa_fn(q, k, v, backend=None, repeat=False):
    """SDPA with GQA (enable_gqa) or with the kv heads repeated beforehand (outside the timer)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if repeat:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))

    def call():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not repeat)
    if backend is None:
        return call

    def forced():
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return call()
    return forced


def _default_backend(q, k, v) -> str:
    """Which backend the default SDPA call dispatches to (torch's own chooser; private, so guarded)."""
    try:
        from torch.nn.attention import SDPBackend
        choice = torch._fused_sdp_choice(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None,
                                         enable_gqa=True)
        return SDPBackend(choice).name
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


def _check(out, ref) -> tuple[float, bool]:
    """(max abs error, every element within ATOL + RTOL * |ref|): bf16 against SDPA's bf16."""
    err = (out.float() - ref.float()).abs()
    return float(err.max()), bool((err <= ATOL + RTOL * ref.float().abs()).all())


def _compile_worker(tasks):
    """Launch each (head_dim, backend, config) once on a small problem so that its binary lands in the cache."""
    from minillm.kernels.flash_attention import flash_attention
    for d, backend, config in tasks:
        q, k, v = _qkv(1, 256, HEADS // 4, d)
        try:
            flash_attention(q, k, v, causal=True, backend=backend, config=config)
        except Exception as exc:  # noqa: BLE001  (the main process reports it when it times the config)
            print(f"precompile {backend} d{d} {config}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
    torch.cuda.synchronize()


def precompile(tasks, jobs: int) -> float:
    t0 = time.time()
    if jobs > 1 and len(tasks) > 1:
        chunks = [tasks[i::jobs] for i in range(jobs) if tasks[i::jobs]]
        try:
            with mp.get_context("spawn").Pool(len(chunks)) as pool:
                pool.map(_compile_worker, chunks)
        except Exception as exc:  # noqa: BLE001  (fall back to compiling in this process)
            print(f"parallel precompile failed ({type(exc).__name__}: {exc}); compiling serially", file=sys.stderr)
    _compile_worker(tasks)  # cache hits after the workers: loads the binaries into this process
    return time.time() - t0


def gemm_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192 ** 3 / _bench_ms(lambda: a @ b) / 1e9


def run(final: bool, head_dims, seqs, jobs: int, out_path: str) -> dict:
    from minillm.kernels import flash_attention as fa
    from minillm.kernels import flash_attention_hopper as hopper
    on_hopper = hopper.is_hopper(torch.device(DEVICE))
    configs = {d: hopper.valid_configs(d) for d in head_dims} if on_hopper and not final else {d: [] for d in head_dims}
    tasks = [(d, "hopper", c) for d in head_dims for c in configs[d]]
    tasks += [(d, "portable", c) for d in head_dims for c in fa._GPU_CONFIGS]  # what the portable autotuner tries
    if on_hopper:
        tasks += [(d, "hopper", c) for d in head_dims for c in hopper.AUTOTUNE_CONFIGS[d] if c not in configs[d]]
    compile_s = precompile(tasks, jobs)
    print(f"precompiled {len(tasks)} kernels in {compile_s:.1f}s", flush=True)
    flags = {n: getattr(torch.backends.cuda, n)() for n in
             ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "cudnn_sdp_enabled", "math_sdp_enabled")}
    meta = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "mode": "final" if final else "sweep", "sdp_flags": flags, "compile_s": compile_s,
            "gemm_tflops": gemm_tflops()}
    rows = []
    for d in head_dims:
        for gqa in (4, 8):
            kv_heads = HEADS // gqa
            for seq in seqs:
                batch = max(1, TOKENS // seq)
                q, k, v = _qkv(batch, seq, kv_heads, d, seed=seq + d)
                tflop = 4 * batch * HEADS * seq * seq * d / 2 / 1e12
                row = {"head_dim": d, "kv_heads": kv_heads, "gqa": HEADS // kv_heads, "seq": seq, "batch": batch,
                       "sdpa_default_backend": _default_backend(q, k, v)}
                ref = _sdpa_fn(q, k, v)()
                row["sdpa_ms"] = _bench_ms(_sdpa_fn(q, k, v))
                row["sdpa_tflops"] = tflop / row["sdpa_ms"] * 1e3
                if not final:
                    for backend in BACKENDS:
                        for repeat in (False, True):
                            key = f"{backend.split('_')[0].lower()}_{'repeat' if repeat else 'gqa'}_ms"
                            try:
                                row[key] = _bench_ms(_sdpa_fn(q, k, v, backend, repeat))
                            except Exception as exc:  # noqa: BLE001  (this backend refuses the shape)
                                row[key] = None
                                row[key.replace("_ms", "_error")] = f"{type(exc).__name__}: {str(exc)[:80]}"
                    row["portable_err"], row["portable_ok"] = _check(fa.flash_attention(q, k, v, backend="portable"),
                                                                     ref)
                    row["portable_ms"] = _bench_ms(lambda: fa.flash_attention(q, k, v, backend="portable"))
                    row["hopper"] = {}
                    for c in configs[d]:
                        try:
                            err, ok = _check(fa.flash_attention(q, k, v, backend="hopper", config=c), ref)
                            ms = _bench_ms(lambda: fa.flash_attention(q, k, v, backend="hopper", config=c))
                        except Exception as exc:  # noqa: BLE001  (e.g. out of shared memory)
                            row["hopper"][str(c)] = {"error": f"{type(exc).__name__}: {str(exc)[:80]}"}
                            continue
                        row["hopper"][str(c)] = {"ms": ms, "ratio": row["sdpa_ms"] / ms, "max_err": err, "ok": ok}
                    good = {c: r for c, r in row["hopper"].items() if r.get("ok")}
                    if good:
                        best = min(good, key=lambda c: good[c]["ms"])
                        row.update(best_config=best, best_ms=good[best]["ms"], best_ratio=good[best]["ratio"])
                out = fa.flash_attention(q, k, v)  # the engine's call: auto dispatch, autotuned
                strides = tuple(t.stride(i) for t in (q, k, v, out) for i in (0, 2, 1))
                row["auto_backend"] = "hopper" if hopper.use_hopper(q, k, v, out, strides, seq) else "portable"
                row["auto_err"], row["auto_ok"] = _check(out, ref)
                if on_hopper:  # the Hopper kernel through its own autotuner, whether or not "auto" picks it
                    row["hopper_tuned_err"], row["hopper_tuned_ok"] = _check(
                        fa.flash_attention(q, k, v, backend="hopper"), ref)
                    row["hopper_tuned_ms"] = _bench_ms(lambda: fa.flash_attention(q, k, v, backend="hopper"))
                    row["hopper_tuned_ratio"] = row["sdpa_ms"] / row["hopper_tuned_ms"]
                row["auto_ms"] = _bench_ms(lambda: fa.flash_attention(q, k, v))
                row["auto_tflops"] = tflop / row["auto_ms"] * 1e3
                row["auto_ratio"] = row["sdpa_ms"] / row["auto_ms"]
                rows.append(row)
                print(_row_line(row, tflop, meta["gemm_tflops"]), flush=True)
                with open(out_path, "w") as f:  # after every shape, so that a run cut short keeps its rows
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
                del q, k, v, ref, out
                torch.cuda.empty_cache()
    if on_hopper:
        meta["autotuned_best"] = {d: str(getattr(hopper._autotuned.get(d), "best_config", None)) for d in head_dims}
    return {"meta": meta, "rows": rows}


def _row_line(r, tflop, gemm) -> str:
    ms = lambda x: f"{tflop / x * 1e3:5.0f}" if x else "  n/a"  # noqa: E731  (TFLOP/s, or n/a)
    line = (f"d{r['head_dim']:<4}{r['gqa']}:1  s{r['seq']:<6}b{r['batch']:<3} SDPA({r['sdpa_default_backend'][:5]}) "
            f"{ms(r['sdpa_ms'])}")
    if "portable_ms" in r:
        line += (f" | flash {ms(r['flash_gqa_ms'])}/{ms(r['flash_repeat_ms'])} eff {ms(r['efficient_gqa_ms'])}/"
                 f"{ms(r['efficient_repeat_ms'])} cudnn {ms(r['cudnn_gqa_ms'])}/{ms(r['cudnn_repeat_ms'])}"
                 f" | portable {ms(r['portable_ms'])} ({r['sdpa_ms'] / r['portable_ms']:.2f}x)")
        if "best_ms" in r:
            line += f" | hopper best {ms(r['best_ms'])} ({r['best_ratio']:.2f}x) {r['best_config']}"
    line += (f" | auto[{r['auto_backend']}] {ms(r['auto_ms'])} ({r['auto_ratio']:.2f}x, "
             f"{r['auto_tflops'] / gemm:.0%} of GEMM, err {r['auto_err']:.3f}{'' if r['auto_ok'] else ' FAIL'})")
    if "hopper_tuned_ms" in r:
        line += (f" | hopper tuned {ms(r['hopper_tuned_ms'])} ({r['hopper_tuned_ratio']:.2f}x"
                 f"{'' if r['hopper_tuned_ok'] else ' FAIL'})")
    return line


def summary(result) -> str:
    """Per head_dim, every config's ratio to SDPA averaged (geometric) over the shapes: the autotune short list."""
    lines = ["", "Hopper configs by geometric-mean speed-up over default SDPA across the shapes (top 8 per head_dim):"]
    for d in sorted({r["head_dim"] for r in result["rows"]}):
        rows = [r for r in result["rows"] if r["head_dim"] == d and r.get("hopper")]
        scores = {}
        for c in rows[0]["hopper"] if rows else []:
            ratios = [r["hopper"][c].get("ratio") for r in rows if r["hopper"][c].get("ok")]
            if len(ratios) == len(rows):
                scores[c] = torch.tensor(ratios).log().mean().exp().item()
        for c, s in sorted(scores.items(), key=lambda kv: -kv[1])[:8]:
            per = " ".join(f"{r['hopper'][c]['ratio']:.2f}" for r in rows)
            lines.append(f"  d{d} {c:<20} mean {s:.3f}   per shape {per}")
    lines.append("P1 (auto entry point vs default SDPA): " + ", ".join(
        f"d{r['head_dim']} {r['gqa']}:1 s{r['seq']} {r['auto_ratio']:.2f}x" for r in result["rows"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="path of the JSON results")
    p.add_argument("--final", action="store_true", help="only the autotuned entry point vs SDPA (the P1 table)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], choices=[64, 128])
    p.add_argument("--seqs", type=int, nargs="+", default=list(SEQS))
    p.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="compile worker processes")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the Triton interpreter would take hours at these sizes)")
    if any(s < 128 or s > 65536 for s in args.seqs):
        raise SystemExit(f"--seqs must lie in [128, 65536], got {args.seqs}")
    warnings.filterwarnings("ignore")  # SDPA explains at length why a forced backend refuses a shape
    t0 = time.time()
    result = run(args.final, args.head_dims, args.seqs, args.jobs, args.out)
    result["meta"]["wall_s"] = time.time() - t0
    print(summary(result))
    print(f"GEMM roofline in this run: {result['meta']['gemm_tflops']:.0f} TFLOP/s; wall {time.time() - t0:.0f}s")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
