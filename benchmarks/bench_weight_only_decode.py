"""Weight-only int8 and NF4 at decode: the kernels that read the codes against bf16 and against dequantizing.

    python benchmarks/bench_weight_only_decode.py [--m 1 4 16] [--shapes qkv o gate_up down] [--out wo.json]

For each shape of sweep_gemv.py (Llama-3-8B's, SmolLM2's) and each M, microseconds per call inside CUDA graphs
with cold weights (copies cycled past the L2), all in one run:
    bf16     F.linear on the bf16 weight (cuBLAS): the baseline
    int8     int8_rtn's decode path: minillm.kernels.gemv with weight_scale (one byte per weight)
    int8 deq what int8_rtn ran before: dequantize to bf16, then F.linear
    nf4      nf4_linear's decode path: minillm.kernels.nf4_gemv (half a byte per weight + absmax)
    nf4 deq  its reference: dequantize to bf16, then matmul
    fp8      fp8_linear's decode path: the same GEMV on e4m3 codes (x stays bf16, W8A16)
    fp8 w8a8 what fp8_linear ran at decode before: per-token quantization of x, then the FP8 GEMM
Each kernel is checked against an fp32 reference first. Needs CUDA; well under a minute on one H200.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

from sweep_gemv import L2_FLUSH_BYTES, SHAPES, graph_time_us


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16], help="rows of x (1..16)")
    parser.add_argument("--shapes", nargs="+", default=["qkv", "o", "gate_up", "down"], choices=list(SHAPES))
    parser.add_argument("--out", default=None, help="write the table here as JSON")
    args = parser.parse_args(argv)
    if any(not 1 <= m <= 16 for m in args.m):
        parser.error(f"--m values must lie in [1, 16], got {args.m}")
    import torch
    if not torch.cuda.is_available():
        print("bench_weight_only_decode needs a CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    import torch.nn.functional as F

    import minillm  # noqa: F401  (platform setup)
    from minillm.kernels.fp8_gemm import fp8_gemm, per_token_quant_fp8
    from minillm.quant.fp8 import fp8_linear, quantize_fp8
    from minillm.quant.int8_rtn import int8_weight_linear, quantize_per_channel_int8
    from minillm.quant.nf4 import (NF4_LEVELS, double_dequantize, double_quantize, dequantize_nf4, nf4_linear,
                                   quantize_nf4)
    from minillm.quant.rtn import pack_int4

    def nf4_dequant_linear(x, qweight, absmax_q, absmax_scale, absmax_offset, levels):
        """nf4_linear's reference path in x's dtype (what every call ran before the kernel)."""
        n, k = qweight.shape[0], qweight.shape[1] * 2
        absmax = double_dequantize(absmax_q, absmax_scale, absmax_offset, n * k // 64).reshape(n, k // 64)
        return x @ dequantize_nf4(qweight, absmax, x.dtype, levels).T

    dtype = torch.bfloat16

    def fp8_w8a8(x, w8, scale):
        """fp8_linear's W8A8 path: x quantized per token (one launch), then the FP8 GEMM."""
        x8, x_scale = per_token_quant_fp8(x)
        return fp8_gemm(x8, w8, x_scale, scale, None, out_dtype=x.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = dict(benchmark="weight-only decode", date=now, device=torch.cuda.get_device_name(),
                   command="python benchmarks/bench_weight_only_decode.py " + " ".join(argv or sys.argv[1:]), rows=[])
    print(f"{'shape':<13}{'M':>3}{'bf16 us':>9}{'int8':>8}{'int8 deq':>10}{'nf4':>8}{'nf4 deq':>9}{'fp8':>8}"
          f"{'fp8 w8a8':>10}{'int8 x bf16':>13}{'nf4 x bf16':>12}{'fp8 x bf16':>12}")
    for name in args.shapes:
        n, k = SHAPES[name]
        copies = max(1, -(-L2_FLUSH_BYTES // (n * k)))  # sized for the int8 codes: bf16 copies are bigger still
        dense = [torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5 for _ in range(copies)]
        bf16 = [w.to(dtype) for w in dense]
        int8 = [tuple(t.cuda() for t in quantize_per_channel_int8(w)) for w in dense]
        int8 = [(q, s.to(dtype)) for q, s in int8]
        nf4 = []
        for w in dense:
            codes, absmax = quantize_nf4(w)
            nf4.append((pack_int4(codes), *double_quantize(absmax), NF4_LEVELS.cuda()))
        fp8 = [tuple(t.cuda() for t in quantize_fp8(w)) for w in dense]
        del dense
        for m in args.m:
            x = torch.randn(m, k, device="cuda", generator=gen).to(dtype)
            ref_int8 = x.float() @ (int8[0][0].float() * int8[0][1].float()[:, None]).T
            ref_nf4 = nf4_linear(x.float(), *nf4[0])
            for got, ref in ((int8_weight_linear(x, *int8[0]), ref_int8), (nf4_linear(x, *nf4[0]), ref_nf4)):
                err = (got.float() - ref).abs().max().item()
                if err > 2e-2 * ref.abs().max().item() + 1e-3:
                    raise AssertionError(f"{name} M={m}: max abs error {err:.3g}")
            est = n * k / 4e12 * 1e6
            us = dict(
                bf16=graph_time_us([lambda w=w: F.linear(x, w) for w in bf16], 2 * est),
                int8=graph_time_us([lambda q=q, s=s: int8_weight_linear(x, q, s) for q, s in int8], est),
                int8_deq=graph_time_us([lambda q=q, s=s: F.linear(x, q.to(dtype) * s[:, None]) for q, s in int8],
                                       5 * est),
                nf4=graph_time_us([lambda t=t: nf4_linear(x, *t) for t in nf4], est / 2),
                nf4_deq=graph_time_us([lambda t=t: nf4_dequant_linear(x, *t) for t in nf4], 8 * est),
                fp8=graph_time_us([lambda w=w, s=s: fp8_linear(x, w, s) for w, s in fp8], est),
                fp8_w8a8=graph_time_us([lambda w=w, s=s: fp8_w8a8(x, w, s) for w, s in fp8], est))
            row = dict(shape=name, n=n, k=k, m=m, **{key: round(v, 2) for key, v in us.items()})
            results["rows"].append(row)
            print(f"{name:<13}{m:>3}{us['bf16']:>9.1f}{us['int8']:>8.1f}{us['int8_deq']:>10.1f}{us['nf4']:>8.1f}"
                  f"{us['nf4_deq']:>9.1f}{us['fp8']:>8.1f}{us['fp8_w8a8']:>10.1f}{us['bf16'] / us['int8']:>12.2f}x"
                  f"{us['bf16'] / us['nf4']:>11.2f}x{us['bf16'] / us['fp8']:>11.2f}x",
                  flush=True)
        del bf16, int8, nf4, fp8
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
