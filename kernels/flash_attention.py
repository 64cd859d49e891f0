"""FlashAttention-2 forward in Triton, for packed variable-length batches (chapter 3).

What the kernel computes: for every sequence b and query head h,
    out = softmax(q k^T * softmax_scale + mask) v
without ever writing the [seqlen_q, seqlen_k] score matrix to memory.

The tiles. One program owns a BLOCK_M x head_dim tile of queries (one head, one sequence) and keeps it in
registers. It walks over the keys and values BLOCK_N rows at a time: S = Q K^T is a BLOCK_M x BLOCK_N tile
(one `tl.dot`), turned into probabilities P, and P V (a second `tl.dot`) is added into an fp32 BLOCK_M x
head_dim accumulator. Each K/V tile is read once per query tile, so memory traffic is O(seqlen^2 / BLOCK_M)
instead of the O(seqlen^2) of a materialised score matrix; the work is all tensor-core matmuls.

Why the online softmax works. softmax needs the row maximum m and the row sum l = sum exp(s - m) of the
*whole* row, but we only see one tile at a time. Keep a running m_i, l_i and an accumulator acc = sum
exp(s - m_i) v. When a new tile raises the maximum to m_new, every earlier term is off by the same factor
alpha = exp(m_i - m_new), so rescaling l_i and acc by alpha makes them exactly what they would have been had
m_new been known from the start. After the last tile, out = acc / l_i, and log-sum-exp = m_i + log(l_i)
(returned as `lse`: it lets two partial attentions be merged later, see paged_attention.py).
We work in base 2: the softmax scale is multiplied by log2(e), so exp(x) becomes exp2(x), one cheap
instruction, and the scaling folds into exp2's argument as one fused multiply-add.

Grid: (query tiles, heads, batch). Grouped-query attention maps query head h to kv head h // (H / KVH):
the K/V of one kv head are simply read by H / KVH programs, never repeated in memory.

Causal masking is bottom-right aligned (the queries are the *last* seqlen_q of the seqlen_k tokens, as in a
chunked prefill or a prefix-cache hit): query j sits at position seqlen_k - seqlen_q + j and sees keys
0..that position. Tiles wholly below the diagonal need no mask and run in a first loop; the loop stops at
the diagonal (tiles above it are skipped: half the work of a prefill), and only the few tiles that the
diagonal or the end of the sequence cut through run the masked second loop.

Practicalities: on a GPU the tile shape is autotuned on the first call for each (head_dim, causal, varlen)
(make that call before capturing a CUDA graph); under the interpreter one small fixed tile is used. fp32
inputs on a GPU go through TF32 tensor cores (about 1e-3 relative error); bf16/fp16 are the GPU dtypes.
Chapter 3's exercises are fenced below: online_softmax_update and causal_block_range (in torch; run by
flash_attention_reference, the kernel's algorithm in torch) and attend_kv_range (the kernel's inner loop).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from minillm.hooks import dispatch
from minillm.kernels.flash_attention_hopper import launch_hopper, use_hopper
from minillm.platform import triton_interpreted

_LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


# >>> exercise ch03.online_softmax_update
def online_softmax_update(m_i: torch.Tensor, l_i: torch.Tensor, acc: torch.Tensor, scores: torch.Tensor,
                          values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold one block of scores into the running softmax state of M query rows; returns (m_new, l_new, acc_new).

    m_i [M]: the largest score seen so far per row (-inf before the first block); l_i [M]: the sum of
    exp(score - m_i) over the scores seen; acc [M, D]: the sum of exp(score - m_i) * value. scores [M, N]: the
    new block's (already scaled) scores, -inf where masked; values [N, D]: its values. When the maximum grows
    to m_new, every earlier term is exp(m_i - m_new) times too big: rescale l_i and acc by that factor, then
    add the new block's exp(scores - m_new). A row whose scores are all -inf so far keeps m = -inf, l = 0,
    acc = 0 (never nan). After the last block, softmax(all scores) @ all values = acc / l. Natural exp, fp32
    math, results in the inputs' dtypes; the inputs are not modified.
    """
    # >>> solution
    m_new = torch.maximum(m_i, scores.max(dim=-1).values)
    # a row that has seen only -inf would compute (-inf) - (-inf) = nan: subtract 0 instead (every term is 0)
    m_safe = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new).float()
    alpha = torch.exp(m_i.float() - m_safe)  # how much too big the old terms are; exp(-inf) = 0 on the first block
    p = torch.exp(scores.float() - m_safe[:, None])
    l_new = l_i.float() * alpha + p.sum(dim=-1)
    acc_new = acc.float() * alpha[:, None] + p @ values.float()
    return m_new, l_new.to(l_i.dtype), acc_new.to(acc.dtype)
    # <<< solution
