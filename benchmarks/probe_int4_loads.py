"""Is the INT4 GEMV bound by its bytes, its instructions or its latency? Time it beside its own loads alone (issue 10, chapter 8).

    python benchmarks/probe_int4_loads.py [--k 4096 --n 14336] [--dtype float16] [--out probe.json]  # ~1 minute
    ncu --clock-control none --cache-control all --profile-from-start off \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \\
        python benchmarks/probe_int4_loads.py --ncu "gemv N128 K64 w1 s16 pf1;tiles N128 R8 w1 s16"

At M = 1 (g128 asymmetric INT4, GPTQ layout, cold weights, each call replayed from a CUDA graph):
  gemv / gemv_tma / fma   int4_gemv.py's two kernels and int4_gemm.py's CUDA-core path as the dispatcher offers
               them (gemv_tma on sm_90 and later);
  tiles        a load-only kernel with the GEMV's grid and tiles: each program reads [BLOCK_K / 8, BLOCK_N] word
               tiles over its share of K and xors them together (no arithmetic worth the name);
  flat         a contiguous read of the same bytes in large blocks: the ceiling for this many bytes in one launch;
  cublas bf16  F.linear on the bf16 weight (4x the bytes), the baseline.
If a GEMV launch is as slow as `tiles` at the same split, its grid cannot keep enough bytes in flight (latency);
if `tiles` is fast and the GEMV slow, its arithmetic is; `flat` says what the bytes alone cost. With --ncu the same
launches run eagerly, twice each, between cudaProfilerStart/Stop, for Nsight Compute's counters (registers,
occupancy, issue-slot use, stall reasons, DRAM throughput).
The fourteenth session's figures (RESULTS.md) came from this script's first version against the GEMV before commit
b1a7dc0: that kernel took 254 registers and ran 1.7 warps per SM; its load-only twin was as slow at the same split.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def read_tiles(QW, OUT, K8, N, stride, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, SPLIT_K):
    """The GEMV's weight loads alone: [ROWS, BLOCK_N] int32 tiles over this program's K range, xor-reduced."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    per = tl.cdiv(K8, SPLIT_K)
    acc = tl.zeros([ROWS, BLOCK_N], tl.int32)
    for r in range(pid_k * per, pid_k * per + per, ROWS):
        rows = r + tl.arange(0, ROWS)
        acc ^= tl.load(QW + rows[:, None] * stride + offs_n[None, :])
    tl.store(OUT + pid_k * N + offs_n, tl.xor_sum(acc, 0))


@triton.jit
def read_flat(P, OUT, n_words, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """A contiguous read of n_words int32, ITERS blocks of BLOCK words per program."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for i in range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(P + offs, mask=offs < n_words, other=0)
    tl.store(OUT + pid * BLOCK + tl.arange(0, BLOCK), acc)


def launches(k: int, n: int, dtype=None):
    """{name: step(i)} over weight copy i, and the number of copies (enough to keep each call's reads cold);
    activations in dtype (bf16 by default)."""
    import torch
    import torch.nn.functional as F

    from minillm.kernels.int4_dispatch import candidates, run_launch
    from sweep_int4_gemm import GROUP, cold_operands, row_operands

    copies, sets, ref_w, dense = cold_operands(k, n, dtype)
    x, ref, tol, y, ws, cnt = row_operands(1, k, n, ref_w, dtype)
    xor_out = torch.empty(64 * n, dtype=torch.int32, device="cuda")
    flat_out = torch.empty(1 << 24, dtype=torch.int32, device="cuda")
    steps = {}
    for lc in candidates(1, n, k, GROUP, x.dtype, torch.cuda.get_device_properties(0).multi_processor_count):
        if lc.kernel not in ("gemv", "gemv_tma", "fma"):
            continue
        name = (f"{lc.kernel} N{lc.block_n} K{lc.block_k} w{lc.num_warps} s{lc.split_k} "
                + (f"st{lc.num_stages}" if lc.kernel == "gemv_tma" else f"pf{int(lc.prefetch)}"))
        steps[name] = lambda i, lc=lc: run_launch(lc, x, *sets[i], GROUP, None, y, ws, cnt)
        tiles = f"tiles N{lc.block_n} R{lc.block_k // 8} w{lc.num_warps} s{lc.split_k}"
        if lc.kernel == "gemv" and tiles not in steps:
            steps[tiles] = lambda i, lc=lc: read_tiles[(n // lc.block_n, lc.split_k)](
                sets[i][0], xor_out, k // 8, n, n, BLOCK_N=lc.block_n, ROWS=lc.block_k // 8, SPLIT_K=lc.split_k,
                num_warps=lc.num_warps)
    words = k * n // 8
    for block, iters, warps in ((512, 8, 4), (1024, 16, 4), (2048, 8, 8)):
        grid = (triton.cdiv(words, block * iters),)
        steps[f"flat B{block} it{iters} w{warps}"] = lambda i, grid=grid, block=block, iters=iters, warps=warps: (
            read_flat[grid](sets[i][0], flat_out, words, BLOCK=block, ITERS=iters, num_warps=warps))
    steps[f"cublas {str(x.dtype)[6:]}"] = lambda i: F.linear(x, dense[i % len(dense)], out=y)
    return steps, copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=14336)
    parser.add_argument("--ncu", default=None, help="';'-separated launch names: run each twice for Nsight Compute")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                        help="the activations' (and scales') dtype: fp16 takes the GEMV's 64-bit activation path")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.k % 1024 or args.n % 512:
        raise SystemExit(f"--k must be a multiple of 1024 and --n of 512, got {args.k} and {args.n}")
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import minillm  # noqa: F401
    from sweep_int4_gemm import copy_bandwidth, time_graph_us

    steps, copies = launches(args.k, args.n, getattr(torch, args.dtype))
    if args.ncu:
        names = args.ncu.split(";")
        unknown = [name for name in names if name not in steps]
        if unknown:
            raise SystemExit(f"unknown launch names {unknown}; known: {sorted(steps)}")
        for name in names:
            steps[name](0)  # compiled outside the profiled range
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for name in names:
            for i in (1, 2):
                steps[name](i % copies)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        return
    floor_us = args.k * args.n / 2 / copy_bandwidth() * 1e6
    times = {name: time_graph_us(step, copies) for name, step in steps.items()}
    print(f"{args.k} -> {args.n}, M = 1: 4-bit weights {args.k * args.n / 2e6:.1f} MB, copy-bandwidth floor "
          f"{floor_us:.1f} us")
    for name, us in sorted(times.items(), key=lambda item: item[1]):
        print(f"  {name:34s} {us:7.1f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "k": args.k, "n": args.n, "dtype": args.dtype,
                       "floor_us": floor_us,
                       "us": times}, f, indent=1)


if __name__ == "__main__":
    main()
