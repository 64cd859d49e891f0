"""Attention over packed sequences, with or without a paged KV cache: chapters 2 (causal mask, KV cache),
3 (FlashAttention) and 5 (paged attention).

`Attention` receives the new tokens of every sequence of the batch packed one after another (q [T, H, D],
k and v [T, KVH, D], already rotated) and learns from the forward context (minillm.forward_context) which
tokens belong to which sequence and where their keys and values live:

* With a KV cache (the engine has set `k_cache`/`v_cache` and the metadata carries a `slot_mapping`): the
  new k/v are written to their slots, then each sequence attends to all its `seq_lens[i]` keys, read back
  from the cache through its `block_table` (a prefill, a decode, a chunk of a long prompt, a prefix hit).
* Without a cache (no `slot_mapping`: tests, perplexity, the oracle comparison): a causal prefill of each
  sequence from q/k/v directly.
* Without any forward context: the whole input is one sequence.

The mask is bottom-right aligned: query j of a q_len-token chunk is the token at position
`seq_len - q_len + j` and sees keys 0..that position (exercise ch02.causal_mask). Grouped-query attention
(KVH < H) shares each kv head among H / KVH consecutive query heads.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minillm.forward_context import AttentionMetadata, get_forward_context, prefill_metadata

try:
    from minillm.course.overrides import dispatch
except ImportError:  # the course machinery is not there yet: always run the reference
    def dispatch(name, fn):  # noqa: ARG001
        return fn

# "torch": per-sequence loop over torch SDPA with an explicit causal mask (fast enough on CPU).
# "reference": the same loop over `attention_reference` (plain matmul + fp32 softmax), for tests and reading.
# "triton": the kernels of minillm.kernels, wired in at `_triton_attention` (chapters 3 and 5).
ATTENTION_BACKENDS = ("torch", "reference", "triton")


# >>> exercise ch02.causal_mask
def causal_mask(q_len: int, kv_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask [q_len, kv_len], True where query i may attend to key j.

    The queries are the *last* q_len of the kv_len tokens (bottom-right alignment), so query i sits at
    position kv_len - q_len + i and may see keys 0 .. kv_len - q_len + i:

        mask[i, j] = j <= i + (kv_len - q_len)

    q_len == kv_len is a plain prefill (lower triangle); q_len == 1 is a decode step (one row, all True);
    1 < q_len < kv_len is a chunked prefill or a prefix-cache hit. q_len > kv_len is invalid (ValueError).

    Build it with broadcasting (aranges as a column and a row), no Python loops.
    """
    # >>> solution
    if q_len < 1 or kv_len < q_len:
        raise ValueError(f"causal_mask needs 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
    rows = torch.arange(q_len, device=device).unsqueeze(1)  # [q_len, 1]
    cols = torch.arange(kv_len, device=device).unsqueeze(0)  # [1, kv_len]
    return cols <= rows + (kv_len - q_len)
    # <<< solution
# <<< exercise


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        causal: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for ONE sequence, written out plainly.

    q: [q_len, H, D], k, v: [kv_len, KVH, D] with H a multiple of KVH -> [q_len, H, D] in q's dtype.
    Scores and softmax are fp32; the causal mask is bottom-right aligned (see `causal_mask`).
    """
    q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[0], k.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    # GQA: query head h reads kv head h // (H / KVH), so repeat each kv head H / KVH times in place.
    rep = num_heads // num_kv_heads
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [H, q_len, kv_len]
    if causal:
        mask = dispatch("ch02.causal_mask", causal_mask)(q_len, kv_len, device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # subtracts the row max internally: no overflow
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   causal: bool = True) -> torch.Tensor:
    """Same contract as `attention_reference`, through torch's fused scaled_dot_product_attention."""
    q_len, num_heads, _ = q.shape
    kv_len, num_kv_heads = k.shape[0], k.shape[1]
    rep = num_heads // num_kv_heads
    mask = dispatch("ch02.causal_mask", causal_mask)(q_len, kv_len, device=q.device) if causal else None
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(rep, dim=1).transpose(0, 1),
        v.repeat_interleave(rep, dim=1).transpose(0, 1), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Write new keys/values [T, KVH, D] to their slots of the paged cache; slot -1 means "don't store"."""
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [T] = [{k.shape[0]}], got shape {tuple(slot_mapping.shape)}")
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len keys (or values) [seq_len, KVH, D] of one sequence, through its block table row."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    if blocks.numel() < num_blocks or bool((blocks < 0).any()):
        raise ValueError(f"block_table {block_table.tolist()} does not hold the {num_blocks} blocks that "
                         f"{seq_len} tokens need with block_size {block_size}")
    return cache[blocks].flatten(0, 1)[:seq_len]


def _lengths(meta: AttentionMetadata) -> tuple[list[int], list[int]]:
    q_lens = meta.query_lens_list
    if q_lens is None:
        q_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
    seq_lens = meta.seq_lens_list if meta.seq_lens_list is not None else meta.seq_lens.tolist()
    return q_lens, seq_lens


class Attention(nn.Module):
    """Multi-head / grouped-query attention over the packed batch described by the forward context.

    forward(q [T, H, D], k [T, KVH, D], v [T, KVH, D]) -> [T, H, D]. The engine sets `k_cache`/`v_cache`
    ([num_blocks, block_size, KVH, D]) after allocating the pool; until then they are empty.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 backend: str = "torch") -> None:
        super().__init__()
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend {backend!r}; allowed: {', '.join(ATTENTION_BACKENDS)}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.attention_backend = backend
        # Plain attributes, not buffers: the cache belongs to the engine's memory pool, not to the weights.
        self.k_cache = torch.tensor([])
        self.v_cache = torch.tensor([])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._check_shapes(q, k, v)
        meta = get_forward_context()
        if meta is None:
            meta = prefill_metadata([q.shape[0]], device=q.device)
        q_lens, seq_lens = _lengths(meta)
        if sum(q_lens) != q.shape[0]:
            raise ValueError(f"forward context describes {sum(q_lens)} query tokens, but q has {q.shape[0]}")
        use_cache = meta.slot_mapping is not None and self.k_cache.numel() > 0
        if use_cache:
            store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if self.attention_backend == "triton":
            return self._triton_attention(q, k, v, meta, use_cache)
        attn_fn = sdpa_attention if self.attention_backend == "torch" else attention_reference
        read_cache = use_cache and meta.block_tables is not None
        if not read_cache and q_lens != seq_lens:
            raise ValueError("sequences with cached context (q_len < seq_len) need a KV cache and block_tables; "
                             f"got query lens {q_lens}, seq lens {seq_lens}")
        if read_cache and meta.block_size and meta.block_size != self.k_cache.shape[1]:
            raise ValueError(f"metadata block_size {meta.block_size} != cache block size {self.k_cache.shape[1]}")
        outputs, start = [], 0
        for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
            if q_len < 1 or q_len > seq_len:
                raise ValueError(f"sequence {i}: need 1 <= q_len <= seq_len, got q_len={q_len}, seq_len={seq_len}")
            end = start + q_len
            if read_cache:
                k_seq = gather_kv(self.k_cache, meta.block_tables[i], seq_len)
                v_seq = gather_kv(self.v_cache, meta.block_tables[i], seq_len)
            else:
                k_seq, v_seq = k[start:end], v[start:end]
            outputs.append(attn_fn(q[start:end], k_seq, v_seq, self.scale))
            start = end
        return torch.cat(outputs, dim=0)

    def _triton_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          meta: AttentionMetadata, use_cache: bool) -> torch.Tensor:
        # The dispatch point for minillm.kernels (chapters 3 and 5). Expected kernel signatures:
        #   flash_attn_varlen(q [T,H,D], k [Tk,KVH,D], v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        #                     causal=True, softmax_scale) -> [T,H,D]       (prefill; bottom-right causal)
        #   paged_decode_attention(q [B,H,D], k_cache, v_cache, block_tables [B,max_blocks], seq_lens [B],
        #                          softmax_scale) -> [B,H,D]               (decode: one query per sequence)
        # Prefill without cached context calls flash_attn_varlen on q/k/v with cu_seqlens_k = cu_seqlens_q;
        # a decode-only step calls paged_decode_attention; a chunked prefill needs a paged prefill kernel.
        raise NotImplementedError("attention_backend='triton' is not wired in yet; use 'torch' or 'reference'")

    def _check_shapes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        expected_q = (q.shape[0], self.num_heads, self.head_dim)
        expected_kv = (q.shape[0], self.num_kv_heads, self.head_dim)
        if tuple(q.shape) != expected_q or tuple(k.shape) != expected_kv or tuple(v.shape) != expected_kv:
            raise ValueError(f"attention expects q {expected_q}, k and v {expected_kv}; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale:.4g}, backend={self.attention_backend!r}")
