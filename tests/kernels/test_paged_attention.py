"""Paged decode attention with split-KV (minillm.kernels.paged_attention) against the torch reference.

CPU: fp32 through the interpreter: block_size 16 with seq_lens 1, 16, 17, 100 in one batch (one token, one
full block, one past a block, several blocks), random non-contiguous block tables, GQA, 1 and 3 splits
agreeing, more splits than blocks, an odd block size, the FP8 scale path (in fp32), the lse merge.
GPU: bf16 at real sizes (batch 64, ctx 4096, 32/8 heads, d 128) against SDPA, and an FP8 cache.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_reference import (attention_reference, gather_from_cache, paged_decode_reference,
                              varlen_attention_reference)
from minillm.kernels.flash_attention import flash_attn_varlen
from minillm.kernels.decode_split_rule import choose_decode_config, choose_num_splits
from minillm.kernels.decode_merge import merge_attention_states
from minillm.kernels.paged_attention import paged_decode_attention


def _paged_batch(seq_lens, heads, kv_heads, head_dim, block_size, seed=0, device="cpu", dtype=torch.float32,
                 spare_blocks=5):
    """Random q and caches, each sequence's blocks scattered at random over a pool with spare blocks."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=g)
    block_tables = torch.full((len(seq_lens), max(blocks_needed) + 1), -1, dtype=torch.int32)  # -1 padded
    perm = torch.randperm(num_blocks, generator=g)
    used = 0
    for b, n in enumerate(blocks_needed):
        block_tables[b, :n] = perm[used:used + n]
        used += n
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    to = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), to(k_cache), to(v_cache), block_tables.to(device), seq_lens.to(device)


