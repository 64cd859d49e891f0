"""Benchmark minillm's Triton kernels on a GPU against torch baselines measured in the same run.

    python benchmarks/bench_kernels.py [--quick] [--out results.json]

P1  FlashAttention forward, causal, bf16, 32 heads x 128, 16k tokens in total at seq 1k / 4k / 16k:
    TFLOP/s (FLOPs = 4 * S^2 * D * H * B / 2 for causal) and the ratio to torch SDPA (is_causal).
P2  Paged decode with the engine's defaults (num_splits and tile from the heuristic), batch 1..256 x context
    1k..32k (--quick: a corner of it), 32 query / 8 kv heads, d 128, block 16, random block tables, every call
    replayed from a CUDA graph over enough disjoint blocks that L2 holds none of them: effective bandwidth
    (bytes of K + V read, plus q and out) as a fraction of the device-to-device copy bandwidth measured in the
    same run, and the ratio to SDPA over the same KV laid out contiguously [B, KVH, S, D], timed the same way
    (helpers shared with benchmarks/sweep_paged_decode.py, which finds the heuristic's settings).
P3  The fused memory-bound kernels (rms_norm + residual, rotary, silu_and_mul, store_kvcache) at Llama-3-8B
    sizes: bandwidth fraction and the ratio to the eager torch code they replace.
Every kernel is checked against its baseline before it is timed. Needs CUDA (the Triton interpreter would
take hours at these sizes); a short table is printed last, and the raw numbers go to --out as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

PEAK_BYTES_PER_S = 3.0e12  # H100 SXM, measured device-to-device copy
PEAK_BF16_FLOPS = 790e12  # H100 SXM, measured 8k^3 bf16 GEMM


def _time_ms(fn, quick: bool) -> float:
    """Median time of fn in ms (triton.testing.do_bench; falls back to its older signature)."""
    import torch
    from triton.testing import do_bench

    fn()  # compile and autotune outside the timed region
    torch.cuda.synchronize()
    warmup, rep = (10, 30) if quick else (25, 200)
    try:
        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:
        res = do_bench(fn, warmup=warmup, rep=rep)
        return float(res[0] if isinstance(res, (tuple, list)) else res)


def _time_graph_ms(fn, quick: bool) -> float:
    """Median time of fn replayed from a CUDA graph: the GPU time alone, without Python launch overhead
    (what the engine's CUDA-graph decode sees). NaN where this triton/torch cannot capture it."""
    import torch

    try:
        from triton.testing import do_bench_cudagraph

        fn()
        torch.cuda.synchronize()
        try:
            return float(do_bench_cudagraph(fn, rep=20 if quick else 100, return_mode="median"))
        except TypeError:
            res = do_bench_cudagraph(fn, rep=20 if quick else 100)
            return float(res[0] if isinstance(res, (tuple, list)) else res)
    except Exception as exc:  # noqa: BLE001  (optional figure)
        print(f"CUDA-graph timing unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return math.nan


def _check(name: str, got, ref, atol: float, rtol: float) -> None:
    import torch

    err = (got.float() - ref.float()).abs()
    bad = err > atol + rtol * ref.float().abs()
    if bad.any():
        raise SystemExit(f"correctness check failed for {name}: max abs error {err.max().item():.3g}, "
                         f"{int(bad.sum())} of {bad.numel()} elements outside atol={atol}, rtol={rtol}")
    torch.cuda.synchronize()


def _sdpa(q, k, v, causal):
    """SDPA with GQA: enable_gqa where this torch has it, else the kv heads repeated (outside the timer)."""
    import torch.nn.functional as F

    try:
        F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], enable_gqa=True)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except (TypeError, RuntimeError):
        rep = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)


