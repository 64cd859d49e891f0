"""Block-wise FP8 GEMM (kernels/fp8_block_gemm.py) against per-tensor FP8 and bf16 cuBLAS, and SmolLM2 perplexity.

    python benchmarks/bench_fp8_block.py --out benchmarks/results/fp8_block_h200.json
    python benchmarks/bench_fp8_block.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --out ...   # + perplexity

Part 1, GEMM (one H200, well under a minute): y = x W^T at M = 1, 16, 128, 2048 on 4096 -> 14336 (a Llama-3-8B
MLP up projection) and at 8192^3, each checked first against the torch emulation (dequantized operands, fp32
matmul). Rows: our block-scaled kernel with 128 x 128 weight tiles and 128-wide activation groups (DeepSeek-V3's
scheme), the GEMM alone and with the per-token-group quantizer in front; torch._scaled_mm with one scale per
tensor (the fastest fp8 cuBLAS path, the ceiling a block-scaled kernel chases); cuBLAS bf16. Our kernel is timed
with its default tiles and with the best of a few candidates (printed, so default_config can follow).
Figures: median microseconds (triton.testing.do_bench), TFLOP/s, and the ratio to the bf16 GEMM of the same run.

Part 2, quality (--model): held-out perplexity of SmolLM2-135M (benchmarks/quant_quality.py's text and scoring)
for fp32, per-channel fp8 and fp8_block at 64 x 64 and 32 x 32 tiles, on CUDA (fp8_block runs through the
Triton kernels there), and GPTQ-rounded fp8 and fp8_block 64 x 64 and 32 x 32 (both with act-order too;
--calib-samples x 256 calibration tokens, default 16; --skip-gptq leaves them out), all in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # quant_quality, beside this script

M_VALUES = (1, 16, 128, 2048)
# tiles tried beside default_config's (64 x 64 up to M = 64, 128 x 128 beyond)
CANDIDATES = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=w, num_stages=s)
              for bm, bn, w, s in ((16, 64, 4, 4), (64, 128, 4, 3), (128, 256, 8, 3))]


def _bench(fn) -> float:
    import triton
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # us


def gemm_rows(block: tuple[int, int] = (128, 128)) -> list[dict]:
    from minillm.kernels.fp8_block_gemm import default_config, fp8_block_gemm, per_token_group_quant_fp8
    from minillm.quant.fp8_block import dequantize_fp8_block, quantize_fp8_block
    shapes = [(m, 14336, 4096) for m in M_VALUES] + [(8192, 8192, 8192)]
    rows = []
    for m, n, k in shapes:
        torch.manual_seed(m)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w8, w_scale = quantize_fp8_block(w.float(), block)
        x8, x_scale = per_token_group_quant_fp8(x, block[1])
        # correctness first, on the first rows (the full emulation at 8192^3 would cost seconds)
        rows_ok = min(m, 64)
        ref = ((x8[:rows_ok].float().reshape(rows_ok, -1, block[1]) * x_scale[:rows_ok, :, None]).reshape(rows_ok, k)
               @ dequantize_fp8_block(w8, w_scale).T)
        got = fp8_block_gemm(x8, w8, x_scale, w_scale, block, out_dtype=torch.float32)[:rows_ok]
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < 1e-3, f"fp8_block_gemm wrong at {(m, n, k)}: max error {err:.2e} of max|ref|"
        flop = 2 * m * n * k
        t_bf16 = _bench(lambda: x @ w.T)
        t_default = _bench(lambda: fp8_block_gemm(x8, w8, x_scale, w_scale, block))

        def layer():  # what the engine runs per linear: quantize the activations, then the GEMM
            a8, a_scale = per_token_group_quant_fp8(x, block[1])
            return fp8_block_gemm(a8, w8, a_scale, w_scale, block)

        t_quant = _bench(layer)
        best, best_cfg = t_default, "default"
        for cfg in CANDIDATES:
            try:
                t = _bench(lambda: fp8_block_gemm(x8, w8, x_scale, w_scale, block, config=cfg))
            except Exception as exc:  # noqa: BLE001  (a tile that does not compile or fit is skipped)
                print(f"  config {cfg} at {(m, n, k)}: {type(exc).__name__}", flush=True)
                continue
            if t < best:
                best, best_cfg = t, cfg
        t_scaled = _scaled_mm_per_tensor(x, w)
        row = {"m": m, "n": n, "k": k, "block": list(block), "max_rel_error": err,
               "bf16_cublas_us": t_bf16, "fp8_per_tensor_scaled_mm_us": t_scaled,
               "fp8_block_default_us": t_default, "default_config": default_config(m, n, k, block[1]),
               "fp8_block_best_us": best, "best_config": best_cfg, "fp8_block_with_quant_us": t_quant}
        row.update({f"{key}_tflops": flop / row[f"{key}_us"] / 1e6 for key in
                    ("bf16_cublas", "fp8_per_tensor_scaled_mm", "fp8_block_default", "fp8_block_best")
                    if row[f"{key}_us"]})
        rows.append(row)
        print(f"M {m:5d} N {n:5d} K {k:5d}: bf16 {t_bf16:8.1f} us  scaled_mm {t_scaled:8.1f}  block default "
              f"{t_default:8.1f} best {best:8.1f} (+quant {t_quant:8.1f})  err {err:.1e}", flush=True)
    return rows


def _scaled_mm_per_tensor(x: torch.Tensor, w: torch.Tensor) -> float:
    """torch._scaled_mm, one scale per tensor, bf16 out; M padded to 16 where cuBLASLt wants it."""
    fp8 = torch.float8_e4m3fn
    xs, ws = x.float().abs().max() / 448, w.float().abs().max() / 448
    x8, w8 = (x.float() / xs).to(fp8), (w.float() / ws).to(fp8)
    if x8.shape[0] % 16:
        x8 = torch.cat([x8, x8.new_zeros(16 - x8.shape[0] % 16, x8.shape[1])])
    wt = w8.t()
    return _bench(lambda: torch._scaled_mm(x8, wt, scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16))


def perplexity_rows(model_path: str, n_samples: int, seq_len: int, gptq: bool, calib_samples: int) -> list[dict]:
    from minillm.engine.worker import build_model
    from minillm.loader import load_model
    from minillm.quant.calibration import calibration_texts, tokenize_to_sequences
    from minillm.quant.driver import quantize_model
    from quant_quality import perplexity
    config, weights, tokenizer = load_model(model_path)
    dense = build_model(config, weights, torch.device("cuda"), torch.float32)
    held_out = tokenize_to_sequences(calibration_texts("held_out"), tokenizer, n_samples, seq_len).cuda()
    calib = tokenize_to_sequences(calibration_texts("calibration"), tokenizer, calib_samples, 256)
    runs = [("fp32", None, {}), ("fp8 w8a8 (per-channel, per-token)", "fp8", {}),
            ("fp8_block 64x64", "fp8_block", {"weight_block_size": 64}),
            ("fp8_block 32x32", "fp8_block", {"weight_block_size": 32})]
    if gptq:  # calibrated on calib_samples x 256 tokens of the calibration split (seconds on the GPU)
        runs += [("fp8 w8a8 gptq", "fp8", {"fp8_gptq": True}),
                 ("fp8_block 64x64 gptq", "fp8_block", {"weight_block_size": 64, "fp8_gptq": True}),
                 ("fp8_block 32x32 gptq", "fp8_block", {"weight_block_size": 32, "fp8_gptq": True}),
                 ("fp8_block 64x64 gptq act-order", "fp8_block",
                  {"weight_block_size": 64, "fp8_gptq": True, "act_order": True}),
                 ("fp8_block 32x32 gptq act-order", "fp8_block",
                  {"weight_block_size": 32, "fp8_gptq": True, "act_order": True})]
    rows = []
    for label, method, opts in runs:
        model = dense if method is None else quantize_model(dense, method, calibration=calib, progress=False,
                                                            **opts).build("cuda")
        ppl = perplexity(model, held_out, 4)
        rows.append({"label": label, "perplexity": ppl})
        print(f"{label:36s} ppl {ppl:.4f}  ({ppl / rows[0]['perplexity'] - 1:+.2%} vs fp32)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--model", default=None, help="SmolLM2 GGUF or HF dir: also measure perplexity")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--skip-gptq", action="store_true", help="with --model: leave out the GPTQ-rounded rows")
    parser.add_argument("--calib-samples", type=int, default=16, help="GPTQ calibration sequences of 256 tokens")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fp8_block needs a CUDA GPU (fp8 tensor cores)", file=sys.stderr)
        return 2
    import triton
    result = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if not args.skip_gemm:
        result["gemm"] = gemm_rows()
    if args.model:
        result["perplexity"] = perplexity_rows(args.model, args.n_samples, args.seq_len, not args.skip_gptq,
                                               args.calib_samples)
        result["held_out_tokens"] = [args.n_samples, args.seq_len]
        result["calibration_tokens"] = [args.calib_samples, 256]
    if "gemm" in result:
        print("\n| M | N | K | bf16 us | fp8 per-tensor scaled_mm us | fp8 block default us | best us | "
              "+quant us | block best / bf16 |\n|---|---|---|---|---|---|---|---|---|")
        for r in result["gemm"]:
            print(f"| {r['m']} | {r['n']} | {r['k']} | {r['bf16_cublas_us']:.1f} | "
                  f"{r['fp8_per_tensor_scaled_mm_us']:.1f} | {r['fp8_block_default_us']:.1f} | "
                  f"{r['fp8_block_best_us']:.1f} | {r['fp8_block_with_quant_us']:.1f} | "
                  f"{r['bf16_cublas_us'] / r['fp8_block_best_us']:.2f}x |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
