"""Tree-masked attention (chapter 9): each node of a token tree sees the cached prefix and its own root-to-node path.

A batch mixes a tree, a chain, a decode (and, for the fallback path, a prefill longer than any tree) over a paged
cache; every row's output must equal plain attention of that row over the prefix plus its own path, computed one
row at a time. Backends: the torch reference, SDPA, and the Triton kernels (the interpreter here, bf16 on the GPU).
"""
from __future__ import annotations

import pytest
import torch

from minillm.forward_context import AttentionMetadata, forward_context
from minillm.layers.attention import Attention, attention_reference
from minillm.speculative.tree import TokenTree, ancestor_bitmasks
from tiny import one_thread  # noqa: F401  (autouse: one torch thread)

BLOCK = 4
SMALL = (6, 2, 16)  # heads, kv heads, head dim (GQA, 3 query heads per kv head)


def _attention_batch(q_lens, prefix_lens, masks, seed=0, device="cpu", dtype=torch.float32, shape=SMALL):
    """Random prefix K/V in a paged cache (blocks scattered over the pool) and random q/k/v for the new tokens.
    Returns (q, k, v, k_cache, v_cache, metadata)."""
    heads, kv_heads, head_dim = shape
    g = torch.Generator().manual_seed(seed)
    seq_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    blocks = [-(-n // BLOCK) for n in seq_lens]
    num_blocks = sum(blocks) + 3
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots, used = [], [], 0
    for n, length, prefix in zip(blocks, seq_lens, prefix_lens):
        table = perm[used:used + n]
        used += n
        tables.append(table + [-1] * (max(blocks) - n))
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(prefix, length)]
    total = sum(q_lens)
    q = torch.randn(total, heads, head_dim, generator=g)
    k = torch.randn(total, kv_heads, head_dim, generator=g)
    v = torch.randn(total, kv_heads, head_dim, generator=g)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    meta = AttentionMetadata(
        cu_seqlens_q=cu.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device), block_size=BLOCK,
        seq_lens_list=seq_lens, query_lens_list=list(q_lens),
        tree_mask=torch.tensor([b for m in masks for b in m], dtype=torch.int64, device=device))
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), to(k), to(v), to(k_cache), to(v_cache), meta


def _path_reference(q, k, v, k_cache, v_cache, meta, parents_per_seq):
    """Each query row on its own: attention over the sequence's prefix keys plus the keys of its root-to-node
    path (a row of a sequence without a tree: over everything up to itself)."""
    kv_heads, head_dim = k.shape[1:]
    k_cache, v_cache = k_cache.float().cpu().clone(), v_cache.float().cpu().clone()
    slots = meta.slot_mapping.cpu()
    k_cache.view(-1, kv_heads, head_dim)[slots] = k.float().cpu()
    v_cache.view(-1, kv_heads, head_dim)[slots] = v.float().cpu()
    outs, start = [], 0
    for b, (q_len, seq_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list)):
        table = meta.block_tables[b].cpu().tolist()
        keys = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len)]
        prefix = seq_len - q_len
        for i in range(q_len):
            parents = parents_per_seq[b]
            path = list(range(i + 1))
            if parents is not None:
                path, node = [], i
                while node >= 0:
                    path.insert(0, node)
                    node = parents[node]
            index = torch.tensor(keys[:prefix] + [keys[prefix + j] for j in path])
            kk = k_cache.view(-1, kv_heads, head_dim)[index]
            vv = v_cache.view(-1, kv_heads, head_dim)[index]
            outs.append(attention_reference(q[start + i:start + i + 1].float().cpu(), kk, vv, causal=False))
        start += q_len
    return torch.cat(outs)


TREE = [-1, 0, 0, 1, 2, 1, 3, 0]  # three branches at the root, two below node 1, depth 3


