"""Plain-torch references for the Triton kernels of minillm.kernels (the test oracles).

Deliberately simple: a Python loop over sequences, an explicit boolean mask, `repeat_interleave` for
grouped-query attention, fp32 math, and the KV cache read back token by token through the block table.
Nothing here is clever, so a reader can check it by eye.
"""
from __future__ import annotations

import math

import torch


def attention_reference(q, k, v, causal: bool, scale: float | None = None):
    """One sequence: q [Sq, H, D], k/v [Sk, KVH, D] -> (out [Sq, H, D] fp32, lse [H, Sq] fp32).

    Causal masks are bottom-right aligned: query i sits at position Sk - Sq + i. A query that sees no key
    (only when Sk < Sq) gets out = 0 and lse = -inf.
    """
    sq, h, d = q.shape
    sk, kvh, _ = k.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k = k.float().repeat_interleave(h // kvh, dim=1)  # [Sk, H, D]: kv head j serves query heads j*G..j*G+G-1
    v = v.float().repeat_interleave(h // kvh, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [H, Sq, Sk]
    if causal:
        rows = torch.arange(sq).unsqueeze(1) + (sk - sq)
        cols = torch.arange(sk).unsqueeze(0)
        scores = scores.masked_fill(~(cols <= rows).to(scores.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, Sq]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows with no key: 0
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse


def varlen_attention_reference(q, k, v, q_lens, k_lens, causal: bool, scale: float | None = None):
    """Packed sequences: q [T, H, D], k/v [Tk, KVH, D] -> (out [T, H, D], lse [H, T]), one loop per sequence."""
    outs, lses, qs, ks = [], [], 0, 0
    for q_len, k_len in zip(q_lens, k_lens):
        o, l = attention_reference(q[qs:qs + q_len], k[ks:ks + k_len], v[ks:ks + k_len], causal, scale)
        outs.append(o)
        lses.append(l)
        qs, ks = qs + q_len, ks + k_len
    return torch.cat(outs, 0), torch.cat(lses, 1)


def gather_from_cache(cache, block_table, seq_len: int):
    """Read tokens 0..seq_len-1 of one sequence from a paged cache [num_blocks, block_size, KVH, D]."""
    block_size = cache.shape[1]
    rows = [cache[int(block_table[pos // block_size]), pos % block_size] for pos in range(seq_len)]
    return torch.stack(rows, 0)  # [seq_len, KVH, D]


def paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale=None, k_scale=None, v_scale=None):
    """One query per sequence: q [B, H, D] -> out [B, H, D] fp32, attending to all seq_lens[b] cached keys."""
    outs = []
    for b in range(q.shape[0]):
        k = gather_from_cache(k_cache, block_tables[b], int(seq_lens[b])).float()
        v = gather_from_cache(v_cache, block_tables[b], int(seq_lens[b])).float()
        if k_scale is not None:
            k = k * torch.as_tensor(k_scale, dtype=torch.float32, device=k.device).reshape(-1, 1)
        if v_scale is not None:
            v = v * torch.as_tensor(v_scale, dtype=torch.float32, device=v.device).reshape(-1, 1)
        out, _ = attention_reference(q[b:b + 1], k, v, causal=False, scale=scale)
        outs.append(out[0])
    return torch.stack(outs, 0)


def rms_norm_reference(x, weight, eps: float, residual=None):
    """y = (x [+ residual]) / sqrt(mean((x [+ residual])^2) + eps) * weight, computed in fp32."""
    if residual is not None:
        x = x.float() + residual.float()
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return y if residual is None else (y, xf)


def rotary_reference(positions, x, cos_sin_cache):
    """Rotate-half RoPE on x [T, heads, D]: (x1*cos - x2*sin, x2*cos + x1*sin) with cos|sin = cache[pos]."""
    half = x.shape[-1] // 2
    cos = cos_sin_cache[positions.long(), :half].float().unsqueeze(1)  # [T, 1, D/2]
    sin = cos_sin_cache[positions.long(), half:].float().unsqueeze(1)
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def silu_and_mul_reference(x):
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter].float(), x[..., inter:].float()
    return gate * torch.sigmoid(gate) * up


def store_kvcache_reference(k, v, k_cache, v_cache, slot_mapping):
    """Write token t's k/v to flat slot slot_mapping[t] (skip -1) of copies of the caches; return the copies."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = k[t]
        v_cache[slot // block_size, slot % block_size] = v[t]
    return k_cache, v_cache