# <<< exercise


# >>> exercise ch03.causal_block_range
def causal_block_range(m_start: int, block_m: int, q_len: int, k_len: int, block_n: int,
                       causal: bool = True) -> tuple[int, int]:
    """Which keys the query tile of rows m_start .. m_start + block_m - 1 must visit: returns (full_end, hi).

    Keys [0, full_end) are seen by every row of the tile: they need no mask. full_end is the LARGEST multiple
    of block_n such that every existing row of the tile sees all keys below it (so those are whole tiles).
    Keys [full_end, hi) are visited with a mask (the diagonal, or the end of the sequence, cuts through
    them); hi is one past the last key that any row of the tile sees; keys from hi on are skipped. Bottom-right causal alignment: the
    queries are the LAST q_len of the k_len tokens, so query row i sits at position k_len - q_len + i and sees
    keys 0 .. that position. Rows from q_len on do not exist (the last tile may be short). Not causal: every
    key, full_end = k_len rounded down to a multiple of block_n, hi = k_len. Always 0 <= full_end <= hi <= k_len.
    Raises ValueError unless 0 <= m_start < q_len, block_m >= 1, block_n >= 1 and k_len >= 0.
    """
    # >>> solution
    if block_m < 1 or block_n < 1 or k_len < 0 or not 0 <= m_start < q_len:
        raise ValueError(f"need block_m, block_n >= 1, k_len >= 0 and 0 <= m_start < q_len, got m_start={m_start}, "
                         f"block_m={block_m}, q_len={q_len}, k_len={k_len}, block_n={block_n}")
    if causal:
        offset = k_len - q_len  # the position of query row 0
        first_pos = offset + m_start  # the tile's first row sees the fewest keys ...
        last_pos = offset + min(m_start + block_m, q_len) - 1  # ... its last (existing) row the most
        hi = min(k_len, last_pos + 1)
        full_end = min(k_len, first_pos + 1)
    else:
        hi = full_end = k_len
    full_end = max(full_end, 0) // block_n * block_n
    return full_end, max(hi, 0)  # hi < 0: no row of this tile sees any key (k_len < q_len)
    # <<< solution
# <<< exercise