def _masks(q_lens, parents_per_seq):
    return [ancestor_bitmasks(TokenTree.from_parents(p).attn_mask) if p is not None else [-1] * n
            for n, p in zip(q_lens, parents_per_seq)]


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_tree_masked_attention_equals_each_path(backend):
    parents = [TREE, None, None, [-1, 0, 0], None]
    # a tree across a block boundary, a decode, a chain, a small tree, a short prefill (no cached prefix)
    q_lens, prefix_lens = [8, 1, 3, 3, 6], [9, 4, 6, 1, 0]
    q, k, v, kc, vc, meta = _attention_batch(q_lens, prefix_lens, _masks(q_lens, parents), seed=1)
    expected = _path_reference(q, k, v, kc, vc, meta, parents)
    attn = Attention(*SMALL, backend=backend)
    attn.k_cache, attn.v_cache = kc, vc
    with forward_context(meta):
        out = attn(q, k, v)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_triton_tree_rows_next_to_a_long_prefill():
    """A prefill longer than any tree shares the step: the causal varlen path runs, then the tree rows again."""
    parents = [None, TREE]
    q_lens, prefix_lens = [70, 8], [0, 5]
    q, k, v, kc, vc, meta = _attention_batch(q_lens, prefix_lens, _masks(q_lens, parents), seed=2)
    expected = _path_reference(q, k, v, kc, vc, meta, parents)
    for backend in ("torch", "triton"):
        attn = Attention(*SMALL, backend=backend)
        attn.k_cache, attn.v_cache = kc.clone(), vc.clone()
        meta.tree_rows = meta.context_kv_index = None
        with forward_context(meta):
            out = attn(q, k, v)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_paged_kernel_tree_mask_checks_its_inputs():
    from minillm.kernels.paged_attention import paged_decode_attention
    q, k, v, kc, vc, meta = _attention_batch([3], [2], [[-1, -1, -1]])
    with pytest.raises(ValueError, match="tree_mask must be int64"):
        paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, q_len=3,
                               tree_mask=meta.tree_mask.int())
    with pytest.raises(ValueError, match="q_len must be an int in \\[1, 64\\]"):
        paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, q_len=65, tree_mask=meta.tree_mask)
    with pytest.raises(ValueError, match="cu_seqlens_q must be int32"):
        paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, q_len=3,
                               cu_seqlens_q=meta.cu_seqlens_q.long())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_tree_attention():
    """bf16 on the GPU: trees of 64 and 8 nodes, decodes and chains, contexts up to 2k, 32/8 heads, d 128."""
    wide = [-1] + [0] * 7 + [1 + i % 7 for i in range(56)]  # 7 children of the root, 56 grandchildren
    parents = [wide, TREE, None, None] * 4
    q_lens, prefix_lens = [len(wide), len(TREE), 1, 4] * 4, [2000, 17, 900, 31] * 4
    shape = (32, 8, 128)
    q, k, v, kc, vc, meta = _attention_batch(q_lens, prefix_lens, _masks(q_lens, parents), seed=3,
                                             device="cuda", dtype=torch.bfloat16, shape=shape)
    expected = _path_reference(q, k, v, kc, vc, meta, parents)
    attn = Attention(*shape, backend="triton")
    attn.k_cache, attn.v_cache = kc, vc
    with forward_context(meta):
        out = attn(q, k, v)
    torch.testing.assert_close(out.float().cpu(), expected, atol=1e-2, rtol=2e-2)


def test_ancestor_bitmasks_use_all_64_bits():
    chain = TokenTree.from_parents([-1] + list(range(63)))  # node 63 sees all 64 nodes: every bit, i.e. -1
    star = TokenTree.from_parents([-1] + [0] * 63)  # node 63 sees the root and itself: bits 0 and 63
    assert ancestor_bitmasks(chain.attn_mask)[-1] == -1
    assert ancestor_bitmasks(star.attn_mask)[-1] == 1 - 2 ** 63
    assert ancestor_bitmasks(star.attn_mask)[:3] == [1, 3, 5]
    with pytest.raises(ValueError, match="1 <= N <= 64"):
        ancestor_bitmasks(torch.ones(65, 65, dtype=torch.bool))
