"""GEMV for decode: y = x @ W^T for a few rows of x (M = 1..16) and a dense fp16/bf16 weight (chapter 4).

Why batch-1 decode is a memory problem: a decode step multiplies M tokens' activations x [M, K] by every
weight matrix W [N, K] (nn.Linear's layout, K contiguous). That is 2*M*N*K flops for N*K*2 bytes of weight,
M flops per byte: the H200 streams ~4.2 TB/s and multiplies ~700 TFLOP/s, so the matmul is done computing
long before the weights arrive unless M is in the hundreds. At M = 1 the time of a linear layer is
(weight bytes) / (bandwidth) and nothing else matters: the figure of merit is the fraction of the copy
bandwidth a kernel reaches.

Where cuBLAS falls short (measured on the H200 in CUDA graphs with cold weights, benchmarks/sweep_gemv.py): on
the big matrices it is already at the roofline (gate_up 98%, lm_head 100%, down 89% of the copy bandwidth),
but on the small ones it is not (qkv 79%, o_proj 63%): a 33 MB matrix is about 8 us of reading, so a few
microseconds of launch, ramp-up and last-wave tail are a large share of the time. That fixed cost is what a
decode GEMV has to shave; the bytes themselves cannot be read faster.

What this kernel does (the idea of every fast GEMV: FlashDecoding++'s flat GEMV, TensorRT-LLM's and vLLM's
small-M kernels; written here from the idea):
* Program (pid_n, pid_k) owns BLOCK_N output rows and one K range (split-K). It streams its [BLOCK_N, BLOCK_K]
  weight tiles along K, each thread loading contiguous 16-byte vectors (K is contiguous), so every byte of W
  is read exactly once by exactly one program, in full 128-byte lines.
* The M rows of x are tiny (M*K*2 bytes, read from L2); rows past M are clamped onto row M - 1, and weight
  rows past N onto row N - 1, so the K loop has no masks when K divides into whole tiles.
* Two inner products. CUDA cores (USE_DOT=False): acc[M, BLOCK_N, BLOCK_K] += x * w in fp32, element by
  element, reduced over K once after the loop (no cross-thread reduction inside the loop). (A software
  prefetch of tile i + 1 during tile i's FMAs measured slower on the H200: the registers it takes cost more
  resident programs than it adds bytes in flight.) Each program re-reads x, so x's traffic (from L2) is
  M / BLOCK_N of W's: for M > 1 `reduce_each` sums over K after every tile instead, which keeps only
  [M, BLOCK_N] sums in registers and so affords the wider tiles that keep x's share small; where a whole
  row of W fits one tile (K <= 2048, a small model), `row_passes` loads the tile once and makes one pass per row
  of x over it (a product and a sum over K each: cheap for 2 rows, a cross-thread sum per row beyond). Tensor cores
  (USE_DOT=True): M padded to BLOCK_M = 16, acc += tl.dot(x, w^T); the padding costs flops, which are free
  here, and the compiler pipelines the tile loads through shared memory (num_stages).
* Programmatic dependent launch (`pdl`, Hopper; CUTLASS's weight-prefetch GEMM has the same idea): the
  weights do not depend on the previous kernel, only x does. Launched with PDL, a program loads its first
  weight tile, lets the next kernel launch, and only then waits (griddepcontrol.wait) for the previous kernel's
  output, so one kernel's launch and first loads overlap the previous one's last wave.
* Split-K (SPLIT_K > 1) when N / BLOCK_N programs cannot keep every SM busy: each split stores its fp32 partial
  in its own slot of a workspace and bumps a per-tile counter; the last split to arrive adds the slots in split
  order (from L2), adds the bias, writes y and resets the counter. One launch, no host sync, a counter left at
  zero for the next call, so a CUDA graph can replay it. The fixed order makes the sum, and its rounding, the
  same on every run: atomics adding the partials in arrival order had moved the last bits from run to run, and
  with them a greedy token wherever two logits were nearly tied (benchmarks/RESULTS.md, fortieth session).

* SwiGLU in the loads (`swiglu=True`, the down projection of a Llama MLP): x arrives as [gate | up], 2K wide,
  and each x tile is silu(gate) * up, computed as fused.py's silu_and_mul computes it. Every program recomputes
  its K range of the activation (a few thousand exponentials, free next to the weight bytes), and the step loses
  a launch and the write and re-read of the product: on the H200 at batch 1 (Llama-3-8B shape) silu_and_mul had
  taken 48 us of a 4.45 ms step in 32 launches.

* RMSNorm in the loads (`gemv_rms_norm`, the qkv and gate_up projections of a Llama layer): the norm before the
  projection needs the whole row's sum of squares, which no single program of the GEMV owns, so every program
  computes it: a first pass over x (and the residual) along all of K, a few KB from L2 per program, then each x
  tile is normalised as it is loaded; one program also writes x + residual, the new residual stream. The step
  loses the norm's launch and kernel boundary, sixty of them a step on a 30-layer model.

`gemv(x, weight, bias, config, swiglu)` and `gemv_rms_norm(...)` are the entry points; `default_config`
(gemv_config.py, with the launch configurations) picks a launch for a shape, and benchmarks/sweep_gemv.py
measures the whole config space on the GPU against cuBLAS (F.linear). The engine's dense linears and the LM head
call it at decode through minillm.layers.gemv_dispatch.dense_linear (and Linear.forward_rms_norm).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# the launch configurations live in gemv_config.py; they are this module's API too (__all__): callers pass them
from minillm.kernels.gemv_config import TUNED_CONFIGS, GemvConfig, code_config, default_config, tuned_config
from minillm.kernels.hardware import num_sms
from minillm.kernels.pdl import launch_options

__all__ = ["GemvConfig", "MAX_M", "TUNED_CONFIGS", "default_config", "tuned_config", "gemv", "gemv_rms_norm"]

MAX_M = 16  # rows of x one launch serves (the tensor-core path pads M to 16)
_CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)  # weights given with per-row scales (weight_scale)


@triton.jit
def _load_x(x_ptrs, r_ptrs, nw_ptrs, inv_rms, K, k_ok, MASKED: tl.constexpr, SWIGLU: tl.constexpr,
            NORM: tl.constexpr = False, HAS_RES: tl.constexpr = False):
    """A [BLOCK_M, BLOCK_K] tile of the GEMV's input. SWIGLU: the row holds [gate | up] (2K wide) and the input is
    silu(gate) * up, computed as fused.py's silu_and_mul computes it (fp32, rounded to x's dtype): the same
    values, without that kernel's launch and its write and re-read of the product. NORM: the input is
    RMSNorm(h) with h = x (+ the residual at r_ptrs, rounded to x's dtype), computed as fused.py's rms_norm_kernel
    computes it: (h * inv_rms * weight) in fp32, rounded once (inv_rms broadcasts over the tile's rows)."""
    if MASKED:
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
    else:
        x = tl.load(x_ptrs)
    if SWIGLU:
        if MASKED:
            up = tl.load(x_ptrs + K, mask=k_ok[None, :], other=0.0).to(tl.float32)
        else:
            up = tl.load(x_ptrs + K).to(tl.float32)
        gate = x.to(tl.float32)
        x = (gate / (1.0 + tl.exp(-gate)) * up).to(x.dtype)
    if NORM:
        if MASKED:
            nw = tl.load(nw_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
        else:
            nw = tl.load(nw_ptrs).to(tl.float32)
        h = x
        if HAS_RES:
            if MASKED:
                r = tl.load(r_ptrs, mask=k_ok[None, :], other=0.0)
            else:
                r = tl.load(r_ptrs)
            h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        x = (h.to(tl.float32) * inv_rms * nw).to(x.dtype)
    return x


@triton.jit
def _norm_prologue(X, RES, RES_OUT, rows_x, offs_m, M, K, stride_xm, stride_rm, stride_om, eps, WRITE,
                   HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """inv_rms [BLOCK_M] of every row of h = x (+ residual) over all of K (every program needs its rows' norms,
    whatever K range it owns: a second read of x, from L2). Where WRITE (one program of the grid), h is also
    stored to RES_OUT: the new residual stream, as rms_norm_kernel writes it. WRITE is 1 there, else 0."""
    offs_k = tl.arange(0, BLOCK_K)
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        h = tl.load(X + rows_x[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :], mask=k_ok[None, :],
                    other=0.0)
        if HAS_RES:
            r = tl.load(RES + rows_x[:, None].to(tl.int64) * stride_rm + (k0 + offs_k)[None, :],
                        mask=k_ok[None, :], other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)  # rounded as the unfused add rounds it
            tl.store(RES_OUT + offs_m[:, None].to(tl.int64) * stride_om + (k0 + offs_k)[None, :], h,
                     mask=(offs_m < M * WRITE)[:, None] & k_ok[None, :])  # WRITE = 0: no rows
        h = h.to(tl.float32)
        sum_sq += tl.sum(h * h, axis=1)
    return 1.0 / tl.sqrt(sum_sq / K + eps)


@triton.jit
def _x_ready(X, RES, RES_OUT, rows_x, offs_m, M, K, stride_xm, stride_rm, stride_om, eps, WRITE,
             USE_PDL: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """From here on x may be read: with PDL, release the next kernel and wait for the previous one (whose output x
    is); then, with NORM, the first pass for the rows' inverse RMS. Returns inv_rms [BLOCK_M] (ones without NORM)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()  # the next kernel may start its own weight loads
        tl.extra.cuda.gdc_wait()  # x (and y, the workspace) belong to the previous kernel until it is done
    inv_rms = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if NORM:
        inv_rms = _norm_prologue(X, RES, RES_OUT, rows_x, offs_m, M, K, stride_xm, stride_rm, stride_om, eps, WRITE,
                                 HAS_RES, BLOCK_M, BLOCK_K)
    return inv_rms


@triton.jit
def _gemv_kernel(X, W, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_wn, stride_ym, SPLIT_K,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_SPLIT: tl.constexpr, USE_DOT: tl.constexpr, REDUCE_EACH: tl.constexpr, EVEN_K: tl.constexpr,
                 USE_PDL: tl.constexpr, FIRST_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 SWIGLU: tl.constexpr = False, ROW_PASSES: tl.constexpr = False,
                 RES=None, NW=None, RES_OUT=None, stride_rm=0, stride_om=0, eps=0.0,
                 NORM: tl.constexpr = False, HAS_RES: tl.constexpr = False,
                 W_SCALE=None, HAS_W_SCALE: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    rows_w = tl.minimum(offs_n, N - 1)  # clamped: unmasked loads; rows past N are never stored
    rows_x = tl.minimum(offs_m, M - 1)
    # this split's K range: a whole number of BLOCK_K tiles (the last split may get fewer, or none)
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = W + rows_w[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    x_ptrs = X + rows_x[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    # NORM: the residual's and the norm weight's tiles walk along K with x's
    r_ptrs = RES + rows_x[:, None].to(tl.int64) * stride_rm + (k_lo + offs_k)[None, :]
    nw_ptrs = NW + (k_lo + offs_k)[None, :]
    writer = ((pid_n == 0) & (pid_k == 0)).to(tl.int32)  # 1 in the one program that writes h
    if ROW_PASSES:  # the whole of K in this one tile (the launcher checks): W once, then one pass per row of x
        k_ok = offs_k < K
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0).to(tl.float32)
        inv_rms = _x_ready(X, RES, RES_OUT, rows_x, offs_m, M, K, stride_xm, stride_rm, stride_om, eps, writer,
                           USE_PDL, NORM, HAS_RES, BLOCK_M, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(BLOCK_M):
            row_i = tl.minimum(i, M - 1).to(tl.int64)
            x_row = X + row_i * stride_xm + offs_k[None, :]
            inv_rms_i = tl.sum(tl.where(offs_m == i, inv_rms, 0.0), axis=0)
            x = _load_x(x_row, RES + row_i * stride_rm + offs_k[None, :], NW + offs_k[None, :], inv_rms_i, K, k_ok,
                        True, SWIGLU, NORM, HAS_RES).to(tl.float32)
            acc = tl.where(offs_m[:, None] == i, tl.sum(x * w, axis=1)[None, :], acc)
    else:
        if USE_DOT or REDUCE_EACH:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        if USE_PDL:  # programmatic dependent launch: the first weight tile is loaded before x exists
            k_ok = (k_lo + offs_k) < k_hi
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        inv_rms = _x_ready(X, RES, RES_OUT, rows_x, offs_m, M, K, stride_xm, stride_rm, stride_om, eps, writer,
                           USE_PDL, NORM, HAS_RES, BLOCK_M, BLOCK_K)
        if USE_PDL:
            x = _load_x(x_ptrs, r_ptrs, nw_ptrs, inv_rms[:, None], K, k_ok, True, SWIGLU, NORM, HAS_RES)
            if USE_DOT:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
            elif REDUCE_EACH:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            else:
                acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            r_ptrs += BLOCK_K
            nw_ptrs += BLOCK_K
        for k0 in range(k_lo + FIRST_K, k_hi, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = _load_x(x_ptrs, r_ptrs, nw_ptrs, inv_rms[:, None], K, offs_k, False, SWIGLU, NORM, HAS_RES)
            else:
                k_ok = (k0 + offs_k) < k_hi
                w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
                x = _load_x(x_ptrs, r_ptrs, nw_ptrs, inv_rms[:, None], K, k_ok, True, SWIGLU, NORM, HAS_RES)
            if USE_DOT:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
            elif REDUCE_EACH:  # reduce over K every tile: registers for [M, BLOCK_N] sums only
                acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            else:
                acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            r_ptrs += BLOCK_K
            nw_ptrs += BLOCK_K
        if not USE_DOT and not REDUCE_EACH:
            acc = tl.sum(acc3, axis=2)
    if HAS_W_SCALE:  # 8-bit codes: y[:, n] = s[n] * sum_k x[:, k] q[n, k], scaled once per row (and split)
        acc *= tl.load(W_SCALE + rows_w).to(tl.float32)[None, :]

    store_rows(acc, Y, BIAS, WS, CNT, offs_m, offs_n, rows_w, M, N, stride_ym, pid_n, pid_k, SPLIT_K, HAS_BIAS,
               USE_SPLIT, BLOCK_M, BLOCK_N)


@triton.jit
def store_rows(acc, Y, BIAS, WS, CNT, offs_m, offs_n, rows_w, M, N, stride_ym, pid_n, pid_k, SPLIT_K,
               HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A decode GEMV's epilogue (also kernels/nf4_gemv.py's): y[:M, offs_n] = acc (+ bias) in Y's dtype; under
    split-K, acc is split pid_k's partial: stored in its slot of the workspace WS ([SPLIT_K, M, N]), and the
    tile's last split to arrive (the counter CNT[pid_n]) adds the slots in split order, writes the total and
    leaves CNT zeroed for the next call."""
    n_ok = offs_n < N
    y_mask = (offs_m < M)[:, None] & n_ok[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if not USE_SPLIT:
        if HAS_BIAS:
            acc += tl.load(BIAS + rows_w).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)
    else:
        slot = (offs_m[:, None] + pid_k * M).to(tl.int64) * N + offs_n[None, :]
        tl.store(WS + slot, acc, mask=y_mask)
        tl.debug_barrier()  # every thread's partial is stored before the counter says so (release below)
        arrived = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel")  # gpu scope: releases ours, acquires theirs
        if arrived == SPLIT_K - 1:  # last split of this tile: the slots in split order, the same sum every run
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, SPLIT_K):
                # .cg: from L2, where the other SMs' stores are (an SM's L1 does not see them)
                part = (offs_m[:, None] + s * M).to(tl.int64) * N + offs_n[None, :]
                total += tl.load(WS + part, mask=y_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(BIAS + rows_w).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(CNT + pid_n, 0)


# Per device, every workspace ever handed out, the newest last: a grown-out buffer is kept alive, since a CUDA
# graph captured earlier still replays into the addresses it recorded.
_WORKSPACES: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def split_workspace(device: torch.device, sums: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split-K workspace of `device` (fp32 partials, one slot per split; int32 arrival counters), grown as
    needed. Every launch overwrites the partials it reads and leaves the counters zeroed, so calls on one stream
    share it. It must not grow while a CUDA graph is being captured (the engine's warm-up call before each capture
    makes it big enough)."""
    held = _WORKSPACES.setdefault(str(device), [])
    if not held or held[-1][0].numel() < sums or held[-1][1].numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"gemv: the split-K workspace must grow to {sums} sums / {tiles} tiles during CUDA "
                               "graph capture; call gemv once with this shape before capturing")
        old = (held[-1][0].numel(), held[-1][1].numel()) if held else (0, 0)
        held.append((torch.zeros(max(sums, 2 * old[0]), dtype=torch.float32, device=device),
                     torch.zeros(max(tiles, 2 * old[1]), dtype=torch.int32, device=device)))
    return held[-1]


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                weight_scale: torch.Tensor | None = None) -> None:
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if not isinstance(x, torch.Tensor) or x.dtype not in dtypes:
        raise TypeError(f"gemv: x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x))}")
    w_dtypes = _CODE_DTYPES if weight_scale is not None else (x.dtype,)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in w_dtypes:
        want = "int8 or float8_e4m3fn (weight_scale is given)" if weight_scale is not None else f"x's dtype {x.dtype}"
        raise ValueError(f"gemv: weight must be a 2-D [N, K] tensor of {want}, got "
                         f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
    if weight_scale is not None and (weight_scale.shape != (weight.shape[0],) or weight_scale.device != x.device
                                     or not weight_scale.is_floating_point()):
        raise ValueError(f"gemv: weight_scale must be a floating [N] = [{weight.shape[0]}] tensor on {x.device}, "
                         f"got {weight_scale.dtype} {tuple(weight_scale.shape)} on {weight_scale.device}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1] or weight.shape[1] == 0 or weight.shape[0] == 0:
        raise ValueError(f"gemv: x [..., K] and weight [N, K] must agree on K >= 1 and have N >= 1, got x "
                         f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"gemv: x is on {x.device}, weight on {weight.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.device != x.device):
        raise ValueError(f"gemv: bias must be [N] = [{weight.shape[0]}] on {x.device}, got "
                         f"{tuple(bias.shape)} on {bias.device}")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, swiglu: bool = False,
         weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ weight[N, K]^T (+ bias), in x's dtype, for at most MAX_M rows of x.

    weight_scale [N]: the weight is 8-bit codes q (int8, or float8_e4m3fn) with W = q * weight_scale[:, None]
    (weight-only W8A16: chapter 7's int8_rtn, and FP8 at decode); the codes are converted in registers and each
    row's sum scaled once, so a decode step reads one byte per weight instead of two.

    `config` pins the launch (benchmarks, tests); None takes `default_config` for the shape.
    swiglu=True: x is [..., 2K] = [gate | up] (the gate_up projection's output) and the product's input is
    silu(gate) * up, computed in the loads (a Llama MLP's down projection without the activation's launch).
    """
    if swiglu:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != 2 * weight.shape[1]:
            raise ValueError(f"gemv(swiglu=True): x must be [..., 2K] = [gate | up] with K = {weight.shape[1]}, "
                             f"got {tuple(getattr(x, 'shape', ()))}")
        if x.stride(-1) != 1:
            x = x.contiguous()
        _check_args(x[..., :weight.shape[1]], weight, bias, weight_scale)
    else:
        _check_args(x, weight, bias, weight_scale)
    k = weight.shape[1]
    x2 = x.reshape(-1, 2 * k if swiglu else k)
    y = _launch(x2, weight, bias, config, swiglu=swiglu, weight_scale=weight_scale)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gemv_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None,
                  weight_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h) @ weight^T (+ bias), h) with h = x + residual (x alone when residual is None): the norm before
    a decoder layer's qkv or gate_up projection, inside that projection's GEMV (`NORM`), as
    fused.rms_norm(x, norm_weight, eps, residual) followed by gemv would compute it, one launch instead of two.

    Every program computes its rows' inverse RMS from a first pass over x (and residual) along all of K, then
    normalises each x tile as it loads it; one program also writes h, the new residual stream (a new tensor:
    writing it over `residual` while other programs still read it would race). Returns h = x itself without a
    residual. x, residual: [..., K] in the weight's dtype; norm_weight [K]; at most MAX_M rows. weight_scale: 8-bit
    codes with per-row scales, as in gemv."""
    _check_args(x, weight, bias, weight_scale)
    k = weight.shape[1]
    if not isinstance(norm_weight, torch.Tensor) or norm_weight.shape != (k,):
        raise ValueError(f"gemv_rms_norm: norm_weight must have shape ({k},), got "
                         f"{tuple(getattr(norm_weight, 'shape', ()))}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"gemv_rms_norm: residual must match x ({tuple(x.shape)}, {x.dtype}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}")
    if not eps > 0:
        raise ValueError(f"gemv_rms_norm: eps must be > 0, got {eps}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    res2 = None
    if residual is not None:
        res2 = residual.reshape(-1, k)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
    h = torch.empty_like(x2) if residual is not None else x2
    y = _launch(x2, weight, bias, config, norm=(res2, norm_weight.contiguous(), h, float(eps)),
                weight_scale=weight_scale)
    return y.reshape(*x.shape[:-1], weight.shape[0]), h.view(x.shape)


def _launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: GemvConfig | None,
            swiglu: bool = False, norm: tuple | None = None, weight_scale: torch.Tensor | None = None
            ) -> torch.Tensor:
    """y [M, N] for x2 [M, K] (or [M, 2K] with swiglu); norm = (residual [M, K] or None, norm weight, h, eps)."""
    n, k = weight.shape
    m = x2.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"gemv serves 1..{MAX_M} rows of x, got {m}; use F.linear")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError(f"gemv: weight must be contiguous along K (row-major [N, K]), got strides {weight.stride()}")
    rule = code_config if weight_scale is not None else default_config
    cfg = config if config is not None else rule(m, n, k, num_sms(x2.device))
    cfg.check(m, x2.is_cuda)
    if cfg.row_passes and k > cfg.block_k:
        raise ValueError(f"GemvConfig.row_passes needs all of K = {k} in one tile, got block_k = {cfg.block_k}")
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid_n = triton.cdiv(n, cfg.block_n)
    split = min(cfg.split_k, triton.cdiv(k, cfg.block_k))  # never more splits than K tiles
    ws, cnt = split_workspace(x2.device, split * m * n, grid_n) if split > 1 else (y, y)
    even_k = k % (cfg.block_k * split) == 0
    pdl = cfg.pdl or bool(launch_options(x2.device))  # the config's switch, or PDL on for every kernel (pdl.py)
    res, nw, h, eps = norm if norm is not None else (None, x2, x2, 0.0)
    _gemv_kernel[(grid_n, split)](
        x2, weight, bias if bias is not None else weight, y, ws, cnt, m, n, k, x2.stride(0), weight.stride(0),
        y.stride(0), split, HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m(m), BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, USE_SPLIT=split > 1, USE_DOT=cfg.use_dot,
        REDUCE_EACH=cfg.reduce_each and not cfg.use_dot, EVEN_K=even_k, USE_PDL=pdl,
        FIRST_K=cfg.block_k if pdl else 0,
        DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", SWIGLU=swiglu, ROW_PASSES=cfg.row_passes,
        RES=res if res is not None else x2, NW=nw, RES_OUT=h, stride_rm=res.stride(0) if res is not None else 0,
        stride_om=h.stride(0), eps=eps, NORM=norm is not None, HAS_RES=res is not None,
        W_SCALE=weight_scale if weight_scale is not None else x2, HAS_W_SCALE=weight_scale is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}))
    return y
