"""Paged decode attention with the split-KV merge fused into the split kernel, against the two-kernel path.

    python benchmarks/bench_decode_merge.py --out merge.json [--batches 1,8,32] [--ctxs 512,4096,32768]
        [--sweep 1:512,1:4096,32:4096] [--splits 1,2,4,8,16,32] [--min-split-tokens-full 256]

What it answers. kernels/paged_attention.py merges the num_splits partial outputs of a decode step either in a
second kernel (fused_merge=False: a launch and a kernel boundary per layer) or in the split kernel itself, in the
last program of each (sequence, kv head) to finish (fused_merge=True, the default). Per (batch, ctx) of Llama-3-8B
attention (32 q heads, 8 kv heads, head_dim 128, bf16, block size 16) it times both at the split count the rule
(choose_decode_config) picks, then forces num_splits over --splits at the --sweep shapes, fused and not: with
the merge almost free, more splits may pay where the rule's MIN_SPLIT_TOKENS_FULL (which charges the merge
launch ~5 us) refuses them. --min-split-tokens-full N adds a row per shape with the rule run under that
threshold instead (fused), which is the change to measure before making it.

How it times. Each variant is captured in one CUDA graph holding several instances of the shape over disjoint
cache blocks (at least 256 MB of KV, so no instance finds its keys in L2: in a real step the other layers have
evicted them), replayed 10 times to warm up and 50 times timed; the figure is the median replay's time (CUDA
events) divided by the instances. us per call and GB/s of K + V read, and that as a fraction of the
device-to-device copy bandwidth measured in the same run. Every output is checked against a float32 reference
first (and fused against two-kernel); the arrival counters must be all zero at the end. About a minute on an H200.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep_paged_decode import (BLOCK_SIZE, HEAD_DIM, HEADS, KV_HEADS, CachePool, _ints, check,  # noqa: E402
                                copy_bandwidth, kv_bytes, rotation_count)

REPLAYS, WARM_REPLAYS = 50, 10


def replay_median_us(calls) -> float:
    """Median microseconds per call of `calls` captured in one CUDA graph, over REPLAYS timed replays."""
    for fn in calls:  # Triton compiles, the arrival counters are allocated: outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    for _ in range(WARM_REPLAYS):
        graph.replay()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(REPLAYS + 1)]
    events[0].record()
    for e in events[1:]:
        graph.replay()
        e.record()
    events[-1].synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(events, events[1:]))
    del graph
    return times[len(times) // 2] * 1e3 / len(calls)


def measure(pool: CachePool, insts, batch: int, ctx: int, label: str, copy_bw: float, **config) -> dict:
    from minillm.kernels.paged_attention import paged_decode_attention

    check(pool, insts[0], config, label)  # against float32 attention; exits on a failure
    us = replay_median_us([lambda i=i: paged_decode_attention(i[0], pool.k_cache, pool.v_cache, i[1], i[2],
                                                              **config) for i in insts])
    gbs = kv_bytes(batch, ctx) / us / 1e3
    return {"batch": batch, "ctx": ctx, "variant": label, **config, "us": us, "kv_gb_per_s": gbs,
            "fraction_of_copy": gbs * 1e9 / copy_bw}


def shape_rows(pool, batch, ctx, copy_bw, min_full) -> list[dict]:
    """The rule's split count, fused and two-kernel (and under another MIN_SPLIT_TOKENS_FULL, fused)."""
    import minillm.kernels.decode_split_rule as rule
    import minillm.kernels.paged_attention as paged

    insts = pool.instances(batch, ctx, rotation_count(batch, ctx))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    splits = rule.choose_decode_config(batch, KV_HEADS, ctx, sms).num_splits
    q, tables, seq_lens = insts[0]
    fused, two = (paged.paged_decode_attention(q, pool.k_cache, pool.v_cache, tables, seq_lens, fused_merge=f)
                  for f in (True, False))
    if not torch.allclose(fused.float(), two.float(), atol=1e-3, rtol=8e-3):  # a bf16 ulp apart at most
        raise SystemExit(f"fused and two-kernel outputs differ at B{batch} ctx{ctx}")
    rows = [measure(pool, insts, batch, ctx, f"rule fused ({splits} splits)", copy_bw, fused_merge=True),
            measure(pool, insts, batch, ctx, f"rule two-kernel ({splits} splits)", copy_bw, fused_merge=False)]
    if min_full is not None:
        saved = rule.MIN_SPLIT_TOKENS_FULL
        rule.MIN_SPLIT_TOKENS_FULL = min_full
        try:
            alt = rule.choose_decode_config(batch, KV_HEADS, ctx, sms).num_splits
            rows.append(measure(pool, insts, batch, ctx, f"min_full {min_full} fused ({alt} splits)", copy_bw,
                                fused_merge=True))
        finally:
            rule.MIN_SPLIT_TOKENS_FULL = saved
    return rows


