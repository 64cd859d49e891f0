"""Sweep paged decode attention's launch configuration over batch x context on one GPU (issue 14, P2).

    python benchmarks/sweep_paged_decode.py --out sweep.json [--quick] [--batches 1,8] [--ctxs 4096]
    python benchmarks/sweep_paged_decode.py --heads 9,3,64 --batches 1,8 --ctxs 128,256,512,1024   (SmolLM2's)
    python benchmarks/sweep_paged_decode.py --batches 64,128,256 --ctxs 2048 --min-ctx 100   (P6's mixed batches)

What it measures. kernels/paged_attention.py reads each sequence's K and V once per decode step, so its
roofline is memory bandwidth: bytes = K + V read (batch x ctx x kv heads x head_dim x 2 bytes, twice) plus q
read and out written. The figure is that many bytes over the kernel's time, as a fraction of the
device-to-device copy bandwidth measured in the same run (a 1 GiB copy; bytes read + written). Small shapes
are also compared with a copy of the same number of bytes, which pays the same launch and ramp-up latency.

How it times. Every variant is replayed from a CUDA graph (what the engine's decode step does), and each graph
holds several instances of the shape over disjoint cache blocks with fresh queries, at least 256 MB of KV in
all, so no instance finds its keys in the 50 MB L2 left by the previous one: in a real step the other layers'
weights have evicted them too. Time per call = graph time / instances, median of a few trials.

What it sweeps, per (batch, ctx) of Llama-3-8B attention (32 query heads, 8 kv heads, head_dim 128; or --heads),
bf16, block_size 16 (the engine's default), random block tables:
  stage 1: num_splits in {1, 2, 4, ..., 64} (splits of fewer than 64 keys skipped) with today's tile;
  stage 2: the tile variants (BLOCK_N, num_warps, num_stages, block table read one tile ahead or not) at the
           two best split counts of stage 1, and at the rule's split count;
  and the heuristic (num_splits=None, default tile), i.e. what the engine runs.
With --min-ctx LO each sequence's context is drawn uniformly from LO..ctx (seeded) instead of all being ctx: the
batches of a serving run (P6: contexts of 100..2048 tokens in one decode step), where the block table is ctx
wide and the heuristic sees only that width. Bytes are then those of the contexts actually drawn.
The best configuration of each shape and the heuristic's are checked against a float32 torch reference
before the table is printed. The table gives, per shape, the heuristic's and the best config's fraction of
copy bandwidth. Raw rows and the summary go to --out as JSON; about 1-2 minutes on an H200.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTEXTS = (1024, 4096, 16384, 32768)
SPLITS = (1, 2, 4, 8, 16, 32, 64)
# (block_n, num_warps, num_stages, prefetch_table); the first is the rule's usual tile on CUDA. Without the
# prefetch the stage count changes nothing (the pipeliner keeps one K/V tile in flight either way).
TILES = ((64, 4, 2, False), (64, 4, 3, False), (32, 4, 3, False), (128, 4, 3, False), (64, 8, 3, False),
         (64, 4, 3, True), (32, 4, 3, True), (32, 4, 4, True), (64, 4, 2, True), (64, 4, 4, True),
         (128, 4, 3, True), (64, 8, 3, True), (128, 8, 3, True))
TILE_KEYS = ("block_n", "num_warps", "num_stages", "prefetch_table")
CONFIG_KEYS = ("num_splits",) + TILE_KEYS
MAX_KV_BYTES = 40e9  # skip shapes whose KV cache would not fit beside the rest
ROTATE_BYTES = 256e6  # KV bytes per timed graph at least: 5x the H200's L2
MIN_SPLIT_KEYS = 64
MIN_CTX = None  # --min-ctx: contexts drawn from MIN_CTX..ctx per sequence (None: every sequence has ctx keys)


def kv_bytes(batch: int, ctx: int) -> int:
    return 2 * batch * ctx * KV_HEADS * HEAD_DIM * 2


def kv_read_bytes(seq_lens: torch.Tensor) -> int:
    """K and V bytes a decode step reads for these contexts (bf16): kv_bytes(batch, ctx) when all are ctx."""
    return 4 * int(seq_lens.sum()) * KV_HEADS * HEAD_DIM


def bytes_moved(seq_lens: torch.Tensor) -> int:
    """The kernel's compulsory traffic: K and V read, q read, out written (bf16)."""
    return kv_read_bytes(seq_lens) + 2 * seq_lens.numel() * HEADS * HEAD_DIM * 2


