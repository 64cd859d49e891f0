"""FlashAttention forward for Hopper (sm_90): the chapter 3 kernel rebuilt around the Tensor Memory Accelerator.

flash_attention.py holds the portable FlashAttention-2 kernel (any GPU, and the interpreter); this file holds
the same algorithm in the shape Hopper wants. flash_attention.py runs it with backend="hopper", and by default on
capability (9, 0) once AUTO_DISPATCH is on (it is off: see there for the H200 measurement). The arithmetic is
unchanged (online softmax in base 2, bottom-right causal alignment, grouped-query heads, packed variable-length
sequences, the same out and lse); what changes is how the tiles move:

* TMA tensor descriptors (FlashAttention-3, Shah et al. 2024, section 3.1). Each program builds, on the
  device, one 2-D descriptor per operand for *its own* (sequence, head): base = the first token of the
  sequence, shape = [seq_len, head_dim], strides = [token stride, 1]. A descriptor load is then one TMA
  instruction that copies a whole [BLOCK_N, head_dim] tile into shared memory with no address arithmetic in
  the threads, and rows past seq_len come back as zeros (the hardware checks the bounds we gave it, so a
  packed batch never leaks into its neighbour). Stores through the O descriptor are clipped the same way.
* Software pipelining. The key/value loop runs over `tl.range`, which Triton pipelines num_stages deep:
  while the tensor cores work on tile j, the TMA engine is already fetching tiles j+1 .. j+num_stages-1
  into a ring of shared-memory buffers (the producer/consumer overlap FA3 gets from warp specialisation;
  Triton's pipeliner gets most of it with asynchronous copies and barriers). Explicit warp specialisation
  (`tl.range(..., warp_specialize=True)`) is accepted by triton 3.6 and 3.9 but, compiled for sm_90, leaves
  this kernel unchanged (no producer warps, no setmaxnreg in the PTX): it is a Blackwell feature there.
* BLOCK_M = 128 with 8 warps (or 256 with 16): two (four) warpgroups, each issuing its own 64-row wgmma, so
  one group's softmax can overlap another's matmul (the idea behind FA3's ping-pong schedule, left to the warp
  schedulers here: the groups drift apart because they share the tensor cores).
* Exponentials off the special-function unit (EXP2_FMA, a tuning switch): half of each tile's exp2 run as a
  cubic polynomial on the FMA units (FlashAttention-4's trick), since on Hopper the 16 exp2 per clock per SM,
  not the tensor cores, can pace the softmax. What Triton 3.6 cannot give us is FA3's overlap of one tile's
  softmax with the next tile's Q K^T inside a warpgroup: issuing that dot early, the compiler still waits on
  it at once (wgmma.wait_group 0 right after the issue, seen in the PTX), so the variant is not kept.
* Longest tiles first. In a causal prefill the query tile m visits about m key tiles, so the tiles at
  the end of the sequence are the long jobs. The grid is (batch * heads, query tiles) and the tile index is
  read backwards, so the first wave of programs takes the longest tiles of every head and the short ones
  fill the gaps at the end (longest-processing-time-first scheduling, as FA3's LPT tile scheduler does).
  Heads vary fastest, so the query heads sharing one kv head run side by side and read its K/V from L2.

What stays from chapter 3: the unmasked tiles wholly below the diagonal run a loop without any mask, the
one or two tiles the diagonal (or the end of the sequence) cuts through run a second, masked loop, and the
tiles above the diagonal are never visited. Requirements for this path (checked by `hopper_supported`):
head_dim 64 or 128 (the tuned sizes; any power of two in [16, 256] when forced with backend="hopper"), bf16 or
fp16, 16-byte aligned base pointers and strides (TMA's rule).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _exp2_fma(x):
    """2^x for x <= 0 on the FMA pipe instead of the special-function unit (FlashAttention-4's trick).

    Rounding x to an integer n (adding 1.5 * 2^23 leaves n in the low mantissa bits), 2^x = 2^n * 2^f with
    f = x - n in [-0.5, 0.5]; 2^f is a cubic (least-squares fit on Chebyshev nodes, relative error 7.7e-5,
    below bf16's 3.9e-3 that P is rounded to anyway), and 2^n is added straight into the exponent bits.
    x is clamped at -126 (2^-126 ~ 1e-38 stands in for anything smaller), so never pass -inf."""
    x = tl.maximum(x, -126.0)
    n = x + 12582912.0
    f = x - (n - 12582912.0)
    p = 0.0550886838075093 * f + 0.2426040514594784
    p = p * f + 0.6932762416819616
    p = p * f + 0.9999289403695111
    bits = p.to(tl.int32, bitcast=True) + (n.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k_desc, v_desc, q_pos, k_len, lo, hi, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr, EXP2_FMA: tl.constexpr):
    """Fold key tiles lo, lo + BLOCK_N, ... < hi into (acc, l_i, m_i): chapter 3's attend_kv_range, with the
    K and V tiles fetched by TMA. Rows of K/V past k_len arrive as zeros; MASKED scores them -inf.
    EXP2_FMA (unmasked tiles only): the odd columns' exp2 run as a polynomial on the FMA units while the
    even columns' use the special-function unit, which on Hopper computes 16 exp2 per clock per SM against
    about 1,000 matmul FLOPs per clock: with head_dim 64 or 128 the exponentials, not the matmuls, can set
    the pace of the softmax step (FlashAttention-3, section 3.2; FlashAttention-4 splits them the same way)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = k_desc.load([start_n, 0])  # [BLOCK_N, HEAD_DIM], one TMA copy
        if UPCAST:  # the interpreter mis-multiplies bf16 dot operands
            k = k.to(tl.float32)
        s = tl.dot(q, k.T)  # wgmma reads K^T straight from shared memory
        if MASKED:
            kv_pos = start_n + offs_n
            keep = kv_pos[None, :] < k_len
            if CAUSAL:
                keep = keep & (kv_pos[None, :] <= q_pos[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units: qk_scale holds log2(e) / sqrt(d)
        if MASKED:  # a row that has seen no key yet must not compute (-inf) - (-inf)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        x = s * qk_scale - m_new[:, None]  # the scale folds into one fused multiply-add
        if EXP2_FMA and not MASKED:  # adjacent columns sit in one thread's registers: the split is free
            x_even, x_odd = x.reshape([BLOCK_M, BLOCK_N // 2, 2]).split()
            p = tl.join(tl.exp2(x_even), _exp2_fma(x_odd)).reshape([BLOCK_M, BLOCK_N])
        else:
            p = tl.exp2(x)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([start_n, 0])
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_hopper_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                             stride_qz, stride_qt, stride_qh, stride_kz, stride_kt, stride_kh,
                             stride_vz, stride_vt, stride_vh, stride_oz, stride_ot, stride_oh, stride_lz, stride_lh,
                             seqlen_q, seqlen_k, qk_scale, num_q_per_kv, num_heads, seqlen_bucket,
                             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             CAUSAL: tl.constexpr, VARLEN: tl.constexpr, WRITE_LSE: tl.constexpr,
                             UPCAST: tl.constexpr, EXP2_FMA: tl.constexpr):
    pid_bh = tl.program_id(0)
    head = pid_bh % num_heads
    batch = (pid_bh // num_heads).to(tl.int64)
    # longest query tiles first (in a causal prefill the last tiles see the most keys)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        pid_m = tl.program_id(1)
    if VARLEN:
        q_start = tl.load(CU_Q + batch)
        q_len = tl.load(CU_Q + batch + 1) - q_start  # int32: TMA coordinates are 32-bit
        k_start = tl.load(CU_K + batch)
        k_len = tl.load(CU_K + batch + 1) - k_start
        q_start = q_start.to(tl.int64)  # offsets in elements may pass 2^31
        k_start = k_start.to(tl.int64)
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:  # the grid is sized for the longest sequence
        return
    kv_head = head // num_q_per_kv

    # One descriptor per operand for this (sequence, head): TMA checks its bounds, so the tiles of a packed
    # batch stop at the sequence's end (loads read zeros past it, stores drop the rows).
    q_desc = tl.make_tensor_descriptor(Q + batch * stride_qz + q_start * stride_qt + head * stride_qh,
                                       shape=[q_len, HEAD_DIM], strides=[stride_qt, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + batch * stride_kz + k_start * stride_kt + kv_head * stride_kh,
                                       shape=[k_len, HEAD_DIM], strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + batch * stride_vz + k_start * stride_vt + kv_head * stride_vh,
                                       shape=[k_len, HEAD_DIM], strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(O + batch * stride_oz + q_start * stride_ot + head * stride_oh,
                                       shape=[q_len, HEAD_DIM], strides=[stride_ot, 1], block_shape=[BLOCK_M, HEAD_DIM])
    q = q_desc.load([m_start, 0])
    if UPCAST:
        q = q.to(tl.float32)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    q_pos = (k_len - q_len) + offs_m  # bottom-right alignment: the queries are the last q_len tokens
    if CAUSAL:
        hi = tl.minimum(k_len, (k_len - q_len) + tl.minimum(m_start + BLOCK_M, q_len))
        full_end = tl.minimum(k_len, (k_len - q_len) + m_start + 1)
    else:
        hi = k_len
        full_end = k_len
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_desc, v_desc, q_pos, k_len, 0, full_end, qk_scale,
                                  False, CAUSAL, BLOCK_M, BLOCK_N, UPCAST, EXP2_FMA)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_desc, v_desc, q_pos, k_len, full_end, hi, qk_scale,
                                  True, CAUSAL, BLOCK_M, BLOCK_N, UPCAST, False)

    empty = l_i == 0.0  # a row that saw no key (k_len < q_len): out = 0, lse = -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_desc.store([m_start, 0], out.to(O.dtype.element_ty))
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(LSE + batch * stride_lz + head * stride_lh + q_start + offs_m, lse, mask=offs_m < q_len)


# ----------------------------------------------------------------------------------------------------- host side
HOPPER_CAPABILITY = (9, 0)
# Whether backend="auto" takes this kernel on sm_90. Off: measured on the H200 (2026-12-02, triton 3.6, causal bf16,
# 32 query heads, GQA 4:1 and 8:1, 32k tokens, the autotuner's pick (128, 64, 8, 3)), it ran at 0.64-0.79x of
# SDPA (cuDNN, 552-597 TFLOP/s) for d128 and 0.75-0.90x for d64: 360-467 TFLOP/s at d128, no faster than the
# portable kernel (401 / 452 / 468 TFLOP/s at 2k / 8k / 16k) and slowest at 2k, where each program is short and
# building four descriptors per program (a global-memory write and a proxy fence each) weighs most. Opt in with
# backend="hopper"; turn this on once benchmarks/sweep_flash_attention.py shows a config that wins.
AUTO_DISPATCH = False
HOPPER_HEAD_DIMS = (64, 128)  # the head sizes with tuned tiles; others take the portable kernel
# (BLOCK_M, BLOCK_N, num_warps, num_stages, EXP2_FMA, MAXNREG). MAXNREG > 0 caps the registers per thread (0: the
# compiler's choice): at 128, two 8-warp programs fit on one SM (65,536 registers) and overlap each other's softmax
# and matmuls. SWEEP_CONFIGS is what benchmarks/sweep_flash_attention.py times on the H200; AUTOTUNE_CONFIGS, the
# short list the autotuner tries on the first call for each length class (each config costs one compile).
SWEEP_CONFIGS = {
    d: [(bm, bn, w, s, 0, 0) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)
        if not (bm == 64 and w == 8)  # a 64-row tile is one warpgroup's wgmma: 8 warps would split N
        and not (bm == 128 and w == 4 and d == 128)]  # one warpgroup, 128 x 128 fp32 accumulator: spills
    + [(128, bn, 8, s, 1, 0) for bn in (64, 128) for s in (2, 3)]
    + [(64, bn, 4, s, 1, 0) for bn in (64, 128) for s in (2, 3)]
    # four warpgroups of 64 rows: while some wait on the tensor cores the others can run their softmax
    + [(256, 64, 16, 2, 0, 0), (256, 64, 16, 3, 0, 0), (256, 64, 16, 2, 1, 0)]
    + ([(256, 128, 16, 2, 0, 0)] if d == 64 else [])
    # two programs per SM (no spills at 128 registers with triton 3.6, checked by compiling for sm_90)
    + [(128, 64 if d == 128 else 128, 8, 2, e, 128) for e in (0, 1)]
    for d in HOPPER_HEAD_DIMS}
AUTOTUNE_CONFIGS = {
    64: [(128, 64, 8, 3, 0, 0), (128, 128, 8, 3, 0, 0), (128, 128, 8, 2, 1, 128), (256, 64, 16, 2, 0, 0),
         (64, 128, 4, 3, 1, 0)],
    128: [(128, 64, 8, 3, 0, 0), (128, 128, 8, 2, 0, 0), (128, 64, 8, 2, 1, 128), (256, 64, 16, 2, 0, 0),
          (64, 64, 4, 3, 0, 0)],
}
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one H100/H200 thread block may use


def shared_memory_bytes(config: tuple[int, ...], head_dim: int, elem_size: int = 2) -> int:
    """Shared memory a config needs: the Q tile and a ring of num_stages K and V tiles (the O tile reuses
    that space on the way out), plus its barriers. Matches what triton 3.6 allocates for sm_90."""
    block_m, block_n, _, num_stages = config[:4]
    return (block_m + 2 * num_stages * block_n) * head_dim * elem_size + 1024


def valid_configs(head_dim: int, configs=None) -> list[tuple[int, ...]]:
    """The configs for head_dim (default: the sweep's) that fit in shared memory."""
    configs = SWEEP_CONFIGS[head_dim] if configs is None else configs
    return [c for c in configs if shared_memory_bytes(c, head_dim) <= SMEM_LIMIT]


_capability_cache: dict[int, tuple[int, int]] = {}


def is_hopper(device: torch.device) -> bool:
    """True on an sm_90 GPU (H100, H200, H20): the devices this kernel is written and tuned for."""
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capability_cache:
        _capability_cache[index] = torch.cuda.get_device_capability(index)
    return _capability_cache[index] == HOPPER_CAPABILITY


def tma_compatible(*tensors: torch.Tensor, strides: tuple[int, ...] = ()) -> bool:
    """TMA's rules for every descriptor we build: 16-byte aligned base pointers, 16-byte multiples for the
    strides of the outer dimensions (the innermost stride is 1, checked by the caller)."""
    elem = tensors[0].element_size()
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(s * elem % 16 == 0 for s in strides)


def hopper_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     strides: tuple[int, ...], max_seqlen_q: int) -> bool:
    """Whether this call can take the Hopper kernel (else the portable one): sm_90, bf16/fp16, a tuned head
    size, TMA-compatible layout, and few enough query tiles for the grid's second axis (65535)."""
    return (is_hopper(q.device) and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[-1] in HOPPER_HEAD_DIMS and triton.cdiv(max_seqlen_q, 64) <= 65535
            and tma_compatible(q, k, v, out, strides=strides[:12]))


def use_hopper(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, strides: tuple[int, ...],
               max_seqlen_q: int) -> bool:
    """backend="auto"'s choice: this kernel when AUTO_DISPATCH is on and the call suits it."""
    return AUTO_DISPATCH and hopper_supported(q, k, v, out, strides, max_seqlen_q)


def _tma_scratch(device: torch.device):
    """Triton's allocator hook: device-side descriptors live in a small global-memory workspace
    (128 bytes per descriptor per program) that the launch asks for; torch's caching allocator serves it."""
    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)
    return alloc


_autotuned: dict[int, object] = {}


def seqlen_bucket(max_seqlen_q: int) -> int:
    """The autotuner's length class: the power of two >= max_seqlen_q, clamped to [1024, 16384] (five classes,
    each tuned once; all multiples of 16, so they share one compiled binary per config)."""
    return min(max(triton.next_power_of_2(max(max_seqlen_q, 1)), 1024), 16384)


def _autotuned_kernel(head_dim: int):
    if head_dim not in _autotuned:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "EXP2_FMA": bool(e)}, num_warps=w, num_stages=s,
                                 maxnreg=r or None)
                   for m, n, w, s, e, r in valid_configs(head_dim, AUTOTUNE_CONFIGS[head_dim])]
        # seqlen_bucket is not read by the kernel: keyed on, it gives short and long prefills their own tiles
        _autotuned[head_dim] = triton.autotune(configs, key=["CAUSAL", "VARLEN", "seqlen_bucket"])(
            _flash_fwd_hopper_kernel)
    return _autotuned[head_dim]


