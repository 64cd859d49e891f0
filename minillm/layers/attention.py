"""Attention over packed sequences, with or without a paged KV cache: chapters 2 (causal mask, KV cache),
3 (FlashAttention) and 5 (paged attention).

`Attention` receives the new tokens of every sequence of the batch packed one after another (q [T, H, D],
k and v [T, KVH, D]; q and k rotated already, or rotated here when the model hands over its RotaryEmbedding and
the positions: on the Triton path with a cache by the launch that also stores k and v) and learns from the
forward context (minillm.forward_context) which tokens belong to which sequence and where their keys and values
live:

* With a KV cache (the engine has set `k_cache`/`v_cache` and the metadata carries a `slot_mapping`): the
  new k/v are written to their slots, then each sequence attends to all its `seq_lens[i]` keys, read back
  from the cache through its `block_table` (a prefill, a decode, a chunk of a long prompt, a prefix hit).
* Without a cache (no `slot_mapping`: tests, perplexity, the oracle comparison): a causal prefill of each
  sequence from q/k/v directly.
* Without any forward context: the whole input is one sequence.

The mask is bottom-right aligned: query j of a q_len-token chunk is the token at position
`seq_len - q_len + j` and sees keys 0..that position (exercise ch02.causal_mask). Grouped-query attention
(KVH < H) shares each kv head among H / KVH consecutive query heads.

Operator backends (the one switch, minillm/layers/backend.py, shared with norm.py, rotary.py and activation.py):
"torch"/"reference" run the readable torch code (and the course's exercise functions); "triton" runs the
kernels of minillm.kernels (through the interpreter on a CPU); "auto" means triton on CUDA, torch on CPU,
decided per call from the tensor's device. The torch path (what a CPU runs) attends sequence by sequence, except
a decode or verify step on the "torch" backend, which takes all sequences in one padded SDPA call
(`padded_decode_attention`): on a CPU a per-sequence loop of small ops cost more than the arithmetic.
The Triton attention path, chapters 3 and 5:

* decode-only step (one query per sequence), or a speculative verify step (the same small number q_len of
  query tokens per sequence, see AttentionMetadata.decode_query_len): `paged_decode_attention` reads K/V
  straight from the paged cache through block_tables/seq_lens (the steps CUDA graphs capture: no host lists);
* prefill without cached context: `flash_attn_varlen` on the packed q/k/v (cu_seqlens_k = cu_seqlens_q);
* anything else (chunked prefill, prefix-cache hit, a batch that mixes prefills and decodes): one launch of
  `paged_prefill_attention` (kernels/paged_prefill.py), FlashAttention whose inner loop reads each key tile
  through the block table (slot of key p = block_table[p // block_size] * block_size + p % block_size), so the
  context is never copied; every key, the new tokens' included, comes from the cache. Reading keys through a
  table of 16-token blocks costs the kernel 1.3-1.9x its time on packed keys (H200, benchmarks/RESULTS.md), so it
  wins only where the copy it saves is large against the attention itself: many short chunks over long contexts
  (1.3x at 32 sequences x 64 new tokens over 8k), and fp8 caches. Steps whose chunks are long (more than
  PAGED_PREFILL_MAX_MEAN_QUERY new tokens per sequence on average; 512-2048 measured 0.7-0.8x) keep the
  earlier path: gather each sequence's keys into a packed copy (`gather_kv_packed`) and run
  `flash_attn_varlen` on it.

Sliding windows (Mistral, Qwen2's upper layers; kernels/sliding_window.py): a layer built with `sliding_window` W
lets each query see its last W keys. The torch path slices and masks the band; on the Triton path a decode step
always passes the window to the paged decode kernel (a CUDA graph replays it at any length), and a step with
prefill tokens whose sequences all fit in the window is plain causal attention on the usual paths; a longer one goes
through the paged prefill kernel, which takes the window (a fresh prefill too: chapter 3's packed kernel has none),
or, without a cache, the torch path.

FP8 KV cache (minillm.layers.kv_quant; the engine binds `k_scale`/`v_scale`, fp32 [KVH], next to the cache views):
new keys and values are quantised on their way into the cache (x / scale, saturated at +-448, rounded to
e4m3): by minillm.layers.kv_quant.quantize_kv on the torch path, by the store kernel itself on the Triton path
(one launch per layer, as for bf16), whose bytes equal quantize_kv's (on the H200 too, since its rounding copies
x's sign bit: Triton's `-x` of +0.0 gave +0.0, not -0.0). Every read dequantises: the
paged decode and paged prefill kernels widen fp8 in registers and fold the scales into the softmax scale (k)
and the output (v); the torch path's gathered keys and values are dequantised to q's dtype after the gather.
A prefill with nothing cached attends to its fresh, unquantised k/v on both paths (as vLLM does); only what is
read back from the cache carries the fp8 rounding.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from minillm.forward_context import AttentionMetadata, get_forward_context, prefill_metadata
from minillm.hooks import dispatch
from minillm.layers.backend import OperatorModule, use_triton
from minillm.layers.decode_attention import decode_gather_plan, padded_decode_attention
from minillm.layers.kv_quant import dequantize_kv, quantize_kv
from minillm.kernels.sliding_window import check_window, first_visible_key, sliding_window_mask
from minillm.layers.tree_attention import MAX_TREE_NODES, paged_tree_attention, tree_visibility

if TYPE_CHECKING:
    from minillm.layers.norm import RMSNorm
    from minillm.layers.rotary import RotaryEmbedding

# mean new tokens per sequence up to which a step with cached context reads it through the block table
# (paged_prefill_attention) rather than from a gathered copy: measured wins at 64, losses at 512 (H200)
PAGED_PREFILL_MAX_MEAN_QUERY = 128

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
                        causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for ONE sequence, written out plainly.

    q: [q_len, H, D], k, v: [kv_len, KVH, D] with H a multiple of KVH -> [q_len, H, D] in q's dtype.
    Scores and softmax are fp32; the causal mask is bottom-right aligned (see `causal_mask`). `mask` (bool
    [q_len, kv_len], True = visible) replaces it: a token tree's (minillm/layers/tree_attention.py).
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
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:
        mask = dispatch("ch02.causal_mask", causal_mask)(q_len, kv_len, device=q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # subtracts the row max internally: no overflow
    return torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                   causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `attention_reference`, through torch's fused scaled_dot_product_attention.

    Grouped-query attention is SDPA's own (`enable_gqa`): the kv heads are read in place, never copied H / KVH
    times. A plain prefill (q_len == kv_len) with the reference mask passes `is_causal` instead of a mask tensor,
    which lets the fused kernel skip the masked tiles; a learner's causal_mask (the ch02 override) is always
    built and used as given.
    """
    q_len, kv_len = q.shape[0], k.shape[0]
    is_causal = False
    if mask is None and causal:
        mask_fn = dispatch("ch02.causal_mask", causal_mask)
        if mask_fn is causal_mask and q_len == kv_len:
            is_causal = True  # bottom-right and top-left alignment agree on a square mask
        elif q_len > 1 or mask_fn is not causal_mask:  # one query row sees every key: no mask at all
            mask = mask_fn(q_len, kv_len, device=q.device)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         is_causal=is_causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(0, 1)


