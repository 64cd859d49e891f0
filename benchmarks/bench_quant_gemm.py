"""Benchmark the quantized GEMMs (chapter 10) on a GPU against torch baselines measured in the same run.

    python benchmarks/bench_quant_gemm.py --out benchmarks/results/quant_gemm_h200.json

R   roofline read in this run: device-to-device copy bandwidth (bytes read + written) and cuBLAS bf16 8192^3.
I4  INT4 weight-only (g128, asymmetric) GEMM 4096 -> 14336 at M = 1, 2, 4, 8, 16, 32, 64: minillm's kernel
    vs cuBLAS bf16 (F.linear) vs torch._weight_int4pack_mm (tinygemm) where this torch has it; the fraction of
    copy bandwidth the int4 kernel reaches (bytes: packed weights, scales, zeros, x, y). Times with
    triton.testing.do_bench (median) and, for the kernel, from a CUDA graph (no Python launch overhead).
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
import sys
from pathlib import Path


def _time_ms(fn) -> float:
    import torch
    from triton.testing import do_bench

    fn()  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _time_graph_ms(fn) -> float:
    import torch
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    try:
        return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))
    except Exception as exc:  # noqa: BLE001  (optional figure)
        print(f"CUDA-graph timing unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return math.nan


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


def bench_int4(roof: dict) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from minillm.kernels.int4_gemm import int4_gemm
    from minillm.kernels.int4_layout import dequantize_int4, repack_int4
    from minillm.quant.rtn import quantize

    n, k, group = 14336, 4096, 128
    qw = quantize(torch.randn(n, k, device="cuda"), bits=4, group_size=group, symmetric=False)
    packed = repack_int4(qw, torch.bfloat16)
    w_ref = dequantize_int4(*packed.args())
    w_bf16 = w_ref.to(torch.bfloat16)
    rows = []
    for m in (1, 2, 4, 8, 16, 32, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w_ref.t()
        ours = lambda: int4_gemm(x, *packed.args())  # noqa: E731
        _check(f"int4 M={m}", ours(), ref, 0.01)
        tiny = _tinygemm(qw.codes, qw.scales, qw.zeros, group, x)
        tiny_ok = tiny is not None and (tiny().float() - ref).abs().max().item() <= 0.02 * ref.abs().max().item()
        bytes_moved = k * n // 2 + packed.scales.numel() * 2 + packed.qzeros.numel() * 4 + (m * k + m * n) * 2
        t = _time_ms(ours)
        row = {"M": m, "N": n, "K": k, "group": group, "int4_us": 1e3 * t, "int4_graph_us": 1e3 * _time_graph_ms(ours),
               "bf16_us": 1e3 * _time_ms(lambda: F.linear(x, w_bf16)),
               "int4pack_us": 1e3 * _time_ms(tiny) if tiny else math.nan, "int4pack_matches": bool(tiny_ok)}
        row["speedup_vs_bf16"] = row["bf16_us"] / row["int4_us"]
        row["speedup_vs_bf16_graph"] = row["bf16_us"] / row["int4_graph_us"]
        best_s = min(row["int4_us"], row["int4_graph_us"]) * 1e-6
        row["int4_bw_fraction"] = bytes_moved / best_s / roof["copy_bytes_per_s"]
        rows.append(row)
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
    args = parser.parse_args()
    import torch
    import triton

    if not torch.cuda.is_available():
        raise SystemExit("bench_quant_gemm needs a CUDA GPU (the Triton interpreter would take hours at these sizes)")
    torch.manual_seed(0)
    roof = roofline()
    print(f"roofline: copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 GEMM {roof['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s")
    int4_rows = bench_int4(roof)
    w8_rows = bench_w8a8(roof)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "torch": torch.__version__, "triton": triton.__version__, "roofline": roof, "int4": int4_rows,
              "w8a8": w8_rows, "command": "python benchmarks/bench_quant_gemm.py --out " + args.out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))

    print("\nINT4 g128 4096 -> 14336 (us; graph = CUDA-graph replay)")
    print(f"{'M':>4} {'int4':>8} {'graph':>8} {'bf16':>8} {'tinygemm':>9} {'x bf16':>7} {'x (graph)':>9} "
          f"{'BW frac':>8}")
    for r in int4_rows:
        print(f"{r['M']:>4} {r['int4_us']:>8.1f} {r['int4_graph_us']:>8.1f} {r['bf16_us']:>8.1f} "
              f"{r['int4pack_us']:>9.1f} "
              f"{r['speedup_vs_bf16']:>7.2f} {r['speedup_vs_bf16_graph']:>9.2f} {r['int4_bw_fraction']:>8.2f}")
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
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
