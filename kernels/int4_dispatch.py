"""Pick the fastest INT4 weight-only kernel for each shape by timing the candidates once (chapter 8).

Six ways compute the same y = x @ dequant(W)^T, and which one is fastest depends on M and on the shape:
  fma      int4_gemm.py's CUDA-core path: one activation row per program (won M = 1 and 2 on the first H200 sweep);
  dot      int4_gemm.py's tensor-core path: rows padded to BLOCK_M >= 16, fp32 unpacking then bf16 for tl.dot;
  mma      int4_mma.py: rows padded to 16, two weights per instruction straight into bf16 for the tensor cores;
  wgmma    int4_wgmma.py: the same unpacking with the product transposed (W @ x^T), so the unpacked weights stay
           in registers as the tensor cores' first operand (Hopper's wgmma reads its second from shared memory);
  gemv     int4_gemv.py: two weights per instruction in packed fp16 math (PTX), where the shape divides into
           its tiles: one row per program for M <= 2 (on Hopper also its TMA twin, gemv_tma: the words pipelined
           into shared memory by the TMA engine), and for M = 3..4 all rows in one program (BLOCK_M = 4), each
           word unpacked once for every row;
  dequant  int4_dequant.py: W dequantised to bf16 in a scratch buffer, then cuBLAS (prefill-sized M >= 16).
Triton's autotuner times configs of *one* kernel; here the candidates span all of them, with split-K chosen per
tile (powers of two that put between half a program and 16 programs on each SM). On the first call per
(M bucket, N, K, group, ...) key each candidate runs once, its output is checked against the reference kernel's
(int4_gemm.py's, which the interpreter tests cover: a candidate that miscompiles on this Triton is dropped, not
used), then the survivors are timed from CUDA-graph replays with the L2 cache flushed before every launch
(cold_graph_timer: a decode step reads each layer's weights cold, from a graph) and the fastest is kept for the
process. Timing eager launches instead (triton.testing.do_bench) let the host's launch cost, which differs from
kernel to kernel and exceeds a 10 us GEMV's run time, into the figures: on the H200 the end-to-end INT4 decode
step moved between 2.9 and 3.8 ms from one process to the next with what each happened to pick.
Make the first call before CUDA-graph capture (the engine's warm-up does); a call inside a capture that finds
no tuned entry takes the first candidate without timing anything.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import triton

from minillm.kernels.int4_dequant import int4_dequant_matmul
from minillm.kernels.int4_gemm import _int4_gemm_kernel
from minillm.kernels.int4_gemv import gemv_fits, int4_gemv_kernel, int4_gemv_tma_kernel
from minillm.kernels.int4_mma import launch_int4_mma
from minillm.kernels.int4_wgmma import WGMMA_BLOCK_K, launch_int4_wgmma
from minillm.kernels.pdl import launch_options
from minillm.kernels.hardware import graph_us, num_sms
from minillm.kernels.int4_tuning import LARGE_M_CONFIGS, MAX_SPLIT_K, SPLIT_K_MAX_M, mma_applies
from minillm.platform import triton_interpreted

__all__ = ["Launch", "candidates", "precompile", "run_launch", "tuned_int4_gemm", "tuned_launch"]

# (BLOCK_N, BLOCK_K, num_warps) of the CUDA-core path, one row per program: the best tiles of the first H200 sweep
FMA_TILES = [(64, 64, 1), (256, 64, 2), (512, 64, 4)]
# (BLOCK_N, num_warps) of the two tensor-core kernels, BLOCK_K = 128
DOT_TILES = [(128, 8)]
MMA_TILES = [(128, 4), (256, 8), (64, 4)]
# (BLOCK_N, num_warps) of int4_mma.py's one-dot-per-tile kernel: 16 columns per warp, the tiles where Triton lays
# the unpacked weights out in the tensor core's operand layout, never in shared memory (ptxas, sm_90, 16 rows:
# 3.8-3.9 SASS per weight on triton 3.9, 4.7-4.9 on 3.6, 92-98 registers; benchmarks/sass_count.py). Not yet timed
# on a GPU: the tuner times it beside the others and keeps it only where it wins
MMA_TILE_TILES = [(128, 8), (256, 16)]
# (BLOCK_N, num_warps) of int4_wgmma.py: output columns per program (wgmma's M side, 64 per warpgroup), and the
# M buckets it is offered for: on the H200 (2026-12-04, fp16) it was the fastest launch at M = 32 on four of five
# Llama-3-8B shapes (4-6% under int4_mma) and 2-4x slower than the GEMV at M = 1..16 (RESULTS.md, twenty-first session)
WGMMA_TILES = [(128, 4), (64, 4), (128, 8)]
WGMMA_M_BUCKETS = (32,)
# (BLOCK_N, BLOCK_K, num_warps, prefetch) of int4_gemv.py: the best of the H200 sweep over its four Llama-3-8B
# shapes at M = 1 (2026-12-03): 4 or 8 columns x 8 packed rows per thread, 96-128 registers
GEMV_TILES = [(128, 64, 1, True), (256, 64, 2, True), (256, 64, 1, False), (64, 64, 1, True)]
# int4_gemv.py with BLOCK_M rows per program (each word unpacked once for all of them): (BLOCK_N, BLOCK_K,
# num_warps, prefetch) per BLOCK_M. Timed on the H200 (2026-12-04, bench_int4_p3.py) this tile was the fastest launch
# at M = 4 on all five Llama-3-8B shapes (5-24% under int4_mma), while at M = 2 two one-row programs per tile were as
# fast and at M = 8 int4_mma won on four shapes of five: so it is offered for M = 3..4 only.
GEMV_ROW_TILES = {4: [(64, 64, 1, True)]}
# (BLOCK_N, BLOCK_K, num_warps, pipeline stages) of int4_gemv.py's TMA kernel (Hopper and later; on the H200 never
# faster than the register kernel: 15.8-16.2 us against 14.2 at 4096 -> 14336, 2026-12-04)
GEMV_TMA_TILES = [(128, 64, 1, 3), (256, 64, 2, 3), (128, 64, 1, 4)]
# the GEMV loads activations as words: 64-bit for fp16, 32-bit for bf16 (rows must start on such a boundary)
GEMV_WORD_BYTES = {torch.float16: 8, torch.bfloat16: 4}
# dequantise-then-cuBLAS from this many rows; slices of the bf16 weight of about this many bytes (L2 is 50 MB)
DEQUANT_MIN_M = 16
DEQUANT_SLICE_BYTES = 24 << 20


@dataclass(frozen=True)
class Launch:
    """One way to run the GEMM: which kernel, its tile, warps, pipeline stages and K split."""

    kernel: str  # "fma" | "dot" | "mma" | "mma_tile" | "wgmma" | "gemv" | "gemv_tma" | "dequant"
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int  # for "dequant": the number of column slices (int4_dequant_matmul's chunks)
    prefetch: bool = False  # "gemv": load the next K tile before this one's arithmetic


def _splits(tiles: int, k_tiles: int, sms: int) -> list[int]:
    """Powers of two with >= 1 K tile per program and sms / 2 .. 16 sms programs (1 whenever tiles fill the GPU)."""
    out = [1] if tiles >= sms // 2 else []
    s = 2
    while s <= min(MAX_SPLIT_K, k_tiles):
        if sms // 2 <= tiles * s <= 16 * sms:
            out.append(s)
        s *= 2
    return out or [1]


def tma_available() -> bool:
    """Whether this process's GPU has the TMA engine (compute capability 9.0 and later) and runs compiled Triton."""
    return (not triton_interpreted() and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9)