def all_slots_stored(slot_mapping: torch.Tensor) -> bool:
    """Whether every row of a step is stored (no slot -1): a host read of the slots' minimum (a sync on a GPU)."""
    return not slot_mapping.numel() or int(slot_mapping.min()) >= 0


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                  v_scale: torch.Tensor | None = None, all_stored: bool | None = None) -> None:
    """Write new keys/values [T, KVH, D] to their slots of the paged cache; slot -1 means "don't store".
    With k_scale/v_scale (fp32 [KVH], an fp8 cache) the values stored are quantize_kv(x, scale). `all_stored`:
    whether every slot is >= 0, when the caller knows (the same for every layer of a step); None: look."""
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be [T] = [{k.shape[0]}], got shape {tuple(slot_mapping.shape)}")
    if k_scale is not None:  # fp8: move the quantised bytes (torch has no fp8 index_copy_ on a CPU)
        k, v = quantize_kv(k, k_scale).view(torch.uint8), quantize_kv(v, v_scale).view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    # (no-op conversions skipped in Python: each would still be a dispatched op, 90 per step on the CPU path)
    slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.long()
    k = k if k.dtype == k_cache.dtype else k.to(k_cache.dtype)
    v = v if v.dtype == v_cache.dtype else v.to(v_cache.dtype)
    if all_stored is None:
        all_stored = all_slots_stored(slots)
    if not all_stored:  # some rows are not stored: keep the others (a boolean gather)
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, start: int = 0) -> torch.Tensor:
    """Keys (or values) start .. seq_len - 1 [seq_len - start, KVH, D] of one sequence, through its block table row
    (start > 0: a sliding window's first visible key; the blocks before it are not read).

    Only the blocks the sequence uses are touched, and of the last one only its used rows: with the contiguous
    layout (block_size = max_model_len, one block per sequence) indexing `cache[blocks]` first would copy the
    whole reserved region per sequence, per layer, per step. One block is returned as a view (no copy).
    """
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    first_block, skip = divmod(start, block_size)
    blocks = block_table[:num_blocks].tolist()
    if len(blocks) < num_blocks or min(blocks[first_block:], default=0) < 0:  # (before first_block: maybe released)
        raise ValueError(f"block_table {block_table.tolist()} does not hold the {num_blocks} blocks that "
                         f"{seq_len} tokens need with block_size {block_size} (from block {first_block} on)")
    last_rows = seq_len - (num_blocks - 1) * block_size
    last = cache[blocks[-1], :last_rows]
    if first_block == num_blocks - 1:
        return last[skip:]
    full = cache[block_table[first_block:num_blocks - 1].long()].flatten(0, 1)  # copies exactly the full blocks
    return torch.cat((full, last), dim=0)[skip:]


