"""The Hopper FlashAttention kernel (minillm.kernels.flash_attention_hopper) and its dispatch.

CPU: the kernel itself runs under the Triton interpreter (device-side TMA descriptors are emulated there,
bounds checks included) in fp32 with one small explicit tile: packed batches of awkward lengths, GQA, causal
and not, queries that are the last tokens of a longer context, rows that see no key, strided inputs.
GPU (sm_90 only): bf16 against torch SDPA at real sizes, explicit configs and the kernel's own autotuner.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minillm.kernels import flash_attention_hopper as hopper
from minillm.kernels.flash_attention import flash_attention, flash_attn_varlen

SMALL = (32, 16, 4, 1)  # BLOCK_M, BLOCK_N, num_warps, num_stages: quick under the interpreter
on_hopper = pytest.mark.skipif(not (torch.cuda.is_available() and hopper.is_hopper(torch.device("cuda"))),
                               reason="needs an sm_90 GPU (H100/H200)")


def _cu(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _reference(q, k, v, q_lens, k_lens, causal, scale=None):
    """Per-sequence attention in fp32 with an explicit bottom-right causal mask: (out [T, H, D], lse [H, T])."""
    outs, lses, qs, ks = [], [], 0, 0
    heads, head_dim = q.shape[1], q.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    for q_len, k_len in zip(q_lens, k_lens):
        qi = q[qs:qs + q_len].float()
        ki = k[ks:ks + k_len].float().repeat_interleave(heads // k.shape[1], dim=1)
        vi = v[ks:ks + k_len].float().repeat_interleave(heads // k.shape[1], dim=1)
        s = torch.einsum("qhd,khd->hqk", qi, ki) * scale
        if causal:
            pos = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
            s = s.masked_fill(torch.arange(k_len, device=q.device)[None, :] > pos, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.einsum("hqk,khd->qhd", torch.exp(s - lse[..., None]).nan_to_num(0.0), vi))
        lses.append(lse)
        qs, ks = qs + q_len, ks + k_len
    return torch.cat(outs), torch.cat(lses, 1)


def _check(q_lens, k_lens, heads, kv_heads, head_dim, causal, config=SMALL, seed=0, device="cpu",
           dtype=torch.float32, atol=2e-5, rtol=1e-4):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g, device=device, dtype=dtype)
    k = torch.randn(sum(k_lens), kv_heads, head_dim, generator=g, device=device, dtype=dtype)
    v = torch.randn(sum(k_lens), kv_heads, head_dim, generator=g, device=device, dtype=dtype)
    out, lse = flash_attn_varlen(q, k, v, _cu(q_lens, device), _cu(k_lens, device), max(q_lens), max(k_lens),
                                 causal=causal, return_lse=True, backend="hopper", config=config)
    ref, ref_lse = _reference(q, k, v, q_lens, k_lens, causal)
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=rtol)


@pytest.mark.parametrize("causal", [True, False])
def test_packed_awkward_lengths_gqa(causal):
    # 1 token, one past a tile, an exact multiple of both tiles, one past two query tiles; 4 query heads on 2
    _check([1, 17, 64, 65], [1, 17, 64, 65], heads=4, kv_heads=2, head_dim=16, causal=causal)


def test_exp2_on_the_fma_units():
    # the cubic for 2^f has a relative error of 7.7e-5: out and lse within 1e-3 of the exact softmax
    # (with a register cap, a launch option the interpreter accepts and ignores)
    _check([70, 33], [70, 33], heads=2, kv_heads=1, head_dim=16, causal=True, config=SMALL[:4] + (1, 128),
           atol=1e-3, rtol=1e-3)


def test_queries_are_the_last_tokens():
    # chunked prefill / prefix hit (seqlen_k > seqlen_q), and seqlen_k < seqlen_q: early rows see no key
    _check([3, 40, 6], [20, 90, 3], heads=2, kv_heads=1, head_dim=32, causal=True, seed=1)


def test_fixed_length_strided_and_reversed_tiles():
    # [B, S, H, D] viewed as [B, H, S, D] (no copy: strided descriptors); several query tiles per head so the
    # longest-first tile order is exercised
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 70, 4, 16, generator=g).transpose(1, 2)
    k = torch.randn(2, 70, 2, 16, generator=g).transpose(1, 2)
    v = torch.randn(2, 70, 2, 16, generator=g).transpose(1, 2)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="hopper", config=SMALL)
    for b in range(2):
        ref, ref_lse = _reference(q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), [70], [70],
                                  True)
        torch.testing.assert_close(out[b].transpose(0, 1), ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse[b], ref_lse, atol=2e-5, rtol=1e-4)


def test_dispatch_and_bad_input():
    q = torch.randn(8, 2, 16)
    cu = _cu([8])
    assert not hopper.hopper_supported(q, q, q, q, (0,) * 14, 8)  # a CPU tensor never takes the Hopper path
    assert not hopper.use_hopper(q, q, q, q, (0,) * 14, 8)
    with pytest.raises(ValueError, match="backend"):
        flash_attn_varlen(q, q, q, cu, cu, 8, 8, backend="cudnn")
    with pytest.raises(ValueError, match="config"):
        flash_attn_varlen(q, q, q, cu, cu, 8, 8, config=(32, 16, 4))
    with pytest.raises(ValueError, match="Hopper config"):
        flash_attn_varlen(q, q, q, cu, cu, 8, 8, backend="hopper", config=SMALL + (2, 0))
    odd = torch.randn(8, 2, 80)
    with pytest.raises(ValueError, match="power of two"):
        flash_attn_varlen(odd, odd, odd, cu, cu, 8, 8, backend="hopper", config=SMALL)


def test_shared_memory_accounting():
    # what triton 3.6 allocates for sm_90 (seen when compiling for that target): Q + num_stages (K, V) + barriers
    assert hopper.shared_memory_bytes((128, 128, 8, 2), 128) == 164864
    assert hopper.shared_memory_bytes((128, 64, 8, 3), 128) == 132096
    assert (128, 128, 8, 4) not in hopper.valid_configs(128)  # 295,936 bytes: more than a block may have
    for d in hopper.HOPPER_HEAD_DIMS:
        assert hopper.valid_configs(d, hopper.AUTOTUNE_CONFIGS[d]) == hopper.AUTOTUNE_CONFIGS[d]


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("config", [None, (128, 64, 8, 3, 0, 0), (64, 64, 4, 2, 0, 0), (128, 128, 8, 2, 1, 0),
                                    (128, 64, 8, 2, 1, 128), (256, 64, 16, 2, 0, 0)])
def test_gpu_against_sdpa(head_dim, config):
    torch.manual_seed(0)
    b, h, kvh, s = 2, 32, 8, 1024
    q, k, v = (torch.randn(b, n, s, head_dim, device="cuda", dtype=torch.bfloat16) for n in (h, kvh, kvh))
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1),
                                         is_causal=True)
    out = flash_attention(q, k, v, causal=True, backend="hopper", config=config)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(flash_attention(q, k, v, causal=True), out, atol=2e-2, rtol=2e-2)  # "auto" agrees


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_varlen_prefix_bf16(head_dim):
    _check([1, 300, 1000, 129], [700, 300, 1500, 129], heads=32, kv_heads=4, head_dim=head_dim, causal=True,
           config=None, device="cuda", dtype=torch.bfloat16, atol=2e-2, rtol=2e-2)