def candidates(m: int, n: int, k: int, group: int, dtype: torch.dtype, sms: int) -> list[Launch]:
    """The launches worth timing for M rows; the reference launch (int4_gemm.py's tensor-core path) first."""
    m_bucket = triton.next_power_of_2(m)
    out = []
    if m_bucket <= 2:
        for bn, bk, w in FMA_TILES:
            if group % bk == 0:  # one scale per tile: the cheap scale-after-the-sums path
                for s in _splits(m * triton.cdiv(n, bn), triton.cdiv(k, bk), sms):
                    out.append(Launch("fma", 1, bn, bk, w, 3, s))
        for bn, bk, w, pf in GEMV_TILES:
            if dtype != torch.float32:  # fp16 arithmetic: not for fp32 callers
                for s in _splits(m * triton.cdiv(n, bn), triton.cdiv(k, bk), sms):
                    if gemv_fits(n, k, group, bn, bk, s):
                        out.append(Launch("gemv", 1, bn, bk, w, 1, s, pf))
        for bn, bk, w, stages in GEMV_TMA_TILES if dtype != torch.float32 and tma_available() else ():
            for s in _splits(m * triton.cdiv(n, bn), triton.cdiv(k, bk), sms):
                if gemv_fits(n, k, group, bn, bk, s):
                    out.append(Launch("gemv_tma", 1, bn, bk, w, stages, s))
    for bn, bk, w, pf in GEMV_ROW_TILES.get(m_bucket, []) if dtype != torch.float32 else ():
        for s in _splits(triton.cdiv(n, bn), triton.cdiv(k, bk), sms):  # one program holds all the rows
            if gemv_fits(n, k, group, bn, bk, s):
                out.append(Launch("gemv", m_bucket, bn, bk, w, 1, s, pf))
    if m <= SPLIT_K_MAX_M:
        bm = max(16, m_bucket)
        for bn, w in DOT_TILES:
            for s in _splits(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, 128), sms):
                out.append(Launch("dot", bm, bn, 128, w, 3, s))
    else:  # prefill-sized: the large tiles Triton's autotuner used to pick from, no split
        for bm, bn, bk, w, st in LARGE_M_CONFIGS:
            out.append(Launch("dot", bm, bn, bk, w, st, 1))
    if mma_applies(torch.empty(0, dtype=dtype), group, m):
        bm = max(16, m_bucket)
        for bn, w in MMA_TILES:
            for s in _splits(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, 128), sms):
                out.append(Launch("mma", bm, bn, 128, w, 3, s))
        for bn, w in MMA_TILE_TILES:
            for s in _splits(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, 128), sms):
                out.append(Launch("mma_tile", bm, bn, 128, w, 1, s))
    if m_bucket in WGMMA_M_BUCKETS and mma_applies(torch.empty(0, dtype=dtype), group, m) and k % WGMMA_BLOCK_K == 0:
        bm = max(16, m_bucket)
        for bn, w in WGMMA_TILES:
            if n % bn == 0:
                for s in _splits(triton.cdiv(m, bm) * (n // bn), k // WGMMA_BLOCK_K, sms):
                    out.append(Launch("wgmma", bm, bn, WGMMA_BLOCK_K, w, 1, s))
    if m >= DEQUANT_MIN_M:  # the whole weight at once, and in slices small enough to stay in L2 for cuBLAS
        slices = triton.cdiv(k * n * 2, DEQUANT_SLICE_BYTES)
        for c in sorted({1, min(slices, max(1, n // 8))}):
            out.append(Launch("dequant", 0, 0, 0, 0, 0, c))
    # the reference for the output check: the tensor-core path of int4_gemm.py (any M, any group)
    ref = [c for c in out if c.kernel == "dot"][:1]
    return ref + [c for c in out if c not in ref]


def run_launch(lc: Launch, x2, qweight, scales, qzeros, group: int, bias, y, ws, cnt) -> None:
    """Run one launch: y [M, N] = x2 [M, K] @ dequant(W)^T (+ bias). qzeros None means symmetric."""
    if lc.kernel == "dequant":
        int4_dequant_matmul(x2, qweight, scales, qzeros, group, bias, y, lc.split_k)
        return
    if lc.kernel in ("mma", "mma_tile"):
        cfg = dict(BLOCK_M=lc.block_m, BLOCK_N=lc.block_n, BLOCK_K=lc.block_k, SPLIT_K=lc.split_k,
                   num_warps=lc.num_warps, num_stages=lc.num_stages)
        launch_int4_mma(x2, qweight, scales, qzeros, group, bias, y, ws, cnt, cfg, tile_dot=lc.kernel == "mma_tile")
        return
    if lc.kernel == "wgmma":
        cfg = dict(BLOCK_M=lc.block_m, BLOCK_N=lc.block_n, SPLIT_K=lc.split_k, num_warps=lc.num_warps,
                   num_stages=lc.num_stages)
        launch_int4_wgmma(x2, qweight, scales, qzeros, group, bias, y, ws, cnt, cfg)
        return
    m, k = x2.shape
    n = qweight.shape[1]
    qz = qzeros if qzeros is not None else qweight
    grid = (triton.cdiv(m, lc.block_m) * triton.cdiv(n, lc.block_n), lc.split_k)
    word = GEMV_WORD_BYTES.get(x2.dtype) if lc.kernel in ("gemv", "gemv_tma") else None
    if word and (x2.data_ptr() % word or x2.stride(0) * x2.element_size() % word):
        x2 = x2.clone(memory_format=torch.contiguous_format)  # the GEMV reads its activations as whole words
    if lc.kernel == "gemv_tma":
        from triton.tools.tensor_descriptor import TensorDescriptor
        desc = TensorDescriptor(qweight, shape=list(qweight.shape), strides=list(qweight.stride()),
                                block_shape=[lc.block_k // 8, lc.block_n])
        int4_gemv_tma_kernel[grid](x2, desc, scales, qz, bias if bias is not None else scales, y, ws, cnt, m, n, k,
                                   x2.stride(0), scales.stride(0), qz.stride(0), y.stride(0), 0x000F000F,
                                   GROUP_SIZE=group, HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None,
                                   PACKED=not triton_interpreted(), BLOCK_N=lc.block_n, BLOCK_K=lc.block_k,
                                   SPLIT_K=lc.split_k, STAGES=lc.num_stages, num_warps=lc.num_warps,
                                   num_stages=lc.num_stages, **launch_options(x2.device))
        return
    if lc.kernel == "gemv":
        int4_gemv_kernel[grid](x2, qweight, scales, qz, bias if bias is not None else scales, y, ws, cnt, m, n, k,
                               x2.stride(0), qweight.stride(0), scales.stride(0), qz.stride(0), y.stride(0),
                               0x000F000F, GROUP_SIZE=group, HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None,
                               PACKED=not triton_interpreted(), BLOCK_N=lc.block_n, BLOCK_K=lc.block_k,
                               SPLIT_K=lc.split_k, PREFETCH=lc.prefetch, BLOCK_M=lc.block_m,
                               num_warps=lc.num_warps, num_stages=lc.num_stages, **launch_options(x2.device))
        return
    _int4_gemm_kernel[grid](x2, qweight, scales, qz, bias if bias is not None else scales, y, ws, cnt, m, n, k,
                            x2.stride(0), qweight.stride(0), scales.stride(0), qz.stride(0), y.stride(0),
                            min(triton.next_power_of_2(m), 256), 0x4B000000, GROUP_SIZE=group,
                            HAS_ZEROS=qzeros is not None, HAS_BIAS=bias is not None,
                            DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", UPCAST=False,
                            BLOCK_M=lc.block_m, BLOCK_N=lc.block_n, BLOCK_K=lc.block_k, USE_DOT=lc.kernel == "dot",
                            SPLIT_K=lc.split_k, num_warps=lc.num_warps, num_stages=lc.num_stages)


_BEST: dict[tuple, Launch] = {}


def _key(m: int, n: int, k: int, group: int, dtype, device, symmetric: bool, has_bias: bool) -> tuple:
    return triton.next_power_of_2(m), n, k, group, symmetric, has_bias, dtype, torch.device(device)


def tuned_launch(m: int, n: int, k: int, group: int, dtype: torch.dtype, device, symmetric: bool = False,
                 has_bias: bool = False) -> Launch | None:
    """The launch chosen for calls of this shape (None before the first such call)."""
    return _BEST.get(_key(m, n, k, group, dtype, device, symmetric, has_bias))


def cold_graph_timer(reps: int = 20, trials: int = 5):
    """A timer fn -> GPU microseconds of one fn() call with a cold L2, free of host launch time: replays of a
    CUDA graph of `reps` x (flush the L2, fn) less the flush's own time, measured once here. fn must have run once
    already (compiled) and must not synchronize."""
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    flush = torch.empty(max(2 * l2, 1 << 20), dtype=torch.uint8, device="cuda").zero_
    flush_us = graph_us(lambda i: flush(), reps, trials)
    return lambda fn: max(graph_us(lambda i: (flush(), fn()), reps, trials) - flush_us, 0.0)


def _tune(cands: list[Launch], args: tuple) -> Launch:
    x2, qweight, scales, qzeros, group, bias, y, ws, cnt = args
    ref = None
    timed = []
    time_us = cold_graph_timer()
    for lc in cands:
        try:
            run_launch(lc, *args)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001  (a launch this Triton cannot compile is skipped, not fatal)
            print(f"int4 dispatch: skipping {lc}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                  file=sys.stderr)
            continue
        out = y.to(torch.float32, copy=True)  # (a copy: y is overwritten by the next launch)
        if ref is None:
            ref = out
            tol = 0.01 * ref.abs().max().item() + 1e-6
        elif not (out - ref).abs().max().item() <= tol:
            print(f"int4 dispatch: dropping {lc}: its output differs from the reference kernel's", file=sys.stderr)
            continue
        try:
            timed.append((time_us(lambda: run_launch(lc, *args)), lc))
        except Exception as exc:  # noqa: BLE001  (a launch that cannot be captured in a graph is no use here)
            print(f"int4 dispatch: skipping {lc}: it failed under CUDA-graph capture: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:160]}", file=sys.stderr)
    if not timed:
        raise RuntimeError(f"no INT4 kernel launch worked for M={x2.shape[0]}, N={qweight.shape[1]}, "
                           f"K={x2.shape[1]} (see the messages above)")
    return min(timed, key=lambda t: t[0])[1]


def tuned_int4_gemm(x2, qweight, scales, qzeros, group: int, bias, y, ws, cnt) -> Launch:
    """Run the fastest launch for this call's key (timing the candidates on the key's first call); returns it."""
    m, k = x2.shape
    n = qweight.shape[1]
    key = _key(m, n, k, group, x2.dtype, x2.device, qzeros is None, bias is not None)
    best = _BEST.get(key)
    args = (x2, qweight, scales, qzeros, group, bias, y, ws, cnt)
    if best is None:
        cands = candidates(m, n, k, group, x2.dtype, num_sms(x2.device))
        if torch.cuda.is_current_stream_capturing():  # no timing inside a graph capture: the reference launch
            best = cands[0]
        else:
            best = _BEST[key] = _tune(cands, args)
    run_launch(best, *args)
    return best


def _compile_worker(jobs: list[tuple]) -> int:
    """In a worker process: run each (m, n, k, group, dtype name, Launch) once on zeros, which compiles it into
    Triton's on-disk cache (values do not matter; shapes, dtypes and the == 1 specialisations do)."""
    import minillm.platform  # noqa: F401  (importing it runs the package's setup: minillm.kernels resolves)

    from minillm.kernels.int4_tuning import split_k_workspace

    done = 0
    for m, n, k, group, dtype_name, lc in jobs:
        dtype = getattr(torch, dtype_name)
        x2 = torch.zeros(m, k, dtype=dtype, device="cuda")
        qweight = torch.zeros(k // 8, n, dtype=torch.int32, device="cuda")
        scales = torch.zeros(k // group, n, dtype=dtype, device="cuda")
        qzeros = torch.zeros(k // group, n // 8, dtype=torch.int32, device="cuda")
        y = torch.empty(m, n, dtype=dtype, device="cuda")
        ws, cnt = split_k_workspace(x2.device, m, n)
        try:
            run_launch(lc, x2, qweight, scales, qzeros, group, None, y, ws, cnt)
            done += 1
        except Exception as exc:  # noqa: BLE001  (the tuning pass reports and skips it)
            print(f"int4 precompile: {lc}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
    torch.cuda.synchronize()
    return done


def precompile(calls: list[tuple[int, int, int, int, torch.dtype]], workers: int = 8) -> int:
    """Compile every candidate launch of the given (m, n, k, group, dtype) calls in `workers` processes (Triton
    caches compiled kernels on disk, so the tuning pass afterwards only loads them): a minute of single-threaded
    compiling becomes a few seconds. Asymmetric weights, no bias (the specialisations the engine's calls have).
    Returns how many launches compiled."""
    import multiprocessing as mp

    jobs, seen = [], set()
    for m, n, k, group, dtype in calls:
        for lc in candidates(m, n, k, group, dtype, num_sms(torch.device("cuda"))):
            # the compiled variant depends on the tile and, for int4_gemm.py's kernel, on Triton's integer
            # specialisations (== 1, a multiple of 16) of SPLIT_K, M and the M bucket (int4_mma.py's and
            # int4_gemv.py's kernels do not specialise them), not on the exact sizes
            bucket = min(triton.next_power_of_2(m), 256)
            ints = (lc.split_k == 1, m == 1, m % 16 == 0, bucket % 16 == 0) if lc.kernel in ("fma", "dot") else ()
            spec = (lc.kernel, lc.block_m, lc.block_n, lc.block_k, lc.num_warps, lc.num_stages, lc.prefetch, ints,
                    dtype)
            if spec not in seen:
                seen.add(spec)
                jobs.append((m, n, k, group, str(dtype).removeprefix("torch."), lc))
    if not jobs:
        return 0
    workers = max(1, min(workers, len(jobs)))
    with mp.get_context("spawn").Pool(workers) as pool:
        return sum(pool.map(_compile_worker, [jobs[i::workers] for i in range(workers)]))