def gather_kv_packed(k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V of every sequence of the batch, packed [sum(seq_lens), KVH, D], and cu_seqlens_k (int32 [B+1]).

    One vectorised gather for the whole batch (no per-sequence Python loop, no device sync): key p of
    sequence i is flat slot block_tables[i, p // block_size] * block_size + p % block_size. The Triton path no
    longer calls it (paged_prefill_attention does this translation per key tile, without the copy); it is the
    gather + FlashAttention baseline of benchmarks/bench_paged_prefill.py.
    """
    if meta.context_kv_index is None:  # the same for every layer: build it once per step (host work is costly)
        device, block_size = k_cache.device, k_cache.shape[1]
        total = sum(seq_lens)
        lens = meta.seq_lens.to(device=device, dtype=torch.int64)
        cu_seqlens_k = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=device)
        cu_seqlens_k[1:] = torch.cumsum(lens, 0)
        seq_index = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens, output_size=total)
        pos = torch.arange(total, device=device) - cu_seqlens_k[:-1].long()[seq_index]
        blocks = meta.block_tables.long()[seq_index, pos // block_size]
        meta.context_kv_index = (blocks * block_size + pos % block_size, cu_seqlens_k)
    slots, cu_seqlens_k = meta.context_kv_index
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k = k_cache.reshape(-1, num_kv_heads, head_dim).index_select(0, slots)
    v = v_cache.reshape(-1, num_kv_heads, head_dim).index_select(0, slots)
    return k, v, cu_seqlens_k


def _lengths(meta: AttentionMetadata) -> tuple[list[int], list[int]]:
    q_lens = meta.query_lens_list
    if q_lens is None:
        q_lens = (meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).tolist()
    seq_lens = meta.seq_lens_list if meta.seq_lens_list is not None else meta.seq_lens.tolist()
    return q_lens, seq_lens


def _banded(attn_fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int,
            key_start: int = 0, chunk: int = 1024) -> list[torch.Tensor]:
    """Sliding-window attention of one sequence's q_len queries, the last of its keys; k and v hold its keys from
    position key_start on. In chunks of `chunk` queries: each chunk passes only the keys from its first query's
    window on and the band's mask (exercise ch02.sliding_window_mask), so no call holds more than
    chunk x (chunk + window - 1) scores."""
    q_len, kv_len = q.shape[0], key_start + k.shape[0]
    mask_fn = dispatch("ch02.sliding_window_mask", sliding_window_mask)
    outputs = []
    for a in range(0, q_len, chunk):
        b = min(a + chunk, q_len)
        end = kv_len - q_len + b  # one past the chunk's last query's position
        first = first_visible_key(end, b - a, window)
        mask = mask_fn(b - a, end, window, first, device=q.device)
        keys = slice(first - key_start, end - key_start)
        outputs.append(attn_fn(q[a:b], k[keys], v[keys], scale, mask=mask))
    return outputs


class Attention(OperatorModule):
    """Multi-head / grouped-query attention over the packed batch described by the forward context.

    forward(q [T, H, D], k [T, KVH, D], v [T, KVH, D]) -> [T, H, D]. The engine sets `k_cache`/`v_cache`
    ([num_blocks, block_size, KVH, D]) after allocating the pool; until then they are empty. sliding_window: the
    layer's window (kernels/sliding_window.py; None: full causal attention).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 backend: str = "auto", sliding_window: int | None = None) -> None:
        super().__init__(backend)
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        check_window(sliding_window)
        self.sliding_window = sliding_window  # each token sees its last sliding_window keys (None: all)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        # Plain attributes, not buffers: the cache belongs to the engine's memory pool, not to the weights.
        self.k_cache = torch.tensor([])
        self.v_cache = torch.tensor([])
        # An fp8 cache's dequantisation scales, fp32 [num_kv_heads] each (views into the engine's KVCache.scales)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
                rope: RotaryEmbedding | None = None, qk_norm: tuple[RMSNorm, RMSNorm] | None = None
                ) -> torch.Tensor:
        """Attention of the packed new tokens (module docstring). With `rope` (the model's RotaryEmbedding) and
        the tokens' `positions`, q and k arrive unrotated: on the Triton path with a KV cache one launch rotates
        them and stores k and v (kernels/rope_store.py: two launches per layer fewer on a decode step),
        elsewhere rope(positions, q, k) runs first. Without `rope`, q and k must already be rotated.
        qk_norm: (q_norm, k_norm), RMSNorms over head_dim that every query and key head goes through before
        RoPE (Qwen3); inside that same launch where it runs and the norms would run Triton's kernel unhooked."""
        self._check_shapes(q, k, v)
        if (rope is None) != (positions is None):
            raise ValueError("give both positions and rope (to rotate q and k here), or neither")
        meta = get_forward_context()
        if meta is None:
            meta = prefill_metadata([q.shape[0]], device=q.device)
        q_lens, seq_lens = _lengths(meta)
        if sum(q_lens) != q.shape[0]:
            raise ValueError(f"forward context describes {sum(q_lens)} query tokens, but q has {q.shape[0]}")
        use_cache = meta.slot_mapping is not None and self.k_cache.numel() > 0
        triton_path = use_triton(self.backend, q)
        fuse_rope = rope is not None and triton_path and use_cache and use_triton(rope.backend, q)
        norms = None  # (q gain, k gain, eps) when the norms run inside the fused RoPE launch
        if qk_norm is not None:
            if fuse_rope and all(norm.inlinable(q) for norm in qk_norm):
                norms = (qk_norm[0].weight, qk_norm[1].weight, qk_norm[0].eps)
            else:
                q = qk_norm[0](q.reshape(-1, q.shape[-1])).view(q.shape)
                k = qk_norm[1](k.reshape(-1, k.shape[-1])).view(k.shape)
        if rope is not None and not fuse_rope:
            q, k = rope(positions, q, k)
        if triton_path:
            return self._triton_attention(q, k, v, meta, use_cache, q_lens, seq_lens,
                                          (positions, rope, norms) if fuse_rope else None)
        return self._torch_attention(q, k, v, meta, use_cache, q_lens, seq_lens)

    def _torch_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                         use_cache: bool, q_lens: list[int], seq_lens: list[int]) -> torch.Tensor:
        """The readable path (chapters 2 and 5), and the CPU's: store the new k/v, then attend.

        * A decode or verify step (every sequence has the same small q_len, no token tree) on the "torch"
          backend: all sequences in one call, `padded_decode_attention`.
        * Otherwise sequence by sequence: keys from the cache through the block table when there is cached
          context (q_len < seq_len), else this step's own k/v (a prefill: what was just stored, unrounded).
        """
        memo = meta.step_memo  # what every layer of this step shares (filled by the first one)
        if use_cache:
            all_stored = memo.get("all_stored")
            if all_stored is None:
                all_stored = memo["all_stored"] = all_slots_stored(meta.slot_mapping)
            store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale,
                          all_stored=all_stored)
        # a prefill attends to its fresh k/v: the same values the cache now holds (or, fp8, their exact originals)
        read_cache = use_cache and meta.block_tables is not None and q_lens != seq_lens
        if not read_cache and q_lens != seq_lens:
            raise ValueError("sequences with cached context (q_len < seq_len) need a KV cache and block_tables; "
                             f"got query lens {q_lens}, seq lens {seq_lens}")
        if read_cache and meta.block_size and meta.block_size != self.k_cache.shape[1]:
            raise ValueError(f"metadata block_size {meta.block_size} != cache block size {self.k_cache.shape[1]}")
        window = self.sliding_window
        if window is not None and meta.tree_mask is not None:
            raise ValueError(f"token-tree attention (tree_mask) has no sliding window; this layer's is {window}")
        decode_q_len = meta.decode_query_len if read_cache and meta.tree_mask is None else None
        if decode_q_len is not None and self.backend != "reference" and \
                (decode_q_len == 1 or dispatch("ch02.causal_mask", causal_mask) is causal_mask):
            plan = memo.get(("decode_plan", window))
            if plan is None:  # where the keys are is the same for every layer of the step: work it out once
                plan = memo[("decode_plan", window)] = decode_gather_plan(
                    meta.block_tables, meta.seq_lens, max(seq_lens), decode_q_len, self.k_cache.shape[1], window)
            return padded_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                           max(seq_lens), decode_q_len, self.scale, self.k_scale, self.v_scale,
                                           plan=plan, window=window)
        attn_fn = attention_reference if self.backend == "reference" else sdpa_attention
        outputs, start = [], 0
        for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
            if q_len < 1 or q_len > seq_len:
                raise ValueError(f"sequence {i}: need 1 <= q_len <= seq_len, got q_len={q_len}, seq_len={seq_len}")
            end = start + q_len
            first = 0 if window is None else first_visible_key(seq_len, q_len, window)  # 0 for a fresh prompt
            if read_cache:
                k_seq = gather_kv(self.k_cache, meta.block_tables[i], seq_len, first)
                v_seq = gather_kv(self.v_cache, meta.block_tables[i], seq_len, first)
                if self.k_scale is not None:
                    k_seq = dequantize_kv(k_seq, self.k_scale, q.dtype)
                    v_seq = dequantize_kv(v_seq, self.v_scale, q.dtype)
            else:
                k_seq, v_seq = k[start:end], v[start:end]
            # a token tree's rows see their ancestors only (chapter 9); -1 rows keep the causal mask
            tree = meta.tree_mask is not None and q_len <= MAX_TREE_NODES  # longer: a prefill, never a tree
            mask = tree_visibility(meta.tree_mask[start:end], seq_len) if tree else None
            if window is not None:  # the band, a chunk of queries at a time: memory bounded by the window
                outputs += _banded(attn_fn, q[start:end], k_seq, v_seq, self.scale, window, first)
            else:
                outputs.append(attn_fn(q[start:end], k_seq, v_seq, self.scale, mask=mask))
            start = end
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def _triton_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                          use_cache: bool, q_lens: list[int], seq_lens: list[int],
                          rope_here: tuple | None = None) -> torch.Tensor:
        """The kernels of chapters 3 and 5 (see the module docstring for which batch takes which path).
        rope_here: (positions, RotaryEmbedding, q/k norm gains and eps or None) when q and k still need rotating
        (with the store, one launch)."""
        from minillm.kernels import paged_prefill
        from minillm.kernels.fused import store_kvcache as store_kvcache_kernel
        from minillm.kernels.flash_attention import flash_attn_varlen
        from minillm.kernels.paged_attention import paged_decode_attention
        from minillm.kernels.rope_store import rotary_and_store_kvcache_

        if rope_here is not None:  # (only with a cache) RoPE on q, k and the store of k, v: one launch
            positions, rope, norms = rope_here
            rotary_and_store_kvcache_(positions, q, k, v, rope.cos_sin_cache, self.k_cache, self.v_cache,
                                      meta.slot_mapping, self.k_scale, self.v_scale, qk_norm=norms)
        elif use_cache:  # an fp8 cache (k_scale set) is quantised inside the store kernel, in the same pass
            store_kvcache_kernel(k, v, self.k_cache, self.v_cache, meta.slot_mapping, self.k_scale, self.v_scale)
        read_cache = use_cache and meta.block_tables is not None
        tree = meta.tree_mask is not None
        if tree and not read_cache:
            raise ValueError("a token-tree step (tree_mask) needs a KV cache and block_tables")
        window = self.sliding_window
        if window is not None and tree:
            raise ValueError(f"token-tree attention (tree_mask) has no sliding window; this layer's is {window}")
        if tree and max(q_lens) <= MAX_TREE_NODES:  # trees, chains and decodes: one tree-masked paged launch
            return paged_tree_attention(q, self.k_cache, self.v_cache, meta, q_lens, self.scale,
                                        k_scale=self.k_scale, v_scale=self.v_scale)
        decode_q_len = meta.decode_query_len if read_cache and not tree else None
        if decode_q_len is not None:  # a decode step, or a verify step with the same number of drafts per sequence
            return paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                          softmax_scale=self.scale, q_len=decode_q_len, k_scale=self.k_scale,
                                          v_scale=self.v_scale, window=window)  # (graphs replay it: always)
        if window is not None and max(seq_lens) <= window:
            window = None  # every key lies inside every query's window: plain causal attention, on any path
        if window is not None and not read_cache:  # chapter 3's packed kernel has no window: SDPA with the band
            return self._torch_attention(q, k, v, meta, False, q_lens, seq_lens)
        cu_seqlens_q = meta.cu_seqlens_q.to(device=q.device, dtype=torch.int32)
        if q_lens == seq_lens and window is None:  # nothing cached before these tokens: the fresh k/v directly
            return flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_q, meta.max_seqlen_q, meta.max_seqlen_q,
                                     causal=True, softmax_scale=self.scale)
        if not read_cache:
            raise ValueError("sequences with cached context (q_len < seq_len) need a KV cache and block_tables; "
                             f"got query lens {q_lens}, seq lens {seq_lens}")
        if any(not 1 <= ql <= sl for ql, sl in zip(q_lens, seq_lens)):
            raise ValueError(f"need 1 <= q_len <= seq_len for every sequence, got {q_lens} and {seq_lens}")
        block_size = self.k_cache.shape[1]
        if meta.block_size and meta.block_size != block_size:
            raise ValueError(f"metadata block_size {meta.block_size} != cache block size {block_size}")
        if max(seq_lens) > meta.block_tables.shape[1] * block_size:
            raise ValueError(f"seq_lens {seq_lens} exceed what block_tables of {meta.block_tables.shape[1]} blocks "
                             f"of {block_size} hold")
        paged = self.k_scale is not None or window is not None  # the packed kernel has neither scales nor window
        if paged or len(q_lens) * PAGED_PREFILL_MAX_MEAN_QUERY >= sum(q_lens):
            # the new tokens' k/v were stored above: the kernel reads every key, cached or new, through the table
            out = paged_prefill.paged_prefill_attention(q, self.k_cache, self.v_cache, meta.block_tables,
                                                        meta.seq_lens, cu_seqlens_q, softmax_scale=self.scale,
                                                        k_scale=self.k_scale, v_scale=self.v_scale, window=window)
        else:  # long chunks: a packed copy of the context and FlashAttention's contiguous loads win
            k_all, v_all, cu_seqlens_k = gather_kv_packed(self.k_cache, self.v_cache, meta, seq_lens)
            out = flash_attn_varlen(q, k_all, v_all, cu_seqlens_q, cu_seqlens_k, max(q_lens), max(seq_lens),
                                    causal=True, softmax_scale=self.scale)
        if tree:  # a prefill shares the step with trees: their rows again, tree-masked
            out = paged_tree_attention(q, self.k_cache, self.v_cache, meta, q_lens, self.scale, out=out,
                                       k_scale=self.k_scale, v_scale=self.v_scale)
        return out

    def _check_shapes(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        expected_q = (q.shape[0], self.num_heads, self.head_dim)
        expected_kv = (q.shape[0], self.num_kv_heads, self.head_dim)
        if tuple(q.shape) != expected_q or tuple(k.shape) != expected_kv or tuple(v.shape) != expected_kv:
            raise ValueError(f"attention expects q {expected_q}, k and v {expected_kv}; "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")

    def extra_repr(self) -> str:
        window = "" if self.sliding_window is None else f", sliding_window={self.sliding_window}"
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"scale={self.scale:.4g}, backend={self.backend!r}{window}")