def bench_flash(quick: bool) -> list[dict]:
    import torch

    from minillm.kernels.flash_attention import flash_attention

    heads, kv_heads, d, total = 32, 32, 128, 16384
    rows = []
    for seq in (1024, 4096) if quick else (1024, 4096, 16384):
        batch = total // seq
        q, k, v = (torch.randn(batch, h, seq, d, device="cuda", dtype=torch.bfloat16)
                   for h in (heads, kv_heads, kv_heads))
        sdpa = _sdpa(q, k, v, True)
        _check(f"flash_attention seq {seq}", flash_attention(q, k, v, causal=True), sdpa(), 2e-2, 2e-2)
        flops = 4 * seq * seq * d * heads * batch / 2
        t_ours = _time_ms(lambda: flash_attention(q, k, v, causal=True), quick)
        t_sdpa = _time_ms(sdpa, quick)
        rows.append({"bench": "P1 flash causal bf16", "seq": seq, "batch": batch, "heads": heads, "head_dim": d,
                     "ms": t_ours, "sdpa_ms": t_sdpa, "tflops": flops / t_ours / 1e9,
                     "sdpa_tflops": flops / t_sdpa / 1e9, "fraction_of_peak": flops / t_ours / 1e-3 / PEAK_BF16_FLOPS,
                     "ratio_vs_sdpa": t_sdpa / t_ours})
        del q, k, v
    try:  # which tile shape the autotuner chose, for the record
        from minillm.kernels import flash_attention as fa
        rows[-1]["best_config"] = str(fa._autotuned_kernel.best_config)
    except Exception:  # noqa: BLE001  (an attribute of triton's autotuner, not a stable API)
        pass
    return rows