def launch_hopper(q, k, v, out, lse, cu_q, cu_k, strides, seqlen_q, seqlen_k, num_heads, num_kv_heads, batch,
                  max_seqlen_q, causal, qk_scale, varlen, config=None, upcast=False):
    """Launch the Hopper kernel with the arguments flash_attention._launch prepared (strides in the order
    (q z, t, h), (k z, t, h), (v z, t, h), (o z, t, h), (lse z, h)). config = (BLOCK_M, BLOCK_N, num_warps,
    num_stages[, EXP2_FMA 0/1[, MAXNREG, 0 = no cap]]) bypasses the autotuner (the sweep benchmark and the
    interpreter tests use it)."""
    head_dim = q.shape[-1]
    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise ValueError(f"the Hopper kernel needs head_dim a power of two in [16, 256], got {head_dim}")
    triton.set_allocator(_tma_scratch(q.device))  # a ContextVar: set it for this thread, on every launch
    if config is not None:
        if len(config) > 6 or (tuple(config) + (0, 0))[4] not in (0, 1) or (tuple(config) + (0, 0))[5] < 0:
            raise ValueError(f"a Hopper config is (BLOCK_M, BLOCK_N, num_warps, num_stages[, EXP2_FMA 0/1[, MAXNREG "
                             f">= 0]]), got {config}")
        block_m, block_n, num_warps, num_stages, exp2_fma, maxnreg = (tuple(config) + (0, 0))[:6]
        kernel = _flash_fwd_hopper_kernel
        extra = dict(BLOCK_M=block_m, BLOCK_N=block_n, EXP2_FMA=bool(exp2_fma), num_warps=num_warps,
                     num_stages=num_stages)
        if maxnreg:
            extra["maxnreg"] = maxnreg
    else:
        if head_dim not in AUTOTUNE_CONFIGS:
            raise ValueError(f"no autotune configs for head_dim {head_dim}; tuned: {sorted(AUTOTUNE_CONFIGS)}")
        kernel, extra = _autotuned_kernel(head_dim), {}

    def grid(meta):  # heads vary fastest (L2 reuse of shared K/V), query tiles slowest (longest first)
        return (batch * num_heads, triton.cdiv(max_seqlen_q, meta["BLOCK_M"]))

    kernel[grid](q, k, v, out, lse if lse is not None else out, cu_q, cu_k, *strides, seqlen_q, seqlen_k,
                 qk_scale, num_heads // num_kv_heads, num_heads, seqlen_bucket(max_seqlen_q), HEAD_DIM=head_dim,
                 CAUSAL=bool(causal), VARLEN=varlen, WRITE_LSE=lse is not None, UPCAST=upcast, **extra)