def flash_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                              softmax_scale: float | None = None, block_m: int = 32, block_n: int = 16):
    """The kernel's algorithm in torch, one head: q [Sq, D], k and v [Sk, D] -> (out [Sq, D], lse fp32 [Sq]).

    The same tile walk as _flash_fwd_kernel (chapter 3 runs it step by step): per query tile, the unmasked
    key tiles [0, full_end), then the masked ones [full_end, hi), each folded in by online_softmax_update
    (both pieces through `dispatch`, so a learner's versions can stand in). The Triton kernel does the same
    arithmetic in base 2 (exp2, with log2(e) folded into the scale) and in registers.
    """
    if q.dim() != 2 or k.dim() != 2 or k.shape != v.shape or q.shape[1] != k.shape[1]:
        raise ValueError(f"need q [Sq, D] and k, v [Sk, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    update = dispatch("ch03.online_softmax_update", online_softmax_update)
    block_range = dispatch("ch03.causal_block_range", causal_block_range)
    (q_len, head_dim), k_len = q.shape, k.shape[0]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    out, lse = torch.zeros(q.shape, dtype=torch.float32), torch.full((q_len,), float("-inf"))
    for m_start in range(0, q_len, block_m):
        rows = torch.arange(m_start, min(m_start + block_m, q_len))
        n = len(rows)
        m_i, l_i, acc = torch.full((n,), float("-inf")), torch.zeros(n), torch.zeros(n, head_dim)
        full_end, hi = block_range(m_start, block_m, q_len, k_len, block_n, causal)
        for n_start in range(0, hi, block_n):
            cols = torch.arange(n_start, min(n_start + block_n, hi))
            s = (q[rows].float() @ k[cols].float().T) * scale
            if causal and n_start >= full_end:  # only tiles from full_end on can hold a masked score
                s = s.masked_fill(cols[None, :] > rows[:, None] + (k_len - q_len), float("-inf"))
            m_i, l_i, acc = update(m_i, l_i, acc, s, v[cols].float())
        seen = l_i > 0
        out[rows] = torch.where(seen[:, None], acc / torch.where(seen, l_i, 1.0)[:, None], 0.0)
        lse[rows] = torch.where(seen, m_i + torch.log(torch.where(seen, l_i, 1.0)), float("-inf"))
    return out.to(q.dtype), lse


# >>> exercise ch03.flash_attention_kernel
@triton.jit
def attend_kv_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, k_len, lo, hi, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """The FlashAttention inner loop: fold keys lo .. hi-1 into the running (acc, l_i, m_i); return all three.

    q [BLOCK_M, BLOCK_D]: the query tile (columns >= HEAD_DIM hold 0). Key n of this (sequence, kv head) is at
    k_base + n * stride_kn + d, its value at v_base + n * stride_vn + d, for d < HEAD_DIM. Walk
    start_n = lo, lo + BLOCK_N, ... < hi: load K^T [BLOCK_D, BLOCK_N] and V [BLOCK_N, BLOCK_D], S = tl.dot(q, K^T),
    then the online-softmax update in base 2: m_i is in log2 units and qk_scale already holds
    softmax_scale * log2(e), so p = exp2(S * qk_scale - m_new) and alpha = exp2(m_i - m_new).
    acc [BLOCK_M, BLOCK_D], l_i and m_i [BLOCK_M] are fp32 (m_i starts at -inf, l_i and acc at 0).
    MASKED (constexpr): keys >= k_len must not be loaded (masked loads) and score -inf; with CAUSAL, so do keys
    past the row's position q_pos [BLOCK_M]. A row may then have seen no key yet: keep it at m = -inf, l = 0,
    acc = 0, never nan. Not MASKED: every key of the range is valid for every row, no mask at all.
    BLOCK_D > HEAD_DIM: mask the padded head_dim columns on load. UPCAST: convert the loaded k and v to fp32
    (the interpreter mis-multiplies bf16 operands of tl.dot).
    """
    # >>> solution
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        kv_pos = start_n + offs_n
        # K is read transposed ([head_dim, BLOCK_N]) so that S = Q @ K^T is a plain dot.
        k_ptrs = k_base + kv_pos[None, :] * stride_kn + offs_d[:, None]
        v_ptrs = v_base + kv_pos[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(kv_pos[None, :] < k_len) & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=(kv_pos[:, None] < k_len) & d_ok[None, :], other=0.0)
        elif BLOCK_D == HEAD_DIM:  # the fast path: no predicate at all
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter mis-multiplies bf16 dot operands
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k)  # [BLOCK_M, BLOCK_N] raw scores
        if MASKED:
            keep = kv_pos[None, :] < k_len
            if CAUSAL:
                keep = keep & (kv_pos[None, :] <= q_pos[:, None])
            s = tl.where(keep, s, float("-inf"))
        # running max in log2 units; the scale is applied inside exp2's argument (one fused multiply-add)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED:  # a row may have seen no key yet: keep exp2 away from (-inf) - (-inf) = nan
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i
    # <<< solution


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k"])  # the step's longest lengths: one compile for all
def _flash_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                      stride_qz, stride_qt, stride_qh, stride_kz, stride_kt, stride_kh,
                      stride_vz, stride_vt, stride_vh, stride_oz, stride_ot, stride_oh, stride_lz, stride_lh,
                      seqlen_q, seqlen_k, qk_scale, num_q_per_kv,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                      WRITE_LSE: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    if VARLEN:  # packed sequences: token ranges from the prefix sums
        q_start = tl.load(CU_Q + batch).to(tl.int64)
        q_len = tl.load(CU_Q + batch + 1) - q_start
        k_start = tl.load(CU_K + batch).to(tl.int64)
        k_len = tl.load(CU_K + batch + 1) - k_start
    else:  # fixed-length batch: the batch stride does the work
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    m_start = pid_m * BLOCK_M
    if m_start >= q_len:  # the grid is sized for the longest sequence
        return
    kv_head = head // num_q_per_kv

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + batch * stride_qz + (q_start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + batch * stride_kz + k_start * stride_kt + kv_head * stride_kh
    v_base = V + batch * stride_vz + k_start * stride_vt + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Bottom-right alignment: query row i sits at position (k_len - q_len) + i. The bounds below are
    # causal_block_range(m_start, BLOCK_M, q_len, k_len, BLOCK_N, CAUSAL), computed in registers.
    q_pos = (k_len - q_len) + offs_m
    if CAUSAL:
        first_pos = (k_len - q_len) + m_start
        last_pos = (k_len - q_len) + tl.minimum(m_start + BLOCK_M, q_len) - 1
        hi = tl.minimum(k_len, last_pos + 1)  # keys past the last query's position are never needed
        full_end = tl.minimum(k_len, first_pos + 1)  # keys every row of this tile may see
    else:
        hi = k_len
        full_end = k_len
    full_end = tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = attend_kv_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, k_len,
                                     0, full_end, qk_scale, False, CAUSAL, BLOCK_N, BLOCK_D, HEAD_DIM, UPCAST)
    acc, l_i, m_i = attend_kv_range(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, q_pos, k_len,
                                     full_end, hi, qk_scale, True, CAUSAL, BLOCK_N, BLOCK_D, HEAD_DIM, UPCAST)

    # A row that saw no key (only possible when k_len < q_len) gets out = 0 and lse = -inf.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = O + batch * stride_oz + (q_start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM))
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(LSE + batch * stride_lz + head * stride_lh + q_start + offs_m, lse, mask=offs_m < q_len)