def bench_paged_decode(quick: bool) -> list[dict]:
    """P2 over batch x context; the target is >= 90% of copy bandwidth at every shape."""
    import os

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import sweep_paged_decode as sweep  # noqa: E402  (a sibling script, not a package)
    from minillm.kernels.decode_split_rule import choose_num_splits
    from minillm.kernels.paged_attention import paged_decode_attention

    batches, ctxs = ((1, 8, 64, 256), (1024, 32768)) if quick else (sweep.BATCHES, sweep.CONTEXTS)
    shapes = [(b, c) for b in batches for c in ctxs if sweep.kv_bytes(b, c) <= sweep.MAX_KV_BYTES]
    pool = sweep.CachePool(max(sweep.rotation_count(b, c) * b * c // sweep.BLOCK_SIZE for b, c in shapes))
    copy_bw = sweep.copy_bandwidth(2 << 30)
    heads, kv_heads, d = sweep.HEADS, sweep.KV_HEADS, sweep.HEAD_DIM
    rows = []
    for batch, ctx in shapes:
        insts = pool.instances(batch, ctx, sweep.rotation_count(batch, ctx))
        err = sweep.check(pool, insts[0], {}, f"P2 B{batch} ctx{ctx}")
        ours = sweep.time_config(pool, insts, {})
        contiguous = []  # the same keys and values as [B, KVH, S, D] for SDPA
        for q, tables, _ in insts:
            kv = [c[tables.long()].reshape(batch, ctx, kv_heads, d).transpose(1, 2).contiguous()
                  for c in (pool.k_cache, pool.v_cache)]
            contiguous.append((q.unsqueeze(2), *kv))
        sdpa = sweep.graph_time_us([_sdpa(q, k, v, False) for q, k, v in contiguous])
        del contiguous
        nbytes = sweep.bytes_moved(insts[0][2])
        rows.append({"bench": "P2 paged decode bf16", "batch": batch, "ctx": ctx, "heads": heads,
                     "kv_heads": kv_heads, "head_dim": d, "block_size": sweep.BLOCK_SIZE,
                     "num_splits": choose_num_splits(batch, kv_heads, ctx, torch.device("cuda")),
                     "graph_us": ours, "sdpa_graph_us": sdpa, "ratio_vs_sdpa": sdpa / ours,
                     "tb_per_s": nbytes / ours / 1e6, "fraction_of_copy": nbytes / (ours * 1e-6) / copy_bw,
                     "sdpa_fraction_of_copy": nbytes / (sdpa * 1e-6) / copy_bw, "copy_tb_per_s": copy_bw / 1e12,
                     "rotation": len(insts), "max_abs_err": err})
        r = rows[-1]
        print(f"P2 B{batch} ctx{ctx}: {r['fraction_of_copy']:.0%} of copy, {r['ratio_vs_sdpa']:.2f}x SDPA",
              file=sys.stderr, flush=True)
    del pool
    return rows


def print_paged_decode(rows: list[dict]) -> None:
    """The P2 table: one line per (batch, ctx), and the worst shape against the 90% target."""
    if not rows:
        return
    print(f"\nP2 paged decode, CUDA graphs, L2-cold; copy bandwidth in this run {rows[0]['copy_tb_per_s']:.2f} TB/s "
          "(read + written); fraction = (K + V + q + out bytes) / time / copy bandwidth")
    print(f"{'batch':>6}{'ctx':>7}{'splits':>8}{'us':>10}{'TB/s':>8}{'of copy':>9}{'SDPA us':>10}{'SDPA of copy':>14}"
          f"{'x SDPA':>8}")
    for r in rows:
        print(f"{r['batch']:>6}{r['ctx']:>7}{r['num_splits']:>8}{r['graph_us']:>10.1f}{r['tb_per_s']:>8.2f}"
              f"{r['fraction_of_copy']:>9.0%}{r['sdpa_graph_us']:>10.1f}{r['sdpa_fraction_of_copy']:>14.0%}"
              f"{r['ratio_vs_sdpa']:>8.2f}")
    worst = min(rows, key=lambda r: r["fraction_of_copy"])
    print(f"worst: B{worst['batch']} ctx{worst['ctx']} at {worst['fraction_of_copy']:.0%} of copy bandwidth "
          f"(target >= 90%); {sum(r['fraction_of_copy'] >= 0.9 for r in rows)} of {len(rows)} shapes meet it")


def bench_fused(quick: bool) -> list[dict]:
    import torch

    from minillm.kernels.fused import rms_norm, rotary_embedding_, silu_and_mul, store_kvcache

    dev, bf, tokens = "cuda", torch.bfloat16, 4096 if quick else 8192
    hidden, inter, heads, kv_heads, d = 4096, 14336, 32, 8, 128
    x, res, w = (torch.randn(tokens, hidden, device=dev, dtype=bf), torch.randn(tokens, hidden, device=dev, dtype=bf),
                 torch.randn(hidden, device=dev, dtype=bf))

    def torch_rms():
        h = x + res
        hf = h.float()
        return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf) * w, h

    gate_up = torch.randn(tokens, 2 * inter, device=dev, dtype=bf)
    torch_silu = lambda: torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # noqa: E731
    q, k = torch.randn(tokens, heads, d, device=dev, dtype=bf), torch.randn(tokens, kv_heads, d, device=dev, dtype=bf)
    pos = torch.randint(0, 8192, (tokens,), device=dev)
    inv_freq = 1.0 / 5e5 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d)
    freqs = torch.outer(torch.arange(8192, device=dev, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)

    def torch_rope():
        cos, sin = cos_sin[pos, : d // 2].unsqueeze(1), cos_sin[pos, d // 2:].unsqueeze(1)
        out = []
        for t in (q, k):
            x1, x2 = t[..., : d // 2].float(), t[..., d // 2:].float()
            out.append(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(bf))
        return out

    k_cache = torch.zeros(tokens // 16 + 1, 16, kv_heads, d, device=dev, dtype=bf)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(k_cache.shape[0] * 16, device=dev)[:tokens]

    def torch_store():
        k_cache.view(-1, kv_heads, d)[slots] = k
        v_cache.view(-1, kv_heads, d)[slots] = k

    _check("rms_norm", rms_norm(x, w, 1e-5, residual=res)[0], torch_rms()[0], 5e-2, 2e-2)
    _check("silu_and_mul", silu_and_mul(gate_up), torch_silu(), 5e-2, 2e-2)
    q0, k0 = q.clone(), k.clone()
    ref_q, ref_k = torch_rope()
    rotary_embedding_(pos, q0, k0, cos_sin)
    _check("rotary_embedding_", torch.cat([q0, k0], 1), torch.cat([ref_q, ref_k], 1), 5e-2, 2e-2)
    store_kvcache(k, k, k_cache, v_cache, slots)
    _check("store_kvcache", k_cache.view(-1, kv_heads, d)[slots], k, 0.0, 0.0)

    cases = [  # name, ours, torch's, bytes the fused kernel must move
        ("rms_norm+residual", lambda: rms_norm(x, w, 1e-5, residual=res), torch_rms, 4 * tokens * hidden * 2),
        ("silu_and_mul", lambda: silu_and_mul(gate_up), torch_silu, 3 * tokens * inter * 2),
        ("rotary_embedding_", lambda: rotary_embedding_(pos, q, k, cos_sin), torch_rope,
         2 * tokens * (heads + kv_heads) * d * 2 + tokens * d * 4),
        ("store_kvcache", lambda: store_kvcache(k, k, k_cache, v_cache, slots), torch_store,
         4 * tokens * kv_heads * d * 2),
    ]
    rows = []
    for name, ours, base, nbytes in cases:
        t, t_torch = _time_ms(ours, quick), _time_ms(base, quick)
        g, g_torch = _time_graph_ms(ours, quick), _time_graph_ms(base, quick)
        rows.append({"bench": f"P3 {name}", "tokens": tokens, "ms": t, "torch_ms": t_torch, "graph_ms": g,
                     "baseline_graph_ms": g_torch, "graph_ratio": g_torch / g,
                     "tb_per_s": nbytes / t / 1e9, "fraction_of_peak": nbytes / t / 1e-3 / PEAK_BYTES_PER_S,
                     "ratio_vs_torch": t_torch / t})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (about a minute)")
    parser.add_argument("--out", default=None, help="write the raw results as JSON to this path")
    parser.add_argument("--only", choices=["flash", "decode", "fused"], action="append",
                        help="run only these parts (repeatable)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU: the Triton interpreter on a CPU would take hours at these "
              "sizes. Run it on an H100 (the figures in benchmarks/RESULTS.md come from one).", file=sys.stderr)
        return 2
    import triton

    parts = {"flash": bench_flash, "decode": bench_paged_decode, "fused": bench_fused}
    results, errors = [], {}
    for name in args.only or list(parts):
        try:
            results += parts[name](args.quick)
        except SystemExit:
            raise  # a failed correctness check: no timing is worth reporting
        except Exception as exc:  # keep the other parts' figures if one part breaks on this setup
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"[{name}] failed: {errors[name]}", file=sys.stderr)
        torch.cuda.empty_cache()

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "quick": args.quick, "peak_bytes_per_s": PEAK_BYTES_PER_S,
            "peak_bf16_flops": PEAK_BF16_FLOPS}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "errors": errors}, f, indent=2)

    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  {meta['date']}")
    print("ms: eager median (do_bench); graph: replayed from a CUDA graph (no launch overhead); "
          "x: baseline time / ours (SDPA for P1/P2, eager torch for P3)")
    print(f"{'benchmark':<28}{'shape':<22}{'ms':>9}{'baseline ms':>13}{'x baseline':>12}{'graph ms':>10}"
          f"{'x (graph)':>11}{'metric (eager)':>24}")
    for r in results:
        if r["bench"].startswith("P2"):
            continue  # its own table below
        if r["bench"].startswith("P1"):
            shape, metric = f"B{r['batch']} S{r['seq']}", f"{r['tflops']:.0f} TFLOP/s ({r['fraction_of_peak']:.0%})"
        else:
            shape, metric = f"T{r['tokens']}", f"{r['tb_per_s']:.2f} TB/s ({r['fraction_of_peak']:.0%})"
        base = r.get("sdpa_ms", r.get("torch_ms", math.nan))
        ratio = r.get("ratio_vs_sdpa", r.get("ratio_vs_torch", math.nan))
        print(f"{r['bench']:<28}{shape:<22}{r['ms']:>9.3f}{base:>13.3f}{ratio:>12.2f}"
              f"{r.get('graph_ms', math.nan):>10.3f}{r.get('graph_ratio', math.nan):>11.2f}{metric:>24}")
    print_paged_decode([r for r in results if r["bench"].startswith("P2")])
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