def test_block_boundaries_and_splits_agree():
    q, kc, vc, bt, sl = _paged_batch([1, 16, 17, 100], heads=9, kv_heads=3, head_dim=64, block_size=16)
    ref = paged_decode_reference(q, kc, vc, bt, sl)
    one = paged_decode_attention(q, kc, vc, bt, sl, num_splits=1)
    three = paged_decode_attention(q, kc, vc, bt, sl, num_splits=3)
    torch.testing.assert_close(one, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(three, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(one, three, atol=1e-5, rtol=1e-5)


def test_gqa_32_8_and_more_splits_than_blocks():
    # 8 splits of a 5-token sequence: most splits are empty and must weigh nothing in the merge
    q, kc, vc, bt, sl = _paged_batch([5, 40], heads=32, kv_heads=8, head_dim=32, block_size=16, seed=1)
    ref = paged_decode_reference(q, kc, vc, bt, sl, scale=0.3)
    torch.testing.assert_close(paged_decode_attention(q, kc, vc, bt, sl, softmax_scale=0.3, num_splits=8), ref,
                               atol=2e-5, rtol=1e-4)


def test_odd_block_size_and_head_dim():
    q, kc, vc, bt, sl = _paged_batch([13, 1, 30], heads=4, kv_heads=4, head_dim=48, block_size=12, seed=2)
    ref = paged_decode_reference(q, kc, vc, bt, sl)
    torch.testing.assert_close(paged_decode_attention(q, kc, vc, bt, sl, num_splits=2), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("per_head", [False, True])
def test_dequant_scales(per_head):
    # the FP8 path's arithmetic (k_scale folded into the softmax scale, v_scale on the output), in fp32
    q, kc, vc, bt, sl = _paged_batch([17, 33], heads=6, kv_heads=3, head_dim=32, block_size=16, seed=3)
    k_scale = torch.tensor([0.5, 1.5, 2.0]) if per_head else 0.25
    v_scale = torch.tensor([2.0, 0.1, 1.0]) if per_head else 3.0
    ref = paged_decode_reference(q, kc, vc, bt, sl, k_scale=k_scale, v_scale=v_scale)
    out = paged_decode_attention(q, kc, vc, bt, sl, num_splits=2, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_merge_attention_states_equals_full_softmax():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(3, 2, 16, generator=g), torch.randn(50, 1, 16, generator=g), torch.randn(50, 1, 16, generator=g)
    cu_q = torch.tensor([0, 3], dtype=torch.int32)
    parts = []
    for lo, hi in ((0, 21), (21, 50)):  # two disjoint key sets of the same queries
        cu_k = torch.tensor([0, hi - lo], dtype=torch.int32)
        parts.append(flash_attn_varlen(q, k[lo:hi], v[lo:hi], cu_q, cu_k, 3, hi - lo, causal=False, return_lse=True))
    out, lse = merge_attention_states(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    ref, ref_lse = varlen_attention_reference(q, k, v, [3], [50], causal=False)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)
    # a side that saw no keys (lse -inf) weighs nothing; both empty gives zeros, not nan
    empty = torch.full_like(lse, float("-inf"))
    out2, lse2 = merge_attention_states(out, lse, torch.zeros_like(out), empty)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(lse2, lse)
    out3, _ = merge_attention_states(torch.zeros_like(out), empty, torch.zeros_like(out), empty)
    assert not torch.isnan(out3).any() and (out3 == 0).all()


@pytest.mark.parametrize("prefetch_table", [False, True])
def test_launch_configs_agree(prefetch_table):
    # every tile shape and split count computes the same attention: block_n 16 (one block per tile, many
    # iterations), 64 (a tile past the end of short sequences); the table read one tile ahead or in place
    q, kc, vc, bt, sl = _paged_batch([1, 17, 100], heads=4, kv_heads=2, head_dim=32, block_size=16, seed=5)
    ref = paged_decode_reference(q, kc, vc, bt, sl)
    for splits, block_n in ((1, 16), (3, 16), (4, 64)):
        out = paged_decode_attention(q, kc, vc, bt, sl, num_splits=splits, block_n=block_n, num_warps=2,
                                     num_stages=2, prefetch_table=prefetch_table)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4, msg=f"splits {splits}, block_n {block_n}")


def test_decode_config_rule():
    # the H200's measured optimum (benchmarks/sweep_paged_decode.py, 132 SMs, 8 kv heads): (splits, block_n)
    measured = {(1, 1024): (16, 64), (1, 32768): (32, 128), (2, 16384): (32, 64), (4, 4096): (16, 64),
                (8, 32768): (8, 64), (16, 1024): (4, 64), (32, 1024): (1, 128), (32, 4096): (2, 64),
                (64, 4096): (1, 64), (256, 32768): (1, 64)}
    for (batch, ctx), want in measured.items():
        cfg = choose_decode_config(batch, 8, ctx, 132)
        assert (cfg.num_splits, cfg.block_n) == want, (batch, ctx, cfg)
    for sms in (16, 80, 132):  # properties on any GPU
        for batch in (1, 3, 8, 40, 300):
            for ctx in (16, 100, 1024, 5000, 131072):
                cfg = choose_decode_config(batch, 8, ctx, sms)
                s = cfg.num_splits
                assert s & (s - 1) == 0 and 1 <= s <= 32, cfg  # a power of two
                assert s == 1 or (batch * 8 * s <= 4 * sms and ctx // s >= 64), (batch, ctx, sms, cfg)
                assert cfg.block_n <= max(64, ctx // s) or ctx <= 128, cfg  # 128-key tiles only where filled
    for batch in (1, 8, 32, 256):  # one tile holds the whole context: no split, no merge (bf16 only)
        cfg = choose_decode_config(batch, 3, 128, 132)
        assert (cfg.num_splits, cfg.block_n) == (1, 128), (batch, cfg)
    assert choose_decode_config(1, 3, 129, 132).num_splits == 2  # one key more: the general rule again
    assert choose_decode_config(1, 3, 128, 132, kv_bytes=1).num_splits == 2  # fp8 keeps its own rule
    assert choose_num_splits(1, 8, 32768, torch.device("cpu")) == 1  # the interpreter: one program per head
    with pytest.raises(ValueError, match="num_sms"):
        choose_decode_config(1, 8, 1024, 0)


def test_rejects_bad_inputs():
    q, kc, vc, bt, sl = _paged_batch([3], heads=2, kv_heads=2, head_dim=16, block_size=16)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(q, kc, vc, bt.long(), sl)
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode_attention(q, kc, vc, bt, sl, num_splits=0)
    with pytest.raises(ValueError, match="k_scale"):
        paged_decode_attention(q, kc, vc, bt, sl, k_scale=1.0)
    for bad in ({"block_n": 48}, {"num_warps": 3}, {"num_stages": 0}, {"prefetch_table": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            paged_decode_attention(q, kc, vc, bt, sl, **bad)


def _sdpa_decode(q, kc, vc, bt, sl):
    """SDPA over each sequence's keys gathered into a contiguous [B, KVH, S, D] (all seq_lens equal)."""
    b, h, d = q.shape
    s = int(sl[0])
    k = kc[bt[:, : s // kc.shape[1]].long()].reshape(b, s, kc.shape[2], d).transpose(1, 2)
    v = vc[bt[:, : s // vc.shape[1]].long()].reshape(b, s, vc.shape[2], d).transpose(1, 2)
    rep = h // kc.shape[2]
    return F.scaled_dot_product_attention(q.unsqueeze(2), k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))[:, :, 0]


@pytest.mark.gpu
def test_gpu_bf16_decode_against_sdpa():
    q, kc, vc, bt, sl = _paged_batch([4096] * 64, heads=32, kv_heads=8, head_dim=128, block_size=16,
                                     device="cuda", dtype=torch.bfloat16)
    ref = _sdpa_decode(q, kc, vc, bt, sl)
    torch.testing.assert_close(paged_decode_attention(q, kc, vc, bt, sl), ref, atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(paged_decode_attention(q, kc, vc, bt, sl, num_splits=1), ref, atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(paged_decode_attention(q, kc, vc, bt, sl, num_splits=7), ref, atol=1e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_mixed_lengths_and_fp8_cache():
    q, kc, vc, bt, sl = _paged_batch([1, 16, 17, 100, 3000], heads=32, kv_heads=8, head_dim=128, block_size=16,
                                     device="cuda", dtype=torch.bfloat16, seed=7)
    ref = paged_decode_reference(q, kc, vc, bt, sl)
    torch.testing.assert_close(paged_decode_attention(q, kc, vc, bt, sl).float(), ref, atol=1e-2, rtol=2e-2)
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    k_scale = kc.float().abs().amax(dim=(0, 1, 3)) / 448.0  # one scale per kv head
    v_scale = vc.float().abs().amax() / 448.0
    kq = (kc.float() / k_scale.view(1, 1, -1, 1)).to(torch.float8_e4m3fn)
    vq = (vc.float() / v_scale).to(torch.float8_e4m3fn)
    ref8 = paged_decode_reference(q, kq.float(), vq.float(), bt, sl, k_scale=k_scale.cpu(), v_scale=v_scale.cpu())
    out8 = paged_decode_attention(q, kq, vq, bt, sl, k_scale=k_scale, v_scale=float(v_scale))
    torch.testing.assert_close(out8.float(), ref8, atol=2e-2, rtol=3e-2)


# -- several query tokens per sequence (speculative decoding's verify step) ------------------------------------
def _multi_query_reference(q, k_cache, v_cache, block_tables, seq_lens, q_len, scale=None):
    """q [B * q_len, H, D]: the last q_len tokens of each sequence, causal among themselves (bottom-right)."""
    outs = []
    for b in range(block_tables.shape[0]):
        n = int(seq_lens[b])
        k = gather_from_cache(k_cache, block_tables[b], n).float()
        v = gather_from_cache(v_cache, block_tables[b], n).float()
        out, _ = attention_reference(q[b * q_len:(b + 1) * q_len], k, v, causal=True, scale=scale)
        outs.append(out)
    return torch.cat(outs, 0)


def _queries(batch, q_len, heads, head_dim, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch * q_len, heads, head_dim, generator=g).to(device=device, dtype=dtype)


@pytest.mark.parametrize("q_len", [1, 2, 4])
def test_multi_query_causal_gqa_across_block_boundaries(q_len):
    # seq_lens so that the q_len new tokens straddle a block boundary (16 -> 17), sit at its start, or fill
    # a whole sequence (seq_len == q_len: the first query sees one key)
    seq_lens = [q_len, 17, 18, 33, 50]
    _, kc, vc, bt, sl = _paged_batch(seq_lens, heads=6, kv_heads=2, head_dim=32, block_size=16, seed=10 + q_len)
    q = _queries(len(seq_lens), q_len, 6, 32, seed=q_len)
    ref = _multi_query_reference(q, kc, vc, bt, sl, q_len)
    for splits in (1, 3):  # a later split holds keys that the earlier queries must not see
        out = paged_decode_attention(q, kc, vc, bt, sl, num_splits=splits, q_len=q_len)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_multi_query_equals_one_decode_per_position():
    """Query j of a verify step is exactly the decode step of a sequence cut at its position."""
    q_len, seq_lens = 3, [20, 9]
    _, kc, vc, bt, sl = _paged_batch(seq_lens, heads=4, kv_heads=1, head_dim=16, block_size=4, seed=21)
    q = _queries(2, q_len, 4, 16, seed=22)
    out = paged_decode_attention(q, kc, vc, bt, sl, num_splits=2, q_len=q_len)
    for j in range(q_len):
        cut = sl - q_len + j + 1
        one = paged_decode_attention(q[j::q_len].contiguous(), kc, vc, bt, cut.to(torch.int32), num_splits=1)
        torch.testing.assert_close(out[j::q_len], one, atol=1e-5, rtol=1e-5)


def test_multi_query_rejects_bad_shapes():
    _, kc, vc, bt, sl = _paged_batch([5, 6], heads=2, kv_heads=2, head_dim=16, block_size=16)
    with pytest.raises(ValueError, match="q_len"):
        paged_decode_attention(_queries(2, 2, 2, 16, 0), kc, vc, bt, sl, q_len=0)
    with pytest.raises(ValueError, match="B \\* q_len"):
        paged_decode_attention(_queries(2, 2, 2, 16, 0), kc, vc, bt, sl, q_len=3)


@pytest.mark.gpu
@pytest.mark.parametrize("q_len", [2, 4, 8])
def test_gpu_bf16_multi_query(q_len):
    seq_lens = [q_len, 17, 100, 1000, 4096] * 4
    _, kc, vc, bt, sl = _paged_batch(seq_lens, heads=32, kv_heads=8, head_dim=128, block_size=16, device="cuda",
                                     dtype=torch.bfloat16, seed=30 + q_len)
    q = _queries(len(seq_lens), q_len, 32, 128, seed=q_len, device="cuda", dtype=torch.bfloat16)
    ref = _multi_query_reference(q.float().cpu(), kc.float().cpu(), vc.float().cpu(), bt.cpu(), sl.cpu(), q_len)
    for splits in (None, 1, 5):
        out = paged_decode_attention(q, kc, vc, bt, sl, num_splits=splits, q_len=q_len)
        torch.testing.assert_close(out.float().cpu(), ref, atol=1e-2, rtol=2e-2)