def launch_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                           softmax_scale: float | None = None, block_m: int = 32, block_n: int = 16):
    """Run _flash_fwd_kernel (so attend_kv_range) with one fixed tile, for chapter 3 and its graded tests:
    q [B, H, Sq, D], k, v [B, KVH, Sk, D] -> (out [B, H, Sq, D], lse fp32 [B, H, Sq]). The engine's: flash_attention."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    batch, num_heads, seqlen_q, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, num_heads, seqlen_q, dtype=torch.float32, device=q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    grid = (triton.cdiv(seqlen_q, block_m), num_heads, batch)
    _flash_fwd_kernel[grid](q, k, v, out, lse, q, q, q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2),
                            k.stride(1), v.stride(0), v.stride(2), v.stride(1), out.stride(0), out.stride(2),
                            out.stride(1), lse.stride(0), lse.stride(1), seqlen_q, k.shape[2],
                            scale * 1.4426950408889634, num_heads // k.shape[1], HEAD_DIM=head_dim,
                            BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
                            CAUSAL=bool(causal), VARLEN=False, WRITE_LSE=True,
                            UPCAST=q.dtype != torch.float32 and not q.is_cuda)
    return out, lse
# <<< exercise


# H100 candidates (BLOCK_M, BLOCK_N, num_warps, num_stages); autotune picks per (head_dim, causal, varlen).
_GPU_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 32, 4, 4),
                (64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 4)]
# The interpreter runs one numpy step per tile, so one small config keeps CPU tests quick.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}


def _prune_configs(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    # big tiles with head_dim 256 overflow shared memory; keep them out of the search
    kept = [c for c in configs if block_d < 256 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64]
    return kept or configs


_autotuned_kernel = None


def _kernel_and_grid_kwargs():
    """Return (kernel, extra launch kwargs): autotuned on a GPU, one fixed config under the interpreter."""
    global _autotuned_kernel
    if triton_interpreted():
        return _flash_fwd_kernel, dict(INTERPRETER_CONFIG, num_warps=4, num_stages=1)
    if _autotuned_kernel is None:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in _GPU_CONFIGS]
        _autotuned_kernel = triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "VARLEN"],
                                            prune_configs_by={"early_config_prune": _prune_configs})(_flash_fwd_kernel)
    return _autotuned_kernel, {}


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int) -> None:
    if q.dim() != ndim or k.dim() != ndim or v.dim() != ndim:
        raise ValueError(f"q, k, v must be {ndim}-D, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must match and lie in [1, {MAX_HEAD_DIM}], got q {head_dim}, k {k.shape[-1]}")


BACKENDS = ("auto", "portable", "hopper")


def _launch(q, k, v, out, lse, cu_q, cu_k, strides, seqlen_q, seqlen_k, num_heads, num_kv_heads, batch,
            max_seqlen_q, causal, softmax_scale, varlen, backend="auto", config=None):
    """Pick the kernel and launch it. backend "auto": the portable kernel above, or the Hopper kernel
    (flash_attention_hopper.py: TMA descriptors, pipelined loads, longest tiles first) on an sm_90 GPU when
    flash_attention_hopper.use_hopper says so (off for now: on the H200 it is not yet faster); "portable" /
    "hopper" force one (benchmarks and tests). config = (BLOCK_M, BLOCK_N, num_warps, num_stages[, ...])
    bypasses the autotuner (the Hopper kernel's takes two more entries: see launch_hopper)."""
    head_dim = q.shape[-1]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if config is not None and (len(config) < 4 or any(int(c) < 1 for c in config[:4])):
        raise ValueError(f"config must start (BLOCK_M, BLOCK_N, num_warps, num_stages), all >= 1, got {config}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if not scale > 0:  # the running max is taken before scaling, which needs a positive scale
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    upcast = triton_interpreted() and q.dtype != torch.float32
    if backend == "hopper" or (backend == "auto" and not triton_interpreted()
                               and use_hopper(q, k, v, out, strides, max_seqlen_q)):
        launch_hopper(q, k, v, out, lse, cu_q, cu_k, strides, seqlen_q, seqlen_k, num_heads, num_kv_heads, batch,
                      max_seqlen_q, causal, scale * _LOG2E, varlen, config=config, upcast=upcast)
        return
    if config is not None:
        if len(config) != 4:
            raise ValueError(f"the portable kernel's config is (BLOCK_M, BLOCK_N, num_warps, num_stages), got {config}")
        kernel = _flash_fwd_kernel
        extra = dict(BLOCK_M=config[0], BLOCK_N=config[1], num_warps=config[2], num_stages=config[3])
    else:
        kernel, extra = _kernel_and_grid_kwargs()

    def grid(meta):
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), num_heads, batch)

    kernel[grid](q, k, v, out, lse if lse is not None else out, cu_q, cu_k, *strides, seqlen_q, seqlen_k,
                 scale * _LOG2E, num_heads // num_kv_heads,
                 HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=bool(causal),
                 VARLEN=varlen, WRITE_LSE=lse is not None, UPCAST=upcast, **extra)


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                      softmax_scale: float | None = None, return_lse: bool = False, backend: str = "auto",
                      config: tuple[int, int, int, int] | None = None):
    """Attention over packed sequences: q [T, H, D], k and v [Tk, KVH, D] -> out [T, H, D] (, lse fp32 [H, T]).

    Sequence b owns queries q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] and keys k[cu_seqlens_k[b]:cu_seqlens_k[b+1]]
    (int32 prefix sums, B+1 entries). `max_seqlen_q` sizes the grid and must be >= every query length.
    With causal=True and seqlen_k > seqlen_q the mask is bottom-right aligned (the queries are the last
    tokens). `lse[h, t]` is the natural-log log-sum-exp of query t's scaled scores (-inf if it saw no key).
    backend ("auto", "portable", "hopper") and config (BLOCK_M, BLOCK_N, num_warps, num_stages): see _launch.
    """
    _check_qkv(q, k, v, 3)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of B+1 >= 2 entries, got {cu.dtype} {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k {cu_seqlens_k.numel()}")
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        raise ValueError(f"max_seqlen_q/k must be >= 0, got {max_seqlen_q}, {max_seqlen_k}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    total_q, num_heads, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(num_heads, total_q, dtype=torch.float32, device=q.device) if return_lse else None
    if total_q > 0 and max_seqlen_q > 0:
        strides = (0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1),
                   0, out.stride(0), out.stride(1), 0, total_q)
        _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, strides, 0, 0, num_heads, k.shape[1],
                cu_seqlens_q.numel() - 1, max_seqlen_q, causal, softmax_scale, varlen=True, backend=backend,
                config=config)
    return (out, lse) if return_lse else out


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, return_lse: bool = False, backend: str = "auto",
                    config: tuple[int, int, int, int] | None = None):
    """Fixed-length batches in SDPA's layout: q [B, H, Sq, D], k and v [B, KVH, Sk, D] -> out [B, H, Sq, D]
    (, lse fp32 [B, H, Sq]). No copies: the kernel reads the tensors through their strides.
    backend ("auto", "portable", "hopper") and config (BLOCK_M, BLOCK_N, num_warps, num_stages): see _launch."""
    _check_qkv(q, k, v, 4)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, num_heads, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    if k.shape[0] != batch:
        raise ValueError(f"q has batch {batch} but k has {k.shape[0]}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, num_heads, seqlen_q, dtype=torch.float32, device=q.device) if return_lse else None
    if out.numel() > 0:
        strides = (q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
                   v.stride(0), v.stride(2), v.stride(1), out.stride(0), out.stride(2), out.stride(1),
                   lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0)
        _launch(q, k, v, out, lse, q, q, strides, seqlen_q, seqlen_k, num_heads, k.shape[1], batch,
                seqlen_q, causal, softmax_scale, varlen=False, backend=backend, config=config)
    return (out, lse) if return_lse else out