def graph_time_us(calls, trials: int = 3, min_gpu_ms: float = 1.0, warm_ms: float = 5.0, best: bool = False) -> float:
    """Median (or best) microseconds per call of `calls` (zero-argument functions) replayed from one CUDA graph.

    The graph is replayed for warm_ms first: after the host-side work of building and capturing it, the GPU's
    clocks may have dropped (an idle H200 sits at 345 MHz), and the first replays would be timed slow.
    """
    for fn in calls:  # compile (and autotune) outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # outputs allocated during capture live in the graph's private pool
        for fn in calls:
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    one_ms = max(start.elapsed_time(end), 1e-3)
    for _ in range(min(1000, math.ceil(warm_ms / one_ms))):
        graph.replay()
    reps = max(1, min(200, math.ceil(min_gpu_ms / one_ms)))
    times = []
    for _ in range(trials):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    del graph
    return min(times) if best else sorted(times)[len(times) // 2]


class CachePool:
    """One paged KV pool for every shape (the largest shape's blocks), filled with random bf16 values."""

    def __init__(self, num_blocks: int, seed: int = 0, device: str = "cuda"):
        gen = torch.Generator(device=device).manual_seed(seed)
        shape = (num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        self.k_cache = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
        self.v_cache = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
        self.gen, self.device = gen, device

    def instances(self, batch: int, ctx: int, count: int):
        """`count` decode batches over disjoint random blocks: (q, block_tables, seq_lens) each."""
        per_seq = ctx // BLOCK_SIZE
        need = count * batch * per_seq
        if need > self.k_cache.shape[0]:
            raise ValueError(f"pool of {self.k_cache.shape[0]} blocks cannot hold {need}")
        perm = torch.randperm(self.k_cache.shape[0], device=self.device, generator=self.gen)[:need].to(torch.int32)
        tables = perm.view(count, batch, per_seq)
        if MIN_CTX is None:
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=self.device)
        else:  # a serving batch: contexts uniform in MIN_CTX..ctx, the same draw for a given (batch, ctx)
            cpu = torch.Generator().manual_seed(batch * 100003 + ctx)
            seq_lens = torch.randint(MIN_CTX, ctx + 1, (batch,), generator=cpu, dtype=torch.int32).to(self.device)
        return [(torch.randn(batch, HEADS, HEAD_DIM, device=self.device, dtype=torch.bfloat16, generator=self.gen),
                 tables[i].contiguous(), seq_lens) for i in range(count)]


def rotation_count(batch: int, ctx: int) -> int:
    return max(1, min(64, math.ceil(ROTATE_BYTES / kv_bytes(batch, ctx))))


def reference(q, k_cache, v_cache, block_tables, seq_lens, rows: int = 4) -> torch.Tensor:
    """float32 attention of the first `rows` sequences over their gathered keys: [rows, H, D]."""
    outs = []
    for b in range(min(rows, q.shape[0])):
        n = int(seq_lens[b])
        blocks = block_tables[b, : -(-n // BLOCK_SIZE)].long()
        k = k_cache[blocks].reshape(-1, KV_HEADS, HEAD_DIM)[:n].float().repeat_interleave(HEADS // KV_HEADS, 1)
        v = v_cache[blocks].reshape(-1, KV_HEADS, HEAD_DIM)[:n].float().repeat_interleave(HEADS // KV_HEADS, 1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) / math.sqrt(HEAD_DIM)
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(outs)


def check(pool: CachePool, inst, config: dict, label: str) -> float:
    """Max abs error of one config against the float32 reference; exits on a failure (no timing is worth it)."""
    from minillm.kernels.paged_attention import paged_decode_attention

    q, tables, seq_lens = inst
    got = paged_decode_attention(q, pool.k_cache, pool.v_cache, tables, seq_lens, **config)
    ref = reference(q, pool.k_cache, pool.v_cache, tables, seq_lens)
    err = (got[: ref.shape[0]].float() - ref).abs()
    if not bool((err <= 1e-2 + 2e-2 * ref.abs()).all()):
        raise SystemExit(f"correctness check failed for {label} {config}: max abs error {err.max().item():.3g}")
    return err.max().item()


def time_config(pool: CachePool, insts, config: dict) -> float:
    from minillm.kernels.paged_attention import paged_decode_attention

    calls = [lambda i=i: paged_decode_attention(i[0], pool.k_cache, pool.v_cache, i[1], i[2], **config)
             for i in insts]
    return graph_time_us(calls)


def copy_bandwidth(nbytes: int) -> float:
    """Bytes per second of a device-to-device copy moving `nbytes` in all (read + write), graph-timed after
    200 ms of copying (clocks up), the best of 5 trials: the roofline every fraction is taken against."""
    n = nbytes // 4  # bf16 elements per side
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = graph_time_us([lambda: dst.copy_(src)], trials=5, min_gpu_ms=20.0, warm_ms=200.0, best=True)
    bw = nbytes / (t * 1e-6)
    if not 1e12 < bw < 2e13:
        print(f"warning: copy bandwidth {bw / 1e12:.2f} TB/s looks wrong; fractions below use it", file=sys.stderr)
    return bw


def same_size_copy_us(buf_src: torch.Tensor, buf_dst: torch.Tensor, nbytes: int, count: int) -> float:
    """Microseconds of one copy moving `nbytes` (read + write), rotated over `count` disjoint slices."""
    n = nbytes // 4
    calls = [lambda i=i: buf_dst[i * n:(i + 1) * n].copy_(buf_src[i * n:(i + 1) * n]) for i in range(count)]
    return graph_time_us(calls)


def sweep_shape(pool, batch, ctx, tiles, splits_list, copy_bw, copy_bufs) -> tuple[list[dict], dict]:
    from minillm.kernels.decode_split_rule import choose_decode_config

    insts = pool.instances(batch, ctx, rotation_count(batch, ctx))
    nbytes = bytes_moved(insts[0][2])
    row = lambda cfg, us, stage: {  # noqa: E731
        "batch": batch, "ctx": ctx, "stage": stage, **cfg, "us": us, "tb_per_s": nbytes / us / 1e6,
        "fraction_of_copy": nbytes / (us * 1e-6) / copy_bw}
    rows = []
    rule = choose_decode_config(batch, KV_HEADS, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
    rule_cfg = {k: getattr(rule, k) for k in CONFIG_KEYS}
    auto = row({"num_splits": None, "rule": rule_cfg}, time_config(pool, insts, {}), "heuristic")
    rows.append(auto)
    default = dict(zip(TILE_KEYS, tiles[0]))
    stage1 = []
    for s in splits_list:
        if s > 1 and ctx // s < MIN_SPLIT_KEYS:
            continue
        cfg = {"num_splits": s, **default}
        stage1.append(row(cfg, time_config(pool, insts, cfg), "splits"))
    rows += stage1
    best_splits = [r["num_splits"] for r in sorted(stage1, key=lambda r: r["us"])[:2]]
    if rule.num_splits not in best_splits:  # every tile at the rule's own split count: a change of rule 2 alone
        for tile in tiles[1:]:
            cfg = {"num_splits": rule.num_splits, **dict(zip(TILE_KEYS, tile))}
            rows.append(row(cfg, time_config(pool, insts, cfg), "rule_splits"))
    for s in best_splits:
        for tile in tiles[1:]:
            cfg = {"num_splits": s, **dict(zip(TILE_KEYS, tile))}
            rows.append(row(cfg, time_config(pool, insts, cfg), "tiles"))
    best = min(rows, key=lambda r: r["us"])
    best_cfg = {k: best[k] for k in CONFIG_KEYS if best.get(k) is not None}
    best["max_abs_err"] = check(pool, insts[0], best_cfg, f"B{batch} ctx{ctx} best")
    auto["max_abs_err"] = check(pool, insts[0], {}, f"B{batch} ctx{ctx} heuristic")
    summary = {"batch": batch, "ctx": ctx, "kv_mb": kv_read_bytes(insts[0][2]) / 1e6, "rotation": len(insts),
               "rule": rule_cfg, "auto_us": auto["us"], "auto_fraction": auto["fraction_of_copy"],
               "best": best_cfg, "best_us": best["us"], "best_fraction": best["fraction_of_copy"],
               "speedup": auto["us"] / best["us"]}
    if MIN_CTX is not None:
        summary["min_ctx"], summary["mean_ctx"] = MIN_CTX, float(insts[0][2].float().mean())
    if nbytes < 1e9:  # small shapes: the same bytes copied, with its own launch latency
        summary["same_size_copy_us"] = same_size_copy_us(*copy_bufs, nbytes, len(insts))
        summary["best_vs_same_size_copy"] = summary["same_size_copy_us"] / best["us"]
    return rows, summary


def _config_text(cfg: dict) -> str:
    """splits,block_n,warps,stages,prefetch (1/0) of a config dict."""
    return ",".join(str(int(cfg[k]) if isinstance(cfg.get(k), bool) else cfg.get(k, "-")) for k in CONFIG_KEYS)


def print_table(summaries: list[dict], copy_bw: float) -> None:
    print(f"\ncopy bandwidth (1 GiB device-to-device, read + write): {copy_bw / 1e12:.2f} TB/s")
    print("fraction = (K + V + q + out bytes) / time / copy bandwidth; "
          "'vs copy': time of a copy of the same bytes / best time; configs: splits,block_n,warps,stages,prefetch")
    print(f"{'batch':>6}{'ctx':>7}{'KV MB':>9}{'heuristic':>16}{'heur us':>10}{'heur frac':>10}"
          f"{'best (splits,bn,warps,stages,pf)':>34}{'best us':>10}{'best frac':>10}{'x heur':>8}{'vs copy':>9}")
    for s in summaries:
        b = s["best"]
        cfg = _config_text(b)
        vs = f"{s['best_vs_same_size_copy']:.2f}" if "best_vs_same_size_copy" in s else "-"
        print(f"{s['batch']:>6}{s['ctx']:>7}{s['kv_mb']:>9.0f}{_config_text(s['rule']):>16}{s['auto_us']:>10.1f}"
              f"{s['auto_fraction']:>10.0%}{cfg:>34}{s['best_us']:>10.1f}{s['best_fraction']:>10.0%}"
              f"{s['speedup']:>8.2f}{vs:>9}")


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"need comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers, got {text!r}")
    return values


def set_heads(heads: int, kv_heads: int, head_dim: int) -> None:
    """The attention shape swept (module-level, read by every helper above)."""
    global HEADS, KV_HEADS, HEAD_DIM
    HEADS, KV_HEADS, HEAD_DIM = heads, kv_heads, head_dim


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="write rows and summary as JSON here")
    parser.add_argument("--quick", action="store_true", help="only the first six tile variants")
    parser.add_argument("--batches", type=_ints, default=list(BATCHES), help="comma-separated, default 1..256")
    parser.add_argument("--ctxs", type=_ints, default=list(CONTEXTS), help="comma-separated context lengths")
    parser.add_argument("--heads", type=_ints, default=[HEADS, KV_HEADS, HEAD_DIM],
                        help="query heads, kv heads, head_dim (default Llama-3-8B's 32,8,128; SmolLM2's 9,3,64)")
    parser.add_argument("--min-ctx", type=int, default=None,
                        help="draw each sequence's context from MIN_CTX..ctx (a serving batch) instead of all ctx")
    args = parser.parse_args(argv)
    heads = args.heads
    if len(heads) != 3 or heads[0] % heads[1] or heads[2] not in (64, 128):
        parser.error(f"--heads must be Q,KV,D with KV dividing Q and D in (64, 128), got {heads}")
    set_heads(*heads)
    if args.min_ctx is not None:
        if not 1 <= args.min_ctx <= min(args.ctxs):
            parser.error(f"--min-ctx must lie in 1..{min(args.ctxs)} (the smallest --ctxs), got {args.min_ctx}")
        global MIN_CTX
        MIN_CTX = args.min_ctx
    if not torch.cuda.is_available():
        print("sweep_paged_decode.py needs a CUDA GPU (the Triton interpreter would take hours).", file=sys.stderr)
        return 2
    bad = [c for c in args.ctxs if c % BLOCK_SIZE]
    if bad:
        parser.error(f"contexts must be multiples of the block size {BLOCK_SIZE}, got {bad}")
    import triton

    shapes = [(b, c) for b in args.batches for c in args.ctxs if kv_bytes(b, c) <= MAX_KV_BYTES]
    tiles = TILES[:6] if args.quick else TILES
    need = max(max(rotation_count(b, c) * b * c // BLOCK_SIZE for b, c in shapes), 1)
    pool = CachePool(need)
    copy_bw = copy_bandwidth(2 << 30)
    copy_bufs = (torch.empty(int(ROTATE_BYTES * 2) // 2, device="cuda", dtype=torch.bfloat16),
                 torch.empty(int(ROTATE_BYTES * 2) // 2, device="cuda", dtype=torch.bfloat16))
    rows, summaries = [], []
    for i, (b, c) in enumerate(shapes):
        r, s = sweep_shape(pool, b, c, tiles, SPLITS, copy_bw, copy_bufs)
        rows += r
        summaries.append(s)
        print(f"[{i + 1}/{len(shapes)}] B{b} ctx{c}: heuristic {s['auto_fraction']:.0%}, best {s['best_fraction']:.0%} "
              f"{s['best']}", flush=True)
    meta = {"device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "copy_bytes_per_s": copy_bw, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
            "block_size": BLOCK_SIZE, "min_ctx": MIN_CTX}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "summary": summaries, "rows": rows}, f, indent=1)
    print_table(summaries, copy_bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
