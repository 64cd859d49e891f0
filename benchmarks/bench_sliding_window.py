"""Sliding-window attention against full attention: what a window of W keys saves at long context.

    python benchmarks/bench_sliding_window.py --out sliding_window_h200.json
    python benchmarks/bench_sliding_window.py --smoke     # tiny shapes, runs on a CPU through the interpreter

Mistral 7B v0.1's attention shape (32 heads, 8 kv heads, head_dim 128, bf16, block_size 16, blocks scattered over
the pool), window 4096. Per case, the same kernel with and without `window`, both CUDA-graphed (10 calls a graph,
median of 5 replays):

* decode (kernels/paged_attention.py): B sequences of `context` tokens, one query each. Full attention reads every
  key; the window reads the last W, so the time should follow min(context, W), not the context;
* prefill (kernels/paged_prefill.py): one fresh prompt of `context` tokens. Full causal attention does
  context^2 / 2 scores, the window about context x W.

Correctness first: each windowed result against SDPA with the band mask (kernels/sliding_window.py) on the
gathered K/V of one sequence. Look for `full/window` near context / W at decode past the window, and near
context / (2 W) at prefill.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import torch.nn.functional as F

from minillm.kernels.sliding_window import sliding_window_mask

DECODE_CASES = [(1, 4096), (1, 32768), (16, 16384), (64, 8192)]  # (batch, context)
PREFILL_CASES = [4096, 16384]  # fresh prompt lengths


def _pool(batch: int, seq_len: int, kv_heads: int, dim: int, block_size: int, device: str):
    per_seq = -(-seq_len // block_size)
    num_blocks = batch * per_seq + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=device)[:batch * per_seq].view(batch, per_seq).to(torch.int32)
    return k_cache, v_cache, tables


def _reference(q, k_cache, v_cache, table, seq_len, window):
    """SDPA with the band mask for sequence 0: q [q_len, H, D] -> [q_len, H, D] (fp32)."""
    k = k_cache[table.long()].flatten(0, 1)[:seq_len].float()
    v = v_cache[table.long()].flatten(0, 1)[:seq_len].float()
    mask = sliding_window_mask(q.shape[0], seq_len, window, device=q.device)
    out = F.scaled_dot_product_attention(q.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, enable_gqa=True)
    return out.transpose(0, 1)


def _time(step, device: str) -> float | None:
    """GPU microseconds per call (CUDA graph replays), None on a CPU (the smoke run checks results only)."""
    if device != "cuda":
        return None
    from minillm.kernels.hardware import graph_us
    return graph_us(lambda i: step(), calls=10)


def run(args) -> list[dict]:
    from minillm.kernels.paged_attention import paged_decode_attention
    from minillm.kernels.paged_prefill import paged_prefill_attention
    device, heads, kv_heads, dim, bs, window = args.device, 32, 8, 128, 16, args.window
    rows = []
    for batch, context in args.decode_cases:
        k_cache, v_cache, tables = _pool(batch, context, kv_heads, dim, bs, device)
        q = torch.randn(batch, heads, dim, device=device, dtype=torch.bfloat16)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        times = {}
        for name, w in (("full", None), ("window", window)):
            def step(w=w):
                return paged_decode_attention(q, k_cache, v_cache, tables, lens, window=w)
            out = step()
            if w is not None:
                err = (out[:1].float() - _reference(q[:1], k_cache, v_cache, tables[0], context, w)).abs().max()
                assert err < 3e-2, f"decode {batch} x {context}: max error {err:.3g}"
            times[name] = _time(step, device)
        rows.append(_row("decode", batch, context, window, times))
    for context in args.prefill_cases:
        k_cache, v_cache, tables = _pool(1, context, kv_heads, dim, bs, device)
        q = torch.randn(context, heads, dim, device=device, dtype=torch.bfloat16)
        lens = torch.tensor([context], dtype=torch.int32, device=device)
        cu = torch.tensor([0, context], dtype=torch.int32, device=device)
        times = {}
        for name, w in (("full", None), ("window", window)):
            def step(w=w):
                return paged_prefill_attention(q, k_cache, v_cache, tables, lens, cu, window=w)
            out = step()
            if w is not None:
                last = slice(context - 64, context)  # the reference's memory: the last 64 queries suffice
                err = (out[last].float() - _reference(q[last], k_cache, v_cache, tables[0], context, w)).abs().max()
                assert err < 3e-2, f"prefill {context}: max error {err:.3g}"
            times[name] = _time(step, device)
        rows.append(_row("prefill", 1, context, window, times))
    return rows


def _row(kind: str, batch: int, context: int, window: int, times: dict) -> dict:
    full, win = times["full"], times["window"]
    row = {"kind": kind, "batch": batch, "context": context, "window": window, "full_us": full, "window_us": win,
           "full_over_window": None if full is None else full / win}
    if full is not None:
        print(f"{kind:8s} batch {batch:3d} context {context:6d}: full {full:9.1f} us, window {win:9.1f} us, "
              f"full/window {full / win:5.2f}x")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on this machine's device (CPU: checks only)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.decode_cases, args.prefill_cases = DECODE_CASES, PREFILL_CASES
    if args.smoke:
        args.window, args.decode_cases, args.prefill_cases = 24, [(2, 80)], [96]
    torch.manual_seed(0)
    rows = run(args)
    if args.out:
        meta = {"command": " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
