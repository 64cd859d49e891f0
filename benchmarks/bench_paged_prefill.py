"""Paged prefill attention vs gather + FlashAttention, for prefills over cached context (issue 14, item 2).

    python benchmarks/bench_paged_prefill.py --out paged_prefill_h200.json
    python benchmarks/bench_paged_prefill.py --smoke     # tiny shapes, runs on a CPU through the interpreter

A chunk of a chunked prefill, or a prompt whose prefix the prefix cache holds, attends to K/V that live in the paged
cache. The engine's previous Triton path copied each sequence's context out of the cache into a packed tensor
(minillm.layers.attention.gather_kv_packed: two index_selects per layer) and ran the varlen FlashAttention of
chapter 3 on it; kernels/paged_prefill.py reads the cache through the block table instead. Per case, on Llama-3-8B's
attention shape (32 heads, 8 kv heads, head_dim 128, bf16, block_size 16, blocks scattered over the pool):

* `FA packed`: flash_attn_varlen on K/V that already sit packed (the gather's cost left out: a lower bound);
* `gather+FA`: the previous engine path, the gather index built once per step as the engine does (not timed);
* `paged`: paged_prefill_attention, reading everything from the cache;
* one fp8-cache case: gather + dequantise + FA vs the paged kernel widening fp8 in registers.

Each variant is captured in a CUDA graph (10 calls per graph) and timed by replays (median of 5 runs), after a
first eager call that autotunes. Correctness first: every variant against SDPA per sequence on the gathered K/V
(bf16 in, fp32 accumulation; bottom-right causal mask). The roofline: causal attention FLOPs / time against a
cuBLAS bf16 GEMM's rate measured in the same run. Look for `speedup` (gather+FA time / paged time) > 1 in every
row, largest where the context is long relative to the new tokens (4096+512, 8192 + 64 x 32), and for `/FA pk`
(paged time / FA packed time: what reading through the block table costs) near 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

import torch

from minillm.kernels.hardware import graph_us

CASES = [(0, 2048, 1), (1024, 512, 1), (4096, 512, 1), (16384, 2048, 1), (8192, 64, 32)]  # (context, new, batch)
FP8_CASES = [(4096, 512, 1)]


def build_case(context: int, new: int, batch: int, heads: int, kv_heads: int, dim: int, block_size: int,
               dtype: torch.dtype, device: str, fp8: bool, gen: torch.Generator):
    """Random q, a pool holding every sequence's context + new tokens in shuffled blocks, and the metadata."""
    from minillm.forward_context import AttentionMetadata
    seq_len = context + new
    per_seq = -(-seq_len // block_size)
    num_blocks = batch * per_seq + 3  # a few spare blocks the tables never name
    pool = torch.randn(2, num_blocks, block_size, kv_heads, dim, device=device)  # torch.manual_seed in main
    k_scale = v_scale = None
    if fp8:  # per-kv-head scales as the engine calibrates them: amax / 448
        from minillm.layers.kv_quant import quantize_kv
        k_scale = pool[0].abs().amax(dim=(0, 1, 3)) / 448.0
        v_scale = pool[1].abs().amax(dim=(0, 1, 3)) / 448.0
        k_cache = quantize_kv(pool[0].flatten(0, 1), k_scale).view(pool[0].shape)
        v_cache = quantize_kv(pool[1].flatten(0, 1), v_scale).view(pool[1].shape)
    else:
        k_cache, v_cache = pool[0].to(dtype), pool[1].to(dtype)
    order = torch.randperm(num_blocks, generator=gen)[:batch * per_seq].view(batch, per_seq)
    q = torch.randn(batch * new, heads, dim, device=device).to(dtype)
    cu = torch.arange(batch + 1, dtype=torch.int32) * new
    meta = AttentionMetadata(cu_seqlens_q=cu.to(device), seq_lens=torch.full((batch,), seq_len, dtype=torch.int32,
                             device=device), max_seqlen_q=new, max_seqlen_k=seq_len,
                             block_tables=order.to(device=device, dtype=torch.int32), block_size=block_size,
                             seq_lens_list=[seq_len] * batch, query_lens_list=[new] * batch)
    return q, k_cache, v_cache, k_scale, v_scale, meta


def variants(q, k_cache, v_cache, k_scale, v_scale, meta, scale):
    """name -> a no-argument callable computing the attention output of the case."""
    from minillm.kernels.flash_attention import flash_attn_varlen
    from minillm.kernels.paged_prefill import paged_prefill_attention
    from minillm.layers.attention import gather_kv_packed
    from minillm.layers.kv_quant import dequantize_kv
    new, seq_len = meta.max_seqlen_q, meta.max_seqlen_k
    k_all, v_all, cu_k = gather_kv_packed(k_cache, v_cache, meta, meta.seq_lens_list)  # builds the step's index
    if k_scale is not None:
        k_all, v_all = dequantize_kv(k_all, k_scale, q.dtype), dequantize_kv(v_all, v_scale, q.dtype)

    def gather_fa():
        k, v, cu_seqlens_k = gather_kv_packed(k_cache, v_cache, meta, meta.seq_lens_list)
        if k_scale is not None:
            k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
        return flash_attn_varlen(q, k, v, meta.cu_seqlens_q, cu_seqlens_k, new, seq_len, softmax_scale=scale)

    return {
        "FA packed": lambda: flash_attn_varlen(q, k_all, v_all, meta.cu_seqlens_q, cu_k, new, seq_len,
                                               softmax_scale=scale),
        "gather+FA": gather_fa,
        "paged": lambda: paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                                 meta.cu_seqlens_q, softmax_scale=scale, k_scale=k_scale,
                                                 v_scale=v_scale),
    }, (k_all, v_all)


