"""RoPE and the KV-cache store in one launch (chapter 4's fusion, applied between the QKV projection and attention).

Between a layer's QKV projection and its attention a decode step used to launch two tiny kernels per layer:
`rotary_embedding_` (rotate q and k in place) and `store_kvcache` (copy the rotated k and the v into their
cache slots). Each touches a few kilobytes for one token, so each costs what any launch costs, not what its bytes
cost: on the H200 at batch 1 (Llama-3-8B shape, CUDA graphs) 2.2 us and 1.2 us per layer, 106 us of a 4.45 ms
step. Both are per token and need the same rotated k, so one program per token can do both: rotate q in place,
rotate k in place (the prefill path still reads the fresh k), and write that rotated k and the v straight into
the paged cache, quantised on the way for an FP8 cache. vLLM fuses the same pair for the same reason.

The arithmetic is exactly that of the two kernels it replaces (fused.py): rotate-half in fp32 from the fp32
cos|sin table, rounded to k's dtype, then the cache's conversion of that rounded value (x / scale, saturated,
rounded to e4m3 for an FP8 cache). So the fused launch writes the same bits, which the tests check against
the two-launch path.

Qwen3 puts an RMSNorm over head_dim on every query and key head just before RoPE (ModelConfig.qk_norm): two more
tiny launches per layer, on the same per-token rows. With `qk_norm` the program normalises each head in registers
(head_rms_norm: rms_norm_kernel's arithmetic, rounded to the model's dtype as that kernel's output is) before
rotating it, as vLLM's fused q/k-norm + RoPE kernel does: the decode step keeps one launch here per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.fused import (_cos_sin_row, _rotate_heads, _round_to_e4m3, check_rotary_args,
                                   check_store_args, head_rms_norm)
from minillm.kernels.pdl import grid_dependency_sync, launch_options

__all__ = ["rotary_and_store_kvcache_"]


@triton.jit
def _to_cache(x, SCALE, heads, heads_ok, HAS_SCALE: tl.constexpr, FP8: tl.constexpr):
    """A [heads, cols] tile of k or v, already in k's dtype, as the cache stores it (see fused.py's store)."""
    if HAS_SCALE:  # an FP8 cache holds x / scale, one scale per kv head
        x = tl.math.div_rn(x.to(tl.float32), tl.load(SCALE + heads, mask=heads_ok, other=1.0)[:, None])
    if FP8:
        x = _round_to_e4m3(x.to(tl.float32))
    return x


@triton.jit
def _rope_store_kernel(POS, stride_p, Q, K, V, COS_SIN, K_CACHE, V_CACHE, SLOTS, K_SCALE, V_SCALE,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_c, stride_kc, stride_vc,
                       num_heads, num_kv_heads, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                       BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                       HAS_SCALE: tl.constexpr, FP8: tl.constexpr, Q_NORM=None, K_NORM=None, eps=0.0,
                       QK_NORM: tl.constexpr = False, PDL: tl.constexpr = False):
    grid_dependency_sync(PDL)
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin_row(POS, stride_p, COS_SIN, stride_c, token, HALF, BLOCK_HALF)
    cols = tl.arange(0, BLOCK_HALF)
    _rotate_heads(Q, stride_qt, stride_qh, token, num_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF, Q_NORM, eps,
                  QK_NORM)

    # k: rotated in registers, written back in place, and (same registers) into the cache slot
    heads = tl.arange(0, BLOCK_HK)
    heads_ok = heads < num_kv_heads
    ok = heads_ok[:, None] & (cols[None, :] < HALF)
    k1_ptr = K + token * stride_kt + heads[:, None] * stride_kh + cols[None, :]
    k1 = tl.load(k1_ptr, mask=ok, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptr + HALF, mask=ok, other=0.0).to(tl.float32)
    if QK_NORM:
        k1, k2 = head_rms_norm(k1, k2, K_NORM, eps, HALF, BLOCK_HALF, K.dtype.element_ty)
    r1 = (k1 * cos - k2 * sin).to(K.dtype.element_ty)
    r2 = (k2 * cos + k1 * sin).to(K.dtype.element_ty)
    tl.store(k1_ptr, r1, mask=ok)
    tl.store(k1_ptr + HALF, r2, mask=ok)
    slot = tl.load(SLOTS + token)
    if slot >= 0:  # -1: a padding token, or one whose KV is already cached
        cache_cols = heads[:, None] * HEAD_DIM + cols[None, :]  # the cache row [KVH, D] is contiguous
        kc_ptr = K_CACHE + slot * stride_kc + cache_cols
        kc_type = K_CACHE.dtype.element_ty
        tl.store(kc_ptr, _to_cache(r1, K_SCALE, heads, heads_ok, HAS_SCALE, FP8).to(kc_type), mask=ok)
        tl.store(kc_ptr + HALF, _to_cache(r2, K_SCALE, heads, heads_ok, HAS_SCALE, FP8).to(kc_type), mask=ok)
        v_ptr = V + token * stride_vt + heads[:, None] * stride_vh + cols[None, :]
        vc_ptr = V_CACHE + slot * stride_vc + cache_cols
        for h in tl.static_range(2):  # v's two halves, as k's: no rotation, only the store
            v = tl.load(v_ptr + h * HALF, mask=ok, other=0.0)
            v = _to_cache(v, V_SCALE, heads, heads_ok, HAS_SCALE, FP8)
            tl.store(vc_ptr + h * HALF, v.to(V_CACHE.dtype.element_ty), mask=ok)


def rotary_and_store_kvcache_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, k_scale=None, v_scale=None,
                              qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> None:
    """`rotary_embedding_(positions, q, k, cos_sin_cache)` then `store_kvcache(k, v, k_cache, v_cache,
    slot_mapping, k_scale, v_scale)`, in one launch with the same results: q and k rotated in place, the rotated k
    and v written to their slots (slot -1 skips a token). Arguments as those two functions take them (fused.py).
    qk_norm = (q gain [D], k gain [D], eps): each q and k head RMS-normalised before its rotation (Qwen3), as
    rms_norm(q.view(-1, D), q gain, eps) would first, in the same launch (written into q and k in place too)."""
    check_rotary_args(positions, q, k, cos_sin_cache)
    k_scale, v_scale = check_store_args(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    if v.stride(-1) != 1:
        raise ValueError("v must be contiguous in its last dimension")
    num_tokens, num_heads, head_dim = q.shape
    norm = {}
    if qk_norm is not None:
        q_gain, k_gain, eps = qk_norm
        if q_gain.shape != (head_dim,) or k_gain.shape != (head_dim,) or not q_gain.is_contiguous() \
                or not k_gain.is_contiguous():
            raise ValueError(f"qk_norm gains must be contiguous [{head_dim}] tensors (head_dim), got "
                             f"{tuple(q_gain.shape)} and {tuple(k_gain.shape)}")
        norm = dict(Q_NORM=q_gain, K_NORM=k_gain, eps=float(eps), QK_NORM=True)
    if num_tokens == 0:
        return
    half = head_dim // 2
    has_scale = k_scale is not None
    _rope_store_kernel[(num_tokens,)](
        positions, positions.stride(0), q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping,
        k_scale if has_scale else cos_sin_cache, v_scale if has_scale else cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(1), v_cache.stride(1), num_heads, k.shape[1], HEAD_DIM=head_dim, HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]), HAS_SCALE=has_scale,
        FP8=k_cache.dtype == torch.float8_e4m3fn, num_warps=4, **norm, **launch_options(q.device))
