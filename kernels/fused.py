"""Small fused kernels around attention and the MLP (chapters 1, 2 and 4).

Each of these does a handful of arithmetic per byte it touches, so its speed is set by memory bandwidth
alone. The only way to make them faster is to touch memory fewer times, which is what "fused" means: one
pass that reads each input once and writes each output once, with the intermediate values kept in
registers. Each program handles one token (one row), so the grid is simply the number of tokens.

* rms_norm: the residual add that precedes every norm of a Llama block is fused in (read x and residual,
  write the new residual and the output: 4 row transfers instead of the 5 of an add, then a norm).
* rotary_embedding_: RoPE on q and k in place, all heads of a token in one program, cos/sin read once.
* silu_and_mul: the SwiGLU gate, silu(gate) * up, without materialising silu(gate).
* store_kvcache: scatter the new tokens' keys and values into their slots of the paged KV cache; for an FP8
  cache it also quantises them (divide by the scale, saturate at +-448, round to e4m3) in the same pass.
All compute in fp32 and store in the output's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.pdl import grid_dependency_sync, launch_options


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 1 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be at least 1-D and contiguous in its last dimension, got {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------------- rms_norm
# >>> exercise ch04.rms_norm_kernel
@triton.jit
def rms_norm_kernel(X, RES, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row (tl.program_id(0)): OUT[row] = h / sqrt(mean(h^2) + eps) * W, all in one pass.

    Row r of X starts at X + r * stride_x (likewise RES, OUT, RES_OUT); its n_cols values are contiguous;
    BLOCK is the power of two >= n_cols (mask the columns past n_cols: they must not count in the mean).
    h = x, or with HAS_RESIDUAL h = x + RES[row], rounded to RES_OUT's dtype (as an unfused add would) and
    stored into RES_OUT[row] (the new residual stream). Compute in fp32; store OUT in its own dtype
    (`.to(OUT.dtype.element_ty)`). W has n_cols entries.
    """
    # >>> solution
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 on big batches
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(RES + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        # round the sum to the model's dtype, as an unfused `hidden = hidden + residual` would
        x = x.to(RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=ok)
        x = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)  # masked columns loaded as 0: they add nothing
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (x * inv_rms * w).to(OUT.dtype.element_ty), mask=ok)
    # <<< solution


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = h / sqrt(mean(h^2) + eps) * weight over the last dim, with h = x (+ residual).

    Returns y, or (y, h) when `residual` is given (h is the new residual stream, in x's dtype).
    The launcher of rms_norm_kernel: one program per row of x viewed as [rows, hidden].
    """
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape ({hidden},), got {tuple(weight.shape)}")
    if hidden > 65536:
        raise ValueError(f"rms_norm supports hidden sizes up to 65536, got {hidden}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")
    x2 = x.reshape(-1, hidden)
    out = torch.empty_like(x2)
    res2 = residual.reshape(-1, hidden) if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else out
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        rms_norm_kernel[(x2.shape[0],)](x2, res2, weight, out, res_out, x2.stride(0), res2.stride(0),
                                        out.stride(0), res_out.stride(0), hidden, eps,
                                        HAS_RESIDUAL=residual is not None, BLOCK=block,
                                        num_warps=min(16, max(1, block // 256)))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))
# <<< exercise


# ------------------------------------------------------------------------------------------------- RoPE
@triton.jit
def head_rms_norm(x1, x2, W, eps, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, dtype: tl.constexpr):
    """Qwen3's q/k norm of [heads, HALF] first and second halves (fp32) of heads of 2 * HALF values: each head
    over its own 2 * HALF values as rms_norm_kernel computes a row, x / sqrt(mean(x^2) + eps) * W, rounded to
    `dtype` as that kernel's output would be (padding columns are zeros: they add nothing to the sums)."""
    cols = tl.arange(0, BLOCK_HALF)
    inv_rms = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(W + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    return (x1 * inv_rms * w1).to(dtype).to(tl.float32), (x2 * inv_rms * w2).to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(X, stride_t, stride_h, token, num_heads, cos, sin, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM_W=None, eps=0.0, NORM: tl.constexpr = False):
    """Rotate-half RoPE of one token's heads of X in place; NORM: each head RMS-normalised first (head_rms_norm,
    Qwen3's q/k norm with gain NORM_W), so that norm and rotation are one pass."""
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    ok = (heads[:, None] < num_heads) & (cols[None, :] < HALF)
    ptr1 = X + token * stride_t + heads[:, None] * stride_h + cols[None, :]  # first half  x1
    ptr2 = ptr1 + HALF  # second half x2
    x1 = tl.load(ptr1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(ptr2, mask=ok, other=0.0).to(tl.float32)
    if NORM:
        x1, x2 = head_rms_norm(x1, x2, NORM_W, eps, HALF, BLOCK_HALF, X.dtype.element_ty)
    # rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), a 2-D rotation of each pair (x1_i, x2_i)
    tl.store(ptr1, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=ok)
    tl.store(ptr2, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=ok)


@triton.jit
def _cos_sin_row(POS, stride_p, COS_SIN, stride_c, token, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos and sin [1, BLOCK_HALF], fp32, of the token's position: its row of the cos|sin table."""
    pos = tl.load(POS + token * stride_p).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cos = tl.load(COS_SIN + pos * stride_c + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(COS_SIN + pos * stride_c + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotary_kernel(POS, stride_p, Q, K, COS_SIN, stride_qt, stride_qh, stride_kt, stride_kh, stride_c,
                   num_heads, num_kv_heads, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                   BLOCK_HK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin_row(POS, stride_p, COS_SIN, stride_c, token, HALF, BLOCK_HALF)
    _rotate_heads(Q, stride_qt, stride_qh, token, num_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, stride_kt, stride_kh, token, num_kv_heads, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def check_rotary_args(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """The shapes rotary_embedding_ (and rope_store.py's fused launch) accept, with a clear error otherwise."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"need q [T, H, D] and k [T, KVH, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    num_tokens, head_dim = q.shape[0], q.shape[2]
    if head_dim % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"need an even head_dim and cos_sin_cache [max_pos, {head_dim}], got head_dim "
                         f"{head_dim}, cache {tuple(cos_sin_cache.shape)}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must have shape ({num_tokens},), got {tuple(positions.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache must be contiguous in their last dimension (rotated in place)")


def rotary_embedding_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      cos_sin_cache: torch.Tensor) -> None:
    """Apply rotate-half RoPE in place to q [T, H, D] and k [T, KVH, D] at `positions` [T].

    cos_sin_cache [max_pos, D]: row p holds cos(p * theta_i) in its first D/2 entries and sin in the rest.
    Positions must lie in [0, max_pos) (not checked on the device, to avoid a sync). They may be any 1-D view:
    the kernel reads them with their stride (an expanded [1, n] -> [n] view has stride 0; reading it as
    contiguous walked past its one element, and the garbage "positions" indexed far outside the cos/sin table:
    an illegal memory access on the H200 in EAGLE's tree search, found with compute-sanitizer).
    """
    check_rotary_args(positions, q, k, cos_sin_cache)
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](positions, positions.stride(0), q, k, cos_sin_cache, q.stride(0), q.stride(1),
                                  k.stride(0), k.stride(1), cos_sin_cache.stride(0), num_heads, k.shape[1], HALF=half,
                                  BLOCK_HALF=triton.next_power_of_2(half),
                                  BLOCK_HQ=triton.next_power_of_2(num_heads),
                                  BLOCK_HK=triton.next_power_of_2(k.shape[1]), num_warps=4)


# ----------------------------------------------------------------------------------------- silu_and_mul
@triton.jit
def _silu_and_mul_kernel(X, OUT, stride_x, stride_o, inter, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    grid_dependency_sync(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    gate = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + inter + cols, mask=ok, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))  # gate * sigmoid(gate)
    tl.store(OUT + row * stride_o + cols, (silu * up).to(OUT.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] = [gate | up] -> silu(gate) * up, [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"the last dimension of x must be even (gate | up), got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    x2 = _rows(x, "x")
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out, x2.stride(0), out.stride(0), inter,
                                                                       BLOCK=block, num_warps=4,
                                                                       **launch_options(x.device))
    return out.view(*x.shape[:-1], inter)


# ---------------------------------------------------------------------------------------- store_kvcache
@triton.jit
def _round_to_e4m3(x):
    """fp32 x -> the float8_e4m3fn value nearest to it (ties to even), saturated at +-448, still in fp32.

    Rounding here, in fp32 arithmetic, makes the cast that follows exact: the same bytes on a GPU (whose cast
    would round correctly anyway) and in Triton's CPU interpreter (whose fp8 down-cast drops the carry when
    rounding up crosses a power of two: 31.9 became 16, not 32). e4m3 numbers near |x| = 2^e * 1.m are spaced
    2^(e - 3) apart (3 mantissa bits), and never closer than 2^-9 (subnormals below 2^-6). Adding
    1.5 * 2^23 * spacing to |x| leaves an fp32 sum whose last bit is worth exactly that spacing, so the add
    itself rounds |x| to the grid, to nearest-even; subtracting it back is exact."""
    ax = tl.minimum(tl.abs(x), 448.0)  # the largest finite e4m3fn (the "fn" format has no infinity)
    exponent = (ax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased by 127
    spacing = ((tl.maximum(exponent, 127 - 6) - 3) << 23).to(tl.float32, bitcast=True)  # 2^(max(e, -6) - 3)
    magic = spacing * 12582912.0  # 1.5 * 2^23, times a power of two: exact
    rounded = (ax + magic) - magic
    # x's sign bit onto the rounded magnitude, as a bit operation: a small negative that rounds to zero must give
    # -0.0, as torch's cast does, and `-rounded` would not on a GPU (Triton lowers negation to 0 - rounded, and
    # 0.0 - 0.0 is +0.0; the interpreter's numpy negation keeps the sign, which hid this on CPU)
    sign = x.to(tl.int32, bitcast=True) & -2147483648  # 0x80000000
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _store_kvcache_kernel(K, V, K_CACHE, V_CACHE, SLOTS, K_SCALE, V_SCALE, stride_k, stride_v, stride_kc,
                          stride_vc, ROW: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                          HAS_SCALE: tl.constexpr, FP8: tl.constexpr = False):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + token)
    if slot < 0:  # a padded token, or one whose KV is already cached: nothing to write
        return
    cols = tl.arange(0, BLOCK)  # one token's KVH * D values, contiguous in both source and cache
    ok = cols < ROW
    k = tl.load(K + token * stride_k + cols, mask=ok)
    v = tl.load(V + token * stride_v + cols, mask=ok)
    if HAS_SCALE:  # quantise for an FP8 cache: x_q = x / scale, one scale per kv head (cols // HEAD_DIM)
        # div_rn: the correctly rounded quotient, as torch's quantize_kv computes it (plain `/` may be approximate)
        k = tl.math.div_rn(k.to(tl.float32), tl.load(K_SCALE + cols // HEAD_DIM, mask=ok, other=1.0))
        v = tl.math.div_rn(v.to(tl.float32), tl.load(V_SCALE + cols // HEAD_DIM, mask=ok, other=1.0))
    if FP8:  # saturate and round in registers: the store's cast is then exact (see _round_to_e4m3)
        k = _round_to_e4m3(k.to(tl.float32))
        v = _round_to_e4m3(v.to(tl.float32))
    tl.store(K_CACHE + slot * stride_kc + cols, k.to(K_CACHE.dtype.element_ty), mask=ok)
    tl.store(V_CACHE + slot * stride_vc + cols, v.to(V_CACHE.dtype.element_ty), mask=ok)


def check_store_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale=None, v_scale=None):
    """The arguments store_kvcache (and rope_store.py's fused launch) accept, with a clear error otherwise;
    returns the FP8 scales as fp32 [KVH] tensors, or (None, None) for a cache of k's own type."""
    if k.dim() != 3 or k.shape != v.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"need k, v [T, KVH, D] and caches [num_blocks, block_size, KVH, D], got k {tuple(k.shape)}"
                         f", v {tuple(v.shape)}, caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"cache [.., KVH, D] = {tuple(k_cache.shape[2:])} does not match k's {tuple(k.shape[1:])}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("give both k_scale and v_scale, or neither")
    if k_scale is not None:
        k_scale, v_scale = (per_head_scale(sc, k.shape[1], k.device, name)
                            for sc, name in ((k_scale, "k_scale"), (v_scale, "v_scale")))
    return k_scale, v_scale


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale=None, v_scale=None) -> None:
    """Write k, v [T, KVH, D] into caches [num_blocks, block_size, KVH, D] at flat slots slot_mapping [T].

    slot = block_id * block_size + offset; slot -1 skips the token. Slots must be < num_blocks * block_size.
    k_scale/v_scale (a float or one per kv head): store x / scale, the FP8 cache's quantisation. A float8_e4m3fn
    cache gets minillm.layers.kv_quant.quantize_kv's bytes (saturated at +-448, rounded to nearest-even) from
    this one launch: no torch ops before it, which on a decode step were 8 small kernels per layer.
    """
    k_scale, v_scale = check_store_args(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    row = k.shape[1] * k.shape[2]
    if k.shape[0] == 0:
        return
    k2, v2 = k.reshape(k.shape[0], row), v.reshape(v.shape[0], row)
    if k2.stride(-1) != 1 or v2.stride(-1) != 1:
        k2, v2 = k2.contiguous(), v2.contiguous()
    _store_kvcache_kernel[(k.shape[0],)](k2, v2, k_cache, v_cache, slot_mapping,
                                         k_scale if k_scale is not None else k2, v_scale if v_scale is not None else v2,
                                         k2.stride(0), v2.stride(0), k_cache.stride(1), v_cache.stride(1), ROW=row,
                                         HEAD_DIM=k.shape[2], BLOCK=triton.next_power_of_2(row),
                                         HAS_SCALE=k_scale is not None, FP8=k_cache.dtype == torch.float8_e4m3fn,
                                         num_warps=4)


def per_head_scale(scale, num_kv_heads: int, device: torch.device, name: str) -> torch.Tensor:
    """An FP8 KV-cache scale as fp32 [num_kv_heads]: a float broadcasts, a tensor must hold one per kv head."""
    t = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(num_kv_heads)
    if t.numel() != num_kv_heads:
        raise ValueError(f"{name} must be a float or hold one scale per kv head ({num_kv_heads}), got {t.numel()}")
    return t.contiguous()
