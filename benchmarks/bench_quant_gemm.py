"""Benchmark the quantized GEMMs (chapter 8) on a GPU against torch baselines measured in the same run.

    python benchmarks/bench_quant_gemm.py --out benchmarks/results/quant_gemm_h200.json

R   roofline read in this run: device-to-device copy bandwidth (bytes read + written) and cuBLAS bf16 8192^3.
I4  INT4 weight-only (g128, asymmetric) GEMM through the engine's entry point int4_gemm() on the Llama-3-8B
    decode shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096, and 4096->14336) at
    M = 1, 2, 4, 8, 16, 32, 64, vs cuBLAS bf16 (F.linear), and torch._weight_int4pack_mm (tinygemm) at
    4096->14336 where this torch has it. CUDA-graph timing with the weights rotated over copies that overflow
    L2 (a decode step reads each layer cold); the launch int4_dispatch picked is printed; the per-layer sum at
    M = 1 (qkv + o + gate_up + down) is the decode-step GEMM figure.
F8  FP8 W8A8 (per-token x per-channel) vs torch._scaled_mm (row-wise scales; default and use_fast_accum, the
    accumulation Triton's fp8 dot uses on sm_90), at 8192^3 and 4096 -> 14336 for M = 1, 16, 64, 256.
I8  INT8 W8A8 vs torch._int_mm (+ the same scaling epilogue in torch), same shapes; _int_mm needs M > 16,
    so smaller M run it padded to 32 rows (what a caller would do).
Every kernel is checked against a torch reference before it is timed; a short table is printed last and the
raw numbers go to --out as JSON. Needs CUDA.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sweep_int4_gemm's shapes, weights and graph timing


def _time_ms(fn) -> float:
    import torch
    from triton.testing import do_bench

    fn()  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _check(name: str, got, ref, rtol: float) -> None:
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    if not err <= rtol * scale:
        raise SystemExit(f"correctness check failed for {name}: max abs error {err:.3g} > {rtol} x {scale:.3g}")


def roofline() -> dict:
    import torch

    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _time_ms(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = _time_ms(lambda: a @ b)
    return {"copy_bytes_per_s": 2 * (2 << 30) / (copy_ms * 1e-3), "bf16_gemm_flops": 2 * 8192 ** 3 / (mm_ms * 1e-3)}


def _tinygemm(w_codes, scales, zeros, group, x):
    """torch._weight_int4pack_mm on the same codes (tinygemm's w = (q - 8) * s + z), or None if unavailable."""
    import torch

    try:
        packed = (w_codes[:, ::2].to(torch.int32) << 4 | w_codes[:, 1::2].to(torch.int32)).to(torch.uint8)
        w4 = torch._convert_weight_to_int4pack(packed, 8)
        s = scales.t().float()  # [K / G, N]
        z = (8 - zeros.t().float()) * s
        sz = torch.stack([s, z], dim=-1).to(torch.bfloat16).contiguous()  # [K / G, N, 2]
        fn = lambda: torch._weight_int4pack_mm(x, w4, group, sz)  # noqa: E731
        fn()
        return fn
    except Exception as exc:  # noqa: BLE001  (optional baseline)
        print(f"torch._weight_int4pack_mm unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
              file=sys.stderr)
        return None


def bench_int4(roof: dict, workers: int) -> list[dict]:
    """int4_gemm() (decode sizes: int4_dispatch's pick, tuned on the first call) vs cuBLAS bf16 on the Llama-3-8B
    decode shapes; weights rotated over copies that overflow L2 (see sweep_int4_gemm.py), CUDA-graph timing."""
    import torch
    import torch.nn.functional as F

    from minillm.kernels import int4_dispatch
    from minillm.kernels.int4_gemm import int4_gemm
    from minillm.quant.rtn import quantize
    from sweep_int4_gemm import GROUP, L2_BYTES, SHAPES, make_weights, time_graph_us, weight_bytes

    ms = (1, 2, 4, 8, 16, 32, 64)
    t0 = time.time()
    n_compiled = int4_dispatch.precompile([(m, n, k, GROUP, torch.bfloat16) for k, n in SHAPES.values() for m in ms],
                                          workers)
    print(f"int4: compiled {n_compiled} candidate launches in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for name, (k, n) in SHAPES.items():
        copies = max(1, math.ceil(3 * L2_BYTES / weight_bytes(k, n, 0)))
        sets, w_ref = make_weights(k, n, copies, torch.bfloat16)
        dense = [w_ref.to(torch.bfloat16) for _ in range(max(1, math.ceil(3 * L2_BYTES / (2 * k * n))))]
        tiny = None
        if name == "ffn_up":  # tinygemm (torch._weight_int4pack_mm) on its own codes, where this torch has it
            qw = quantize(torch.randn(n, k, device="cuda"), bits=4, group_size=GROUP, symmetric=False)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ w_ref.t()
            ours = lambda i: int4_gemm(x, *sets[i], GROUP)  # noqa: E731
            t_tune = time.time()
            _check(f"int4 {name} M={m}", ours(0), ref, 0.01)  # the first call tunes
            t_tune = time.time() - t_tune
            picked = int4_dispatch.tuned_launch(m, n, k, GROUP, torch.bfloat16, x.device)
            row = {"shape": name, "M": m, "N": n, "K": k, "group": GROUP, "copies": copies, "tune_s": t_tune,
                   "int4_us": time_graph_us(ours, copies),
                   "bf16_us": time_graph_us(lambda i: F.linear(x, dense[i]), len(dense)),
                   "picked": vars(picked) if picked is not None else None}
            if name == "ffn_up" and m in (1, 16, 64):
                tiny = _tinygemm(qw.codes, qw.scales, qw.zeros, GROUP, x)
                row["int4pack_us"] = 1e3 * _time_ms(tiny) if tiny else math.nan
            row["speedup_vs_bf16"] = row["bf16_us"] / row["int4_us"]
            row["int4_bw_fraction"] = weight_bytes(k, n, m) / (row["int4_us"] * 1e-6) / roof["copy_bytes_per_s"]
            rows.append(row)
            p = row["picked"] or {}
            print(f"  {name:>8} M={m:<3} int4 {row['int4_us']:6.1f} us  bf16 {row['bf16_us']:6.1f} us  "
                  f"x{row['speedup_vs_bf16']:.2f}  {100 * row['int4_bw_fraction']:3.0f}% of copy BW  "
                  f"[{p.get('kernel')} M{p.get('block_m')} N{p.get('block_n')} K{p.get('block_k')} "
                  f"w{p.get('num_warps')} sk{p.get('split_k')}]  tuned in {t_tune:.1f} s", flush=True)
        del sets, dense, w_ref
        torch.cuda.empty_cache()
    return rows


def _time_backend(scaled_mm, operands: tuple, backend: str, ref) -> float:
    """us of scaled_mm pinned to one loader (checked first); NaN with a note if that loader fails here."""
    fn = lambda: scaled_mm(*operands, backend=backend)  # noqa: E731
    try:
        _check(f"scaled_mm[{backend}]", fn(), ref, 0.01)
        return 1e3 * _time_ms(fn)
    except Exception as exc:  # noqa: BLE001  (report, keep benchmarking the other loader)
        print(f"scaled_mm backend={backend} failed: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return math.nan


def bench_w8a8(roof: dict) -> list[dict]:
    import torch

    from minillm.kernels.fp8_gemm import fp8_gemm, per_token_quant_fp8
    from minillm.kernels.int8_gemm import int8_gemm, per_token_quant_int8
    from minillm.quant.fp8 import quantize_fp8
    from minillm.quant.int8_rtn import quantize_per_channel_int8
    from minillm.kernels.scaled_mm import scaled_mm, tma_supported

    rows = []
    shapes = [(8192, 8192, 8192)] + [(m, 14336, 4096) for m in (1, 16, 64, 256)]
    for m, n, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda")
        flops = 2 * m * n * k
        row = {"M": m, "N": n, "K": k}
        # fp8
        xq, xs = per_token_quant_fp8(x)
        wq, ws = quantize_fp8(w)
        ref = (xq.float() @ wq.float().t()) * xs * ws
        ours = lambda: fp8_gemm(xq, wq, xs, ws)  # noqa: E731
        _check(f"fp8 {m}x{n}x{k}", ours(), ref, 0.01)
        row["fp8_us"] = 1e3 * _time_ms(ours)
        row["default_backend"] = "tma" if tma_supported(xq, wq) else "pointer"
        for backend in ("tma", "pointer"):
            row[f"fp8_{backend}_us"] = _time_backend(scaled_mm, (xq, wq, xs, ws), backend, ref)
        mp = max(16, -(-m // 16) * 16)  # _scaled_mm's row-wise scaling wants M a multiple of 16
        xqp, xsp = torch.zeros(mp, k, device="cuda").to(torch.float8_e4m3fn), torch.ones(mp, 1, device="cuda")
        xqp[:m], xsp[:m] = xq, xs
        theirs = lambda: torch._scaled_mm(xqp, wq.t(), scale_a=xsp, scale_b=ws.view(1, -1),  # noqa: E731
                                          out_dtype=torch.bfloat16)
        _check(f"torch._scaled_mm {m}x{n}x{k}", theirs()[:m], ref, 0.01)
        row["scaled_mm_us"] = 1e3 * _time_ms(theirs)
        # Triton's fp8 tl.dot on sm_90 accumulates in the tensor core's fast fp8 accumulator: the like-for-like
        # baseline is use_fast_accum=True (the default, False, promotes to fp32 as it goes)
        row["scaled_mm_fast_us"] = 1e3 * _time_ms(lambda: torch._scaled_mm(
            xqp, wq.t(), scale_a=xsp, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16, use_fast_accum=True))
        row["scaled_mm_padded_M"] = mp
        # int8
        xq8, xs8 = per_token_quant_int8(x)
        wq8, ws8 = quantize_per_channel_int8(w)
        ref8 = (xq8.double() @ wq8.double().t()).float() * xs8 * ws8
        ours8 = lambda: int8_gemm(xq8, wq8, xs8, ws8)  # noqa: E731
        _check(f"int8 {m}x{n}x{k}", ours8(), ref8, 0.01)
        row["int8_us"] = 1e3 * _time_ms(ours8)
        for backend in ("tma", "pointer"):
            row[f"int8_{backend}_us"] = _time_backend(scaled_mm, (xq8, wq8, xs8, ws8), backend, ref8)
        mp8 = max(32, -(-m // 8) * 8)  # _int_mm needs M > 16 and a multiple of 8
        xq8p = torch.zeros(mp8, k, device="cuda", dtype=torch.int8)
        xq8p[:m] = xq8
        xs8p = torch.ones(mp8, 1, device="cuda")
        xs8p[:m] = xs8
        theirs8 = lambda: (torch._int_mm(xq8p, wq8.t()).float() * xs8p * ws8).to(torch.bfloat16)  # noqa: E731
        _check(f"torch._int_mm {m}x{n}x{k}", theirs8()[:m], ref8, 0.01)
        row["int_mm_scaled_us"] = 1e3 * _time_ms(theirs8)
        row["int_mm_alone_us"] = 1e3 * _time_ms(lambda: torch._int_mm(xq8p, wq8.t()))
        row["int_mm_padded_M"] = mp8
        row["quant_fp8_us"] = 1e3 * _time_ms(lambda: per_token_quant_fp8(x))
        row["quant_int8_us"] = 1e3 * _time_ms(lambda: per_token_quant_int8(x))
        for key in ("fp8", "scaled_mm", "int8", "int_mm_alone"):
            row[f"{key}_tflops"] = flops / (row[f"{key}_us"] * 1e-6) / 1e12
        row["fp8_vs_scaled_mm"] = row["scaled_mm_us"] / row["fp8_us"]
        row["fp8_vs_scaled_mm_fast"] = row["scaled_mm_fast_us"] / row["fp8_us"]
        row["int8_vs_int_mm"] = row["int_mm_alone_us"] / row["int8_us"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/quant_gemm.json")
    parser.add_argument("--sections", default="i4,w8a8", help="comma-separated: i4 (INT4 weight-only), w8a8")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes compiling the INT4 candidates before tuning")
    args = parser.parse_args()
    sections = {x for x in args.sections.split(",") if x}
    if not sections or not sections <= {"i4", "w8a8"}:
        raise SystemExit(f"--sections takes i4 and/or w8a8, got {args.sections!r}")
    import torch
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("bench_quant_gemm needs a CUDA GPU (the Triton interpreter would take hours at these sizes)")
    torch.manual_seed(0)
    roof = roofline()
    print(f"roofline: copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 GEMM {roof['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s")
    int4_rows = bench_int4(roof, args.workers) if "i4" in sections else []
    w8_rows = bench_w8a8(roof) if "w8a8" in sections else []
    result = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "roofline": roof, "int4": int4_rows,
              "w8a8": w8_rows, "command": " ".join(["python"] + sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    if int4_rows:
        _print_int4(int4_rows)
    if w8_rows:
        _print_w8a8(w8_rows)
    print(f"\nwrote {args.out}")


def _print_int4(int4_rows: list[dict]) -> None:
    print("\nINT4 g128 via int4_gemm() vs cuBLAS bf16 (us, CUDA graphs, weights cold; x = bf16 time / int4 time)")
    names = list(dict.fromkeys(r["shape"] for r in int4_rows))
    ms = sorted({r["M"] for r in int4_rows})
    at = {(r["shape"], r["M"]): r for r in int4_rows}
    print(f"{'M':>4} " + " ".join(f"{nm + ' int4':>13} {'x':>5}" for nm in names))
    for m in ms:
        print(f"{m:>4} " + " ".join(f"{at[nm, m]['int4_us']:>13.1f} {at[nm, m]['speedup_vs_bf16']:>5.2f}"
                                    for nm in names))
    layer = [nm for nm in ("qkv", "o", "gate_up", "down") if nm in names]
    for m in ms:
        i4 = sum(at[nm, m]["int4_us"] for nm in layer)
        bf = sum(at[nm, m]["bf16_us"] for nm in layer)
        print(f"per layer ({' + '.join(layer)}) M={m}: int4 {i4:.1f} us, bf16 {bf:.1f} us, x{bf / i4:.2f}")
    tiny = [r for r in int4_rows if r.get("int4pack_us") is not None]
    for r in tiny:
        print(f"tinygemm (torch._weight_int4pack_mm) {r['shape']} M={r['M']}: {r['int4pack_us']:.1f} us "
              f"(int4_gemm {r['int4_us']:.1f} us; tinygemm timed with do_bench, weights warm)")


def _print_w8a8(w8_rows: list[dict]) -> None:
    print("\nW8A8 (us, TFLOP/s)")
    print(f"{'M x N x K':>18} {'fp8':>8} {'tma':>7} {'ptr':>7} {'_scaled_mm':>10} {'ratio':>6} {'fast':>6} {'TF/s':>6} "
          f"{'int8':>8} {'tma':>7} {'ptr':>7} {'_int_mm':>8} {'ratio':>6} {'TOP/s':>6}")
    for r in w8_rows:
        shape = f"{r['M']}x{r['N']}x{r['K']}"
        print(f"{shape:>18} {r['fp8_us']:>8.1f} {r['fp8_tma_us']:>7.1f} {r['fp8_pointer_us']:>7.1f} "
              f"{r['scaled_mm_us']:>10.1f} {r['fp8_vs_scaled_mm']:>6.2f} {r['fp8_vs_scaled_mm_fast']:>6.2f} "
              f"{r['fp8_tflops']:>6.0f} {r['int8_us']:>8.1f} "
              f"{r['int8_tma_us']:>7.1f} {r['int8_pointer_us']:>7.1f} {r['int_mm_alone_us']:>8.1f} "
              f"{r['int8_vs_int_mm']:>6.2f} {r['int8_tflops']:>6.0f}")
    print(f"(fp8 / int8 = the default loader: {sorted({r['default_backend'] for r in w8_rows})}; ratio = "
          f"_scaled_mm time / ours, fast = the same against use_fast_accum=True; int8 ratio against _int_mm alone)")


if __name__ == "__main__":
    main()