def sweep_rows(pool, batch, ctx, splits_list, copy_bw) -> list[dict]:
    """num_splits forced, fused and two-kernel (the default tile for that split count)."""
    insts = pool.instances(batch, ctx, rotation_count(batch, ctx))
    rows = []
    for s in splits_list:
        if s > 1 and ctx // s < BLOCK_SIZE:
            continue
        for fused in ((True,) if s == 1 else (True, False)):  # one split has no merge
            label = f"{s} splits {'fused' if fused else 'two-kernel'}"
            rows.append(measure(pool, insts, batch, ctx, label, copy_bw, num_splits=s, fused_merge=fused))
    return rows


def print_table(title: str, rows: list[dict], copy_bw: float) -> None:
    print(f"\n{title}  (copy bandwidth {copy_bw / 1e12:.2f} TB/s read + write; GB/s = K + V bytes / time)")
    print(f"{'batch':>6}{'ctx':>7}  {'variant':<34}{'us/call':>10}{'KV GB/s':>10}{'of copy':>9}")
    for r in rows:
        print(f"{r['batch']:>6}{r['ctx']:>7}  {r['variant']:<34}{r['us']:>10.2f}{r['kv_gb_per_s']:>10.0f}"
              f"{r['fraction_of_copy']:>9.0%}")


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"need batch:ctx pairs, comma-separated, got {text!r}") from None
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"need positive batch:ctx pairs, got {text!r}")
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--batches", type=_ints, default=[1, 8, 32])
    parser.add_argument("--ctxs", type=_ints, default=[512, 4096, 32768])
    parser.add_argument("--sweep", type=_shapes, default=[(1, 512), (1, 4096), (32, 4096)],
                        help="batch:ctx shapes whose split count is forced over --splits")
    parser.add_argument("--splits", type=_ints, default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--min-split-tokens-full", type=int, default=None,
                        help="also time the rule under this MIN_SPLIT_TOKENS_FULL (fused)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_merge.py needs a CUDA GPU.", file=sys.stderr)
        return 2
    shapes = [(b, c) for b in args.batches for c in args.ctxs]
    bad = [c for _, c in shapes + args.sweep if c % BLOCK_SIZE]
    if bad:
        parser.error(f"contexts must be multiples of the block size {BLOCK_SIZE}, got {bad}")
    if args.min_split_tokens_full is not None and args.min_split_tokens_full < 1:
        parser.error(f"--min-split-tokens-full must be >= 1, got {args.min_split_tokens_full}")
    import triton

    import minillm.kernels.decode_split_rule as rule
    import minillm.kernels.paged_attention as paged

    need = max(rotation_count(b, c) * b * c // BLOCK_SIZE for b, c in shapes + args.sweep)
    pool = CachePool(need)
    copy_bw = copy_bandwidth(2 << 30)
    main_rows, sweep = [], []
    for b, c in shapes:
        rows = shape_rows(pool, b, c, copy_bw, args.min_split_tokens_full)
        main_rows += rows
        print(f"B{b} ctx{c}: " + ", ".join(f"{r['variant']} {r['us']:.2f} us" for r in rows), flush=True)
    for b, c in args.sweep:
        sweep += sweep_rows(pool, b, c, args.splits, copy_bw)
    torch.cuda.synchronize()
    dirty = [str(d) for d, buf in paged._ARRIVALS.items() if buf.any()]
    if dirty:
        raise SystemExit(f"arrival counters not back at zero on {dirty}")
    meta = {"device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_bytes_per_s": copy_bw, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE, "replays": REPLAYS}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rule": main_rows, "sweep": sweep}, f, indent=1)
    print_table("The rule's split count: merge fused into the split kernel vs a second kernel", main_rows, copy_bw)
    print_table("num_splits forced", sweep, copy_bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
