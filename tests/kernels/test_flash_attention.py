"""FlashAttention forward (minillm.kernels.flash_attention) against the per-sequence torch reference.

CPU: fp32 through the Triton interpreter, small heads, awkward lengths (1, one past a tile, exact tile
multiples), packed batches of mixed lengths, GQA, causal and not, prefix (seqlen_k > seqlen_q), lse.
GPU: bf16 at real sizes against torch SDPA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_reference import attention_reference, varlen_attention_reference
from minillm.kernels.flash_attention import flash_attention, flash_attn_varlen


def _cu(lens, device="cpu"):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def _check_varlen(q_lens, k_lens, heads, kv_heads, head_dim, causal, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g)
    k = torch.randn(sum(k_lens), kv_heads, head_dim, generator=g)
    v = torch.randn(sum(k_lens), kv_heads, head_dim, generator=g)
    out, lse = flash_attn_varlen(q, k, v, _cu(q_lens), _cu(k_lens), max(q_lens), max(k_lens), causal=causal,
                                 softmax_scale=scale, return_lse=True)
    ref_out, ref_lse = varlen_attention_reference(q, k, v, q_lens, k_lens, causal, scale)
    assert out.shape == q.shape and lse.shape == (heads, sum(q_lens)) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_mixed_lengths_packed(causal):
    # 1 token, one past a 16-row tile, exact multiples of both tiles (64, 128), one past 128
    _check_varlen([1, 17, 64, 129], [1, 17, 64, 129], heads=2, kv_heads=2, head_dim=64, causal=causal)


def test_gqa_like_smollm2():
    _check_varlen([17, 128], [17, 128], heads=9, kv_heads=3, head_dim=64, causal=True, seed=1)


def test_gqa_32_8():
    _check_varlen([5, 33], [5, 33], heads=32, kv_heads=8, head_dim=64, causal=True, seed=2)


@pytest.mark.parametrize("causal", [True, False])
def test_prefix_seqlen_k_longer(causal):
    # chunked prefill / prefix-cache hit: the queries are the last tokens; bottom-right causal alignment
    _check_varlen([1, 17, 40], [20, 17, 160], heads=2, kv_heads=1, head_dim=64, causal=causal, seed=3)


@pytest.mark.parametrize("head_dim", [80, 128])
def test_head_dims_and_scale(head_dim):
    # 128 as in Llama-3; 80 is padded to 128 inside the kernel; a custom softmax scale
    _check_varlen([9, 33], [9, 33], heads=2, kv_heads=2, head_dim=head_dim, causal=True, seed=4, scale=0.05)


def test_rows_without_keys_are_zero():
    # causal with seqlen_k < seqlen_q: the first queries sit at negative positions and see nothing
    _check_varlen([6], [3], heads=1, kv_heads=1, head_dim=16, causal=True, seed=5)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(33, 33), (7, 50)])
def test_fixed_length_layout(seqlen_q, seqlen_k):
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, seqlen_q, 32, generator=g)
    k = torch.randn(2, 2, seqlen_k, 32, generator=g)
    v = torch.randn(2, 2, seqlen_k, 32, generator=g)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True)
    for b in range(2):
        ref, ref_lse = attention_reference(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), True)
        torch.testing.assert_close(out[b].transpose(0, 1), ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[b], ref_lse, atol=2e-5, rtol=1e-5)


def test_rejects_bad_inputs():
    q, k = torch.randn(4, 3, 16), torch.randn(4, 2, 16)
    cu = _cu([4])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        flash_attn_varlen(q, k, k, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="int32"):
        flash_attn_varlen(q, q, q, cu.long(), cu, 4, 4)
    big = torch.randn(4, 1, 512)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attn_varlen(big, big, big, cu, cu, 4, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,dtype", [(True, torch.bfloat16), (False, torch.bfloat16), (True, torch.float16)])
def test_gpu_against_sdpa(causal, dtype):
    torch.manual_seed(0)
    b, h, kvh, s, d = 2, 32, 8, 1024, 128
    q = torch.randn(b, h, s, d, device="cuda", dtype=dtype)
    k = torch.randn(b, kvh, s, d, device="cuda", dtype=dtype)
    v = torch.randn(b, kvh, s, d, device="cuda", dtype=dtype)
    kr, vr = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
    ref = F.scaled_dot_product_attention(q, kr, vr, is_causal=causal)
    torch.testing.assert_close(flash_attention(q, k, v, causal=causal), ref, atol=2e-2, rtol=2e-2)
    # the same batch packed: [B*S, H, D]
    pack = lambda t: t.transpose(1, 2).reshape(b * s, t.shape[1], d)  # noqa: E731
    cu = _cu([s] * b, "cuda")
    out = flash_attn_varlen(pack(q), pack(k), pack(v), cu, cu, s, s, causal=causal)
    torch.testing.assert_close(out, pack(ref), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_varlen_prefix_bf16():
    torch.manual_seed(1)
    q_lens, k_lens = [1, 300, 1000], [700, 300, 1500]
    h, kvh, d = 32, 8, 128
    q = torch.randn(sum(q_lens), h, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(k_lens), kvh, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(k_lens), kvh, d, device="cuda", dtype=torch.bfloat16)
    out, lse = flash_attn_varlen(q, k, v, _cu(q_lens, "cuda"), _cu(k_lens, "cuda"), max(q_lens), max(k_lens),
                                 causal=True, return_lse=True)
    ref, ref_lse = varlen_attention_reference(q, k, v, q_lens, k_lens, causal=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, ref_lse, atol=2e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 256), (4, 4, 96)])
def test_gpu_head_dims(heads, kv_heads, head_dim):
    # SmolLM2's 9/3 x 64, the largest head_dim (shared-memory bound tiles) and a padded one
    torch.manual_seed(2)
    lens = [1, 17, 129, 700]
    q = torch.randn(sum(lens), heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens), kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(lens), kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    cu = _cu(lens, "cuda")
    out = flash_attn_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    ref, _ = varlen_attention_reference(q, k, v, lens, lens, causal=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