def reference(q, k_all, v_all, meta, scale) -> torch.Tensor:
    from minillm.layers.attention import sdpa_attention
    new, seq_len = meta.max_seqlen_q, meta.max_seqlen_k
    outs = [sdpa_attention(q[b * new:(b + 1) * new], k_all[b * seq_len:(b + 1) * seq_len],
                           v_all[b * seq_len:(b + 1) * seq_len], scale) for b in range(meta.num_seqs)]
    return torch.cat(outs)


def time_us(fn, device: str, calls_per_graph: int = 10, runs: int = 5) -> float:
    """Microseconds per call: CUDA-graph replays on a GPU (fn already warmed up), plain calls on a CPU."""
    if device != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # capture-time allocations warm up on a side stream, as torch recommends
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph_us(lambda i: fn(), calls_per_graph, trials=runs)


def gemm_tflops() -> float:
    """cuBLAS bf16 GEMM 8192^3 in this run (the compute roofline of the table)."""
    import triton
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100)
    return 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def causal_flops(context: int, new: int, batch: int, heads: int, dim: int) -> float:
    """QK^T and PV over the visible keys: query j of a chunk sees context + j + 1 keys."""
    visible = new * context + new * (new + 1) / 2
    return 4.0 * batch * heads * dim * visible


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU through the interpreter works)")
    args = parser.parse_args()
    import minillm  # noqa: F401  (sets TRITON_INTERPRET before triton is imported when there is no CUDA)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("needs CUDA (or --smoke for a tiny CPU run)", file=sys.stderr)
        return 2
    if args.smoke:
        heads, kv_heads, dim, block_size, dtype = 6, 2, 32, 4, torch.float32
        cases = [(0, 9, 1, False), (5, 3, 1, False), (7, 1, 3, False), (6, 5, 1, True)]
    else:
        heads, kv_heads, dim, block_size, dtype = 32, 8, 128, 16, torch.bfloat16
        cases = [c + (False,) for c in CASES] + [c + (True,) for c in FP8_CASES]
    scale = dim ** -0.5
    peak = gemm_tflops() if device == "cuda" else float("nan")
    gen = torch.Generator().manual_seed(0)  # the block order; values come from the device's generator
    torch.manual_seed(0)
    rows, failures = [], 0
    for context, new, batch, fp8 in cases:
        q, k_cache, v_cache, k_scale, v_scale, meta = build_case(context, new, batch, heads, kv_heads, dim, block_size,
                                                                 dtype, device, fp8, gen)
        fns, (k_all, v_all) = variants(q, k_cache, v_cache, k_scale, v_scale, meta, scale)
        ref = reference(q, k_all, v_all, meta, scale).float()
        row = {"context": context, "new_tokens": new, "batch": batch, "kv_cache": "fp8" if fp8 else str(dtype)[6:]}
        for name, fn in fns.items():
            err = (fn().float() - ref).abs().max().item()  # first call: compiles and autotunes
            row[f"{name} max_err"] = err
            if not err < (2e-2 if dtype == torch.bfloat16 else 1e-4):
                failures += 1
                print(f"MISMATCH {name} at {row}: max abs error {err:.3g}", file=sys.stderr)
            row[f"{name} us"] = time_us(fn, device)
        flops = causal_flops(context, new, batch, heads, dim)
        row["speedup"] = row["gather+FA us"] / row["paged us"]
        row["paged / FA packed"] = row["paged us"] / row["FA packed us"]  # the price of paging, gather left out
        row["paged TFLOP/s"] = flops / row["paged us"] / 1e6
        row["paged fraction of GEMM"] = row["paged TFLOP/s"] / peak
        rows.append(row)
        del q, k_cache, v_cache, k_all, v_all, fns, ref
        if device == "cuda":
            torch.cuda.empty_cache()

    print(f"\npaged prefill attention, {heads} heads / {kv_heads} kv heads / d{dim}, {str(dtype)[6:]}, "
          f"block {block_size}; {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter)'}; bf16 GEMM "
          f"{peak:.0f} TFLOP/s in this run")
    print(f"{'context+new x batch':<24}{'kv':>9}{'FA packed us':>14}{'gather+FA us':>14}{'paged us':>11}"
          f"{'speedup':>9}{'/FA pk':>8}{'TFLOP/s':>9}{'of GEMM':>9}{'max err':>10}")
    for r in rows:
        print(f"{r['context']:>6}+{r['new_tokens']:<5} x {r['batch']:<9}{r['kv_cache']:>9}{r['FA packed us']:>14.1f}"
              f"{r['gather+FA us']:>14.1f}{r['paged us']:>11.1f}{r['speedup']:>9.2f}{r['paged / FA packed']:>8.2f}"
              f"{r['paged TFLOP/s']:>9.0f}"
              f"{r['paged fraction of GEMM']:>9.0%}{r['paged max_err']:>10.2g}")
    try:  # which tiles the autotuner chose (an attribute of triton's autotuner, not a stable API)
        from minillm.kernels import paged_prefill
        best = str(paged_prefill._autotuned_kernel.best_config)
    except Exception:  # noqa: BLE001
        best = None
    print(f"paged kernel config: {best}; {'ALL CORRECT' if not failures else f'{failures} MISMATCHES'}")
    if args.out:
        result = {"bench": "paged_prefill", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "torch": torch.__version__, "triton": __import__("triton").__version__,
                  "shape": {"heads": heads, "kv_heads": kv_heads, "head_dim": dim, "block_size": block_size},
                  "gemm_tflops": peak, "paged_config": best, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
