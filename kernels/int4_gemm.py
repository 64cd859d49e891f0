"""INT4 weight-only GEMM, Marlin-style: y = x @ dequant(W)^T with the 4-bit weights unpacked in registers (chapter 8).

At decode (M = 1..16 tokens) a linear layer is a matrix-vector product: every weight is read once and used
M times, so the time is the time to read the weights. Storing them in 4 bits instead of 16 reads 4x fewer
bytes; the kernel wins only if it unpacks them *inside* the K loop, in registers, never writing a bf16 copy.

Layout (GPTQ's checkpoint layout, so a GPTQ `qweight`/`qzeros`/`scales` triple loads without repacking):

    qweight  int32 [K // 8, N]        word (j, n) holds W[n, 8j + i] in bits [4i, 4i + 4), i = 0..7 (packed along K)
    scales   x.dtype [K // G, N]      one scale per group of G input rows and output column
    qzeros   int32 [K // G, N // 8]   zero points packed along N (column 8c + i in bits [4i, 4i+4)), or None for
                                      the symmetric grid, whose zero point is 8 (codes stored offset by 8)
    perm     int64 [K] or None        GPTQ act-order: x[:, perm] is fed to the kernel (groups made contiguous)

w[k, n] = (code - zero) * scale. qzeros hold the true zero points (GPTQ "v1" checkpoints store zero - 1: add
1 when loading those).

How the kernel spends its instructions (the budget at M = 1 is ~4 per weight to keep up with HBM):
* One int32 load brings 8 weights of one column; the 8 nibbles are pulled out with *constant* shifts (one
  static loop over i), so nibble i of the tile [BLOCK_K/8, BLOCK_N] holds K rows 8j + i. The activations
  are read with the same stride 8 to match (x is tiny at decode), so no reshuffle of weights is needed.
* Int -> float without per-nibble shifts or the slow I2F instruction: OR 2^23's exponent (0x4B000000) into
  each word once, then one AND per nibble (keeping the nibble where it lies and the exponent) makes the
  float 2^23 + code * 16^j, and one FFMA (times 16^-j, minus 2^23 16^-j + zero) leaves code - zero exactly.
  That is one LOP3 and one FFMA per weight, plus three integer ops per word of eight.
* When a K tile lies inside one group (BLOCK_K divides G) and BLOCK_M is small, the scale multiplies the
  tile's partial sums, not every weight (SCALE_AFTER); otherwise each weight is scaled in registers.
* Two inner products: USE_DOT=False multiplies-and-adds on CUDA cores (M = 1..4, no tensor-core padding and
  no shared-memory round trip); USE_DOT=True runs 8 tl.dot per tile (fp16/bf16 operands, fp32 accumulate).
* Split-K for small M: with M = 1 and N = 14336 there are only ~56 column tiles for 132 SMs, so SPLIT_K
  programs share each tile's K range. Each adds its fp32 partial into a workspace with atomics and bumps a
  per-tile counter; the last to arrive reads the sum, writes y and zeroes the workspace and counter again,
  so one launch does everything and the workspace stays clean for the next call (and for CUDA graphs).

What that buys, read off ptxas's sm_90 output (no GPU needed: triton.compile for GPUTarget("cuda", 90, 32)):
the K loop spends about 5.2 instructions per weight on the CUDA-core path and 4.8 on the tensor-core path,
against 6.0 for this kernel's first version (a shift and a mask per nibble, then the same 2^23 trick).
On the H200 (2026-12-02 sweep) that count, not HBM, is the limit at decode: the best tiles read the weights at
35-42% of copy bandwidth whatever the split; int4_mma.py unpacks two weights per instruction (~3.4 per weight).

The layout helpers (repack from rtn.QuantizedWeight, act-order sorting, the torch reference dequantizer) are in
int4_layout.py, the launch tuning in int4_tuning.py. On a GPU every call goes to int4_dispatch.py, which times
this kernel's two paths, the other INT4 kernels and (prefill-sized M) dequantise-then-cuBLAS once per shape and
keeps the fastest (make the first call of each shape before graph capture). Under the interpreter one small config
runs (fp32 activations: the interpreter's bf16 tl.dot is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.hardware import num_sms
from minillm.kernels.int4_tuning import (_SPLIT_K_WORKSPACES, MAX_SPLIT_K,  # noqa: F401
                                         SPLIT_K_MAX_M, _interpreter_config, choose_split_k, split_k_workspace)
from minillm.platform import triton_interpreted

__all__ = ["int4_gemm", "int4_unpack", "group_scale_zero", "launch_int4_gemm", "choose_split_k", "MAX_SPLIT_K"]


# >>> exercise ch08.int4_unpack_kernel
@triton.jit
def group_scale_zero(S, QZ, g, offs_n, ok, stride_sg, stride_zg, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Group g's fp32 scales and zero points of columns offs_n, each [1, BLOCK_N] (loads masked by `ok`; a
    symmetric layout's zero point is 8)."""
    s = tl.load(S + g * stride_sg + offs_n, mask=ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ZEROS:
        zw = tl.load(QZ + g * stride_zg + offs_n // 8, mask=ok, other=0)
        z = ((zw >> ((offs_n % 8) * 4)) & 0xF).to(tl.float32)[None, :]
    else:
        z = tl.full([1, BLOCK_N], 8.0, tl.float32)
    return s, z


@triton.jit
def _load_tile(QW, S, QZ, t, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg, stride_zg,
               GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, ONE_GROUP: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """K tile t's packed words [ROWS, BLOCK_N] and its fp32 scales and zeros, one row per tile ([1, BLOCK_N],
    ONE_GROUP) or one per word row ([ROWS, BLOCK_N]); all masked off for t >= t_end (the last prefetch)."""
    k0 = t * BLOCK_K
    rows = k0 // 8 + offs_j
    j_ok = (rows < K // 8) & (rows < t_end * ROWS)  # rows < t_end * ROWS <=> t < t_end
    w = tl.load(QW + rows[:, None].to(tl.int64) * stride_qk + offs_n[None, :], mask=j_ok[:, None] & n_ok[None, :],
                other=0)
    if ONE_GROUP:
        ok = n_ok & (offs_n * 0 + t < t_end)  # (a tensor comparison, also under the interpreter)
        s, z = group_scale_zero(S, QZ, k0 // GROUP_SIZE, offs_n, ok, stride_sg, stride_zg, HAS_ZEROS, BLOCK_N)
    else:
        g = (rows * 8) // GROUP_SIZE
        ok = j_ok[:, None] & n_ok[None, :]
        s = tl.load(S + g[:, None] * stride_sg + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zw = tl.load(QZ + g[:, None] * stride_zg + offs_n[None, :] // 8, mask=ok, other=0)
            z = ((zw >> ((offs_n[None, :] % 8) * 4)) & 0xF).to(tl.float32)
        else:
            z = tl.full([ROWS, BLOCK_N], 8.0, tl.float32)
    return w, s, z


@triton.jit
def int4_unpack(w_lo, w_hi, z, I: tl.constexpr):
    """Weight codes of nibble I (0..7) of a tile of packed int32 words, minus the zero points z, as exact fp32.

    The original word holds 8 codes, code i in bits [4i, 4i + 4). The caller has prepared, once per word,
    w_lo = word | 0x4B000000 and w_hi = (word >> 16) | 0x4B000000 (0x4B000000 is the bit pattern of the float
    2^23), so code I is in bits [4j, 4j + 4), j = I % 4, of w_lo (I < 4) or of w_hi (I >= 4). z: fp32 zero
    points broadcastable against the tile (or the scalar 0.0). Return (code - z) as fp32, the tile's shape.
    Any exact way is right; the fast one (one AND and one FMA per weight, no shift and no int -> float
    convert) keeps 2^23's exponent with the nibble: as a float that is 2^23 + code * 16^j exactly.
    """
    # >>> solution
    # One AND keeps the nibble where it lies and the exponent: the float 2^23 + code 16^j (the mantissa's unit
    # is 1 at 2^23); one FMA, f * 16^-j - (2^23 16^-j + z), leaves code - z exactly. I is a constexpr: the
    # branch and the constants are resolved at compile time.
    if I < 4:
        f = (w_lo & (0x4B000000 | (0xF << (4 * (I % 4))))).to(tl.float32, bitcast=True)
    else:
        f = (w_hi & (0x4B000000 | (0xF << (4 * (I % 4))))).to(tl.float32, bitcast=True)
    return f * (1.0 / (1 << (4 * (I % 4)))) - (8388608.0 / (1 << (4 * (I % 4))) + z)
    # <<< solution


@triton.jit
def _int4_gemm_kernel(X, QW, S, QZ, BIAS, Y, WS, CNT, M, N, K, stride_xm, stride_qk, stride_sg, stride_zg,
                      stride_ym, M_BUCKET, EXP23, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                      HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, SPLIT_K):
    ROWS: tl.constexpr = BLOCK_K // 8  # packed words per column per K tile
    # SPLIT_K is a run-time argument (one compile serves every split; Triton still specializes the value 1)
    ONE_GROUP: tl.constexpr = GROUP_SIZE % BLOCK_K == 0  # a K tile never straddles two groups
    # small M: scale the tile's partial sums, not every weight, and prefetch the next tile into registers; with
    # many rows (BLOCK_M > 32) the extra accumulator and tile would spill, and the math hides the latency anyway
    SCALE_AFTER: tl.constexpr = ONE_GROUP & (BLOCK_M <= 32)
    PREFETCH: tl.constexpr = BLOCK_M <= 32
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, ROWS)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # this program's share of the K tiles
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t_begin = pid_k * per_split
    t_end = tl.minimum(t_begin + per_split, k_tiles)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if not USE_DOT:
        acc2 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)  # BLOCK_M == 1: rows reduced once at the end
    if PREFETCH:
        w, s, z = _load_tile(QW, S, QZ, t_begin, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg, stride_zg,
                             GROUP_SIZE, HAS_ZEROS, ONE_GROUP, ROWS, BLOCK_K, BLOCK_N)
    for t in range(t_begin, t_end):
        if PREFETCH:  # the next tile first: its memory latency hides behind this tile's math
            w_next, s_next, z_next = _load_tile(QW, S, QZ, t + 1, t_end, offs_j, offs_n, n_ok, K, stride_qk,
                                                stride_sg, stride_zg, GROUP_SIZE, HAS_ZEROS, ONE_GROUP, ROWS,
                                                BLOCK_K, BLOCK_N)
        else:
            w, s, z = _load_tile(QW, S, QZ, t, t_end, offs_j, offs_n, n_ok, K, stride_qk, stride_sg, stride_zg,
                                 GROUP_SIZE, HAS_ZEROS, ONE_GROUP, ROWS, BLOCK_K, BLOCK_N)
        k0 = t * BLOCK_K
        j_ok = (k0 // 8 + offs_j) < K // 8
        if not SCALE_AFTER:
            zs = z * s  # (q - z) * s = q * s - z * s: one FFMA per weight
        # the exponent of 2^23 OR-ed into each word once (nibbles 4..7 first moved down to bits 0..15): bits
        # 24..30 of the result are 2^23's exponent whatever the word's own (or sign) bits were there
        # (EXP23 = 0x4B000000 arrives as a run-time argument: were it a literal, the compiler would fold this OR
        # into every per-nibble AND, which then needs two constants and an extra move per weight)
        w_lo = w | EXP23
        w_hi = (w >> 16) | EXP23
        if USE_DOT:
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            part = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(8):
            if SCALE_AFTER:
                q = int4_unpack(w_lo, w_hi, z, i)  # (q - z): the tile's partial sums are scaled once, below
            else:
                q = int4_unpack(w_lo, w_hi, 0.0, i) * s - zs  # (q - z) * s = q * s - z * s: one FFMA
            # activations of K rows 8j + i: stride 8 along K, matching nibble i of each word
            x_cols = k0 + 8 * offs_j + i
            if USE_DOT:
                xi = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + x_cols[None, :],
                             mask=m_ok[:, None] & j_ok[None, :], other=0.0)
                if UPCAST:  # the interpreter mis-multiplies bf16 dot operands: fp32 there
                    xi = xi.to(tl.float32)
                part = tl.dot(xi, q.to(xi.dtype), part, input_precision=DOT_PRECISION)
            else:
                xi = tl.load(X + pid_m.to(tl.int64) * stride_xm + x_cols, mask=j_ok, other=0.0).to(tl.float32)
                part += xi[:, None] * q
        if SCALE_AFTER:
            part = part * s
        if USE_DOT:
            acc += part
        else:
            acc2 += part
        if PREFETCH:
            w, s, z = w_next, s_next, z_next
    if not USE_DOT:
        acc += tl.sum(acc2, axis=0)[None, :]

    y_mask = m_ok[:, None] & n_ok[None, :]
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)
    else:
        ws_ptrs = WS + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=y_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial is in before the counter says so (release below)
        arrived = tl.atomic_add(CNT + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last split of this tile: read the sum (at L2, via atomics), clean up
            total = tl.atomic_add(ws_ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=y_mask, sem="acquire")
            if HAS_BIAS:
                total += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=y_mask)
            tl.store(ws_ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=y_mask)
            tl.atomic_xchg(CNT + pid, 0)


def launch_int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                     group_size: int, use_dot: bool = False) -> torch.Tensor:
    """Run _int4_gemm_kernel (so int4_unpack) with one fixed small tile and no split-K, for chapter 8 and its
    graded tests: x [M, K] float -> y [M, N] in x's dtype (layout as int4_gemm's). The engine's: int4_gemm.
    use_dot: the tensor-core path (BLOCK_M 16, BLOCK_K 128), else the CUDA-core path (one row per program)."""
    m, k = x.shape
    n = qweight.shape[1]
    group = k if group_size == -1 else group_size
    x, qweight, scales = x.contiguous(), qweight.contiguous(), scales.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    qz = qzeros.contiguous() if qzeros is not None else qweight  # a placeholder when symmetric
    block_k = min(64, group) if group & (group - 1) == 0 else 64  # a power of two (tl.arange)
    block_m, block_k = (16, 128) if use_dot else (1, block_k)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, 32), 1)
    _int4_gemm_kernel[grid](x, qweight, scales, qz, scales, y, y, qweight, m, n, k, x.stride(0), qweight.stride(0),
                            scales.stride(0), qz.stride(0), y.stride(0), m, 0x4B000000, GROUP_SIZE=group,
                            HAS_ZEROS=qzeros is not None, HAS_BIAS=False,
                            DOT_PRECISION="tf32" if x.is_cuda and x.dtype != torch.float32 else "ieee",
                            UPCAST=not x.is_cuda and x.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=32,
                            BLOCK_K=block_k, USE_DOT=use_dot, SPLIT_K=1)
    return y
# <<< exercise


# ---------------------------------------------------------------------------------------------- launcher
def _check_int4_args(x, qweight, scales, qzeros, group_size, perm, bias) -> int:
    """Validate the operands (ValueError/TypeError naming the bad one); returns the effective group size."""
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K > 0, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or k % 8 or qweight.shape[0] != k // 8:
        raise ValueError(f"qweight must be int32 [K // 8, N] = [{k // 8}, N] with K = {k} a multiple of 8, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    n = qweight.shape[1]
    group = k if group_size == -1 else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group < 8 or group % 8 or k % group:
        raise ValueError(f"group_size must be -1 or a multiple of 8 dividing K = {k}, got {group_size!r}")
    if not scales.is_floating_point() or scales.shape != (k // group, n):
        raise ValueError(f"scales must be a float tensor [K // group_size, N] = [{k // group}, {n}], got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    if qzeros is not None and (qzeros.dtype != torch.int32 or n % 8 or qzeros.shape != (k // group, n // 8)):
        raise ValueError(f"qzeros must be None or int32 [K // group_size, N // 8] = [{k // group}, {n // 8}] "
                         f"(N a multiple of 8), got {qzeros.dtype} {tuple(qzeros.shape)}")
    if perm is not None and (perm.shape != (k,) or perm.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"perm must be None or an integer tensor [K] = [{k}], got {perm.dtype} {tuple(perm.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be None or [N] = [{n}], got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros), ("perm", perm), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return group


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
              group_size: int, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
              split_k: int | None = None, config: dict | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(W)^T (+ bias), in x's dtype, with W in the layout of the module docstring.

    On a GPU every call runs the fastest of this module's two paths, int4_mma.py's and int4_gemv.py's kernels and
    (M >= 16) int4_dequant.py's dequantise-then-cuBLAS, timed once per (M bucket, shape) by int4_dispatch.py.
    split_k / config (BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, num_warps, num_stages; or MMA=True with BLOCK_M,
    BLOCK_N, BLOCK_K, num_warps, num_stages for int4_mma.py's kernel) pin the launch instead of autotuning;
    leave both None in the engine.
    """
    group = _check_int4_args(x, qweight, scales, qzeros, group_size, perm, bias)
    k, n = x.shape[-1], qweight.shape[1]
    x2 = x.reshape(-1, k)
    if perm is not None:
        x2 = x2.index_select(1, perm)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int)
                                or not 1 <= split_k <= MAX_SPLIT_K):
        raise ValueError(f"split_k must be None or an int in [1, {MAX_SPLIT_K}], got {split_k!r}")
    qweight, scales = qweight.contiguous(), scales.contiguous()
    qzeros = qzeros.contiguous() if qzeros is not None else qweight  # placeholder when symmetric
    # split-K workspace, or placeholders of the right types when K is never split (large M)
    ws, cnt = split_k_workspace(x.device, m, n) if (m <= SPLIT_K_MAX_M or split_k not in (None, 1)) else (y, qweight)
    # (int4_dispatch and int4_mma import this module: imported where they run)
    if config is None and split_k is None and not triton_interpreted():
        from minillm.kernels.int4_dispatch import tuned_int4_gemm  # the fastest kernel for this shape, timed
        tuned_int4_gemm(x2, qweight, scales, None if qzeros is qweight else qzeros, group, bias, y, ws, cnt)
        return y.reshape(*x.shape[:-1], n)
    if config is not None and config.get("MMA", False):
        from minillm.kernels.int4_mma import launch_int4_mma
        cfg = dict({k: v for k, v in config.items() if k != "MMA"}, SPLIT_K=split_k or config.get("SPLIT_K", 1))
        launch_int4_mma(x2, qweight, scales, None if qzeros is qweight else qzeros, group, bias, y, ws, cnt, cfg)
        return y.reshape(*x.shape[:-1], n)
    m_bucket = min(triton.next_power_of_2(m), 256)
    args = (x2, qweight, scales, qzeros, bias if bias is not None else scales, y, ws, cnt, m, n, k,
            x2.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0), y.stride(0), m_bucket, 0x4B000000)
    consts = dict(GROUP_SIZE=group, HAS_ZEROS=qzeros is not qweight, HAS_BIAS=bias is not None,
                  DOT_PRECISION="ieee" if x.dtype == torch.float32 or triton_interpreted() else "tf32",
                  UPCAST=triton_interpreted() and x.dtype == torch.bfloat16)
    cfg = dict(config) if config is not None else (
        _interpreter_config(m, group) if triton_interpreted() else dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128,
                                                                         USE_DOT=True, num_warps=4, num_stages=3))
    if not cfg["USE_DOT"] and cfg["BLOCK_M"] != 1:
        raise ValueError(f"the CUDA-core path (USE_DOT=False) runs one row per program: BLOCK_M must be 1, got {cfg}")
    if cfg["USE_DOT"] and (cfg["BLOCK_M"] < 16 or cfg["BLOCK_K"] < 128):
        raise ValueError(f"tl.dot needs BLOCK_M >= 16 and BLOCK_K >= 128 (16 packed rows), got {cfg}")
    cfg.setdefault("num_warps", 4)
    cfg.setdefault("num_stages", 1 if triton_interpreted() else 3)
    if split_k is None:
        split_k = choose_split_k(m, n, k, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], num_sms(x.device))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split_k)
    _int4_gemm_kernel[grid](*args, **consts, **cfg, SPLIT_K=split_k)
    return y.reshape(*x.shape[:-1], n)
