"""The small fused kernels (minillm.kernels.fused) against plain-torch references.

CPU: fp32 through the interpreter at awkward sizes (hidden 576 like SmolLM2 and a non-power-of-two 100,
GQA 9/3 RoPE on views of a fused qkv projection, slots -1 and across blocks). GPU: bf16 at Llama-8B sizes.
"""
from __future__ import annotations

import pytest
import torch

from kernel_reference import (rms_norm_reference, rotary_reference, silu_and_mul_reference,
                              store_kvcache_reference)
from minillm.kernels.fused import rms_norm, rotary_embedding_, silu_and_mul, store_kvcache


def _cos_sin_cache(max_pos, head_dim, theta=1e5, device="cpu"):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


@pytest.mark.parametrize("shape", [(7, 576), (2, 3, 100), (1, 1)])
def test_rms_norm(shape):
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    w = torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)
    out, res_out = rms_norm(x, w, 1e-6, residual=res)
    ref_out, ref_res = rms_norm_reference(x, w, 1e-6, residual=res)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res_out, ref_res)
    assert out.shape == x.shape and res_out.shape == x.shape


def test_rotary_in_place_on_qkv_views():
    g = torch.Generator().manual_seed(1)
    tokens, heads, kv_heads, d = 5, 9, 3, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)  # a fused projection's output
    q = qkv[:, : heads * d].view(tokens, heads, d)  # views: rotated in place, strided rows
    k = qkv[:, heads * d: (heads + kv_heads) * d].view(tokens, kv_heads, d)
    v_before = qkv[:, (heads + kv_heads) * d:].clone()
    positions = torch.tensor([0, 1, 17, 100, 8191])
    cache = _cos_sin_cache(8192, d)
    ref_q, ref_k = rotary_reference(positions, q, cache), rotary_reference(positions, k, cache)
    rotary_embedding_(positions, q, k, cache)
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * d:], v_before)  # v untouched
    torch.testing.assert_close(q[0], ref_q[0])  # position 0 is the identity rotation


@pytest.mark.parametrize("positions", [torch.arange(8)[::2],  # a strided slice
                                       torch.tensor([[7]]).expand(1, 4).reshape(-1)],  # stride 0: EAGLE's beam
                         ids=["stride-2", "stride-0"])
def test_rotary_reads_positions_through_their_stride(positions):
    """Positions that are a view (EAGLE's tree search expands one position over its beam: stride 0) are read with
    their stride, not as a contiguous array: reading past a stride-0 view's one element gave garbage positions and
    an illegal memory access on the H200."""
    assert positions.stride(0) != 1
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 3, 16, generator=g), torch.randn(4, 1, 16, generator=g)
    cache = _cos_sin_cache(64, 16)
    ref_q, ref_k = rotary_reference(positions.contiguous(), q, cache), rotary_reference(positions.contiguous(), k, cache)
    rotary_embedding_(positions, q, k, cache)
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 2 * 100), (4, 2 * 1536), (2, 2, 2 * 7)])
def test_silu_and_mul(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 4
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out, silu_and_mul_reference(x), atol=1e-5, rtol=1e-5)


def test_store_kvcache_skips_minus_one():
    g = torch.Generator().manual_seed(3)
    tokens, kv_heads, d, block_size = 6, 3, 64, 16
    k, v = torch.randn(tokens, kv_heads, d, generator=g), torch.randn(tokens, kv_heads, d, generator=g)
    k_cache, v_cache = torch.zeros(4, block_size, kv_heads, d), torch.zeros(4, block_size, kv_heads, d)
    slots = torch.tensor([15, 16, -1, 63, 0, 40])  # last of block 0, first of block 1, skip, last slot of the pool
    ref_k, ref_v = store_kvcache_reference(k, v, k_cache, v_cache, slots)
    store_kvcache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    assert int((k_cache.abs().sum(-1).sum(-1) > 0).sum()) == 5  # exactly five slots written


def test_store_kvcache_quantising_scales():
    # the FP8 cache's write path (x / scale per kv head), checked in fp32
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    k_cache, v_cache = torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16)
    slots = torch.tensor([7, -1, 2])
    k_scale = torch.tensor([0.5, 4.0])
    store_kvcache(k, v, k_cache, v_cache, slots, k_scale=k_scale, v_scale=2.0)
    ref_k, ref_v = store_kvcache_reference(k / k_scale.view(1, 2, 1), v / 2.0, torch.zeros_like(k_cache),
                                           torch.zeros_like(v_cache), slots)
    torch.testing.assert_close(k_cache, ref_k)
    torch.testing.assert_close(v_cache, ref_v)


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 7))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rotary_embedding_(torch.zeros(2, dtype=torch.long), torch.randn(2, 2, 8), torch.randn(2, 1, 8), torch.randn(4, 6))
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kvcache(torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8),
                      torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
def test_gpu_bf16_llama8b_sizes():
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    x, res = torch.randn(333, 4096, device=dev, dtype=bf), torch.randn(333, 4096, device=dev, dtype=bf)
    w = torch.randn(4096, device=dev, dtype=bf)
    out, res_out = rms_norm(x, w, 1e-5, residual=res)
    ref_out, ref_res = rms_norm_reference(x, w, 1e-5, residual=res)
    torch.testing.assert_close(res_out, ref_res.to(bf))
    torch.testing.assert_close(out.float(), ref_out, atol=5e-2, rtol=2e-2)
    g = torch.randn(333, 2 * 14336, device=dev, dtype=bf)
    torch.testing.assert_close(silu_and_mul(g).float(), silu_and_mul_reference(g), atol=5e-2, rtol=2e-2)
    q, k = torch.randn(333, 32, 128, device=dev, dtype=bf), torch.randn(333, 8, 128, device=dev, dtype=bf)
    pos = torch.randint(0, 8192, (333,), device=dev)
    cache = _cos_sin_cache(8192, 128, theta=5e5, device=dev)
    ref_q, ref_k = rotary_reference(pos, q, cache), rotary_reference(pos, k, cache)
    rotary_embedding_(pos, q, k, cache)
    torch.testing.assert_close(q.float(), ref_q, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(k.float(), ref_k, atol=5e-2, rtol=2e-2)
    kc, vc = torch.zeros(100, 16, 8, 128, device=dev, dtype=bf), torch.zeros(100, 16, 8, 128, device=dev, dtype=bf)
    slots = torch.randperm(1600, device=dev)[:333]
    slots[::7] = -1
    ref_kc, ref_vc = store_kvcache_reference(k, q[:, :8], kc, vc, slots)
    store_kvcache(k, q[:, :8], kc, vc, slots)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)


@pytest.mark.gpu
def test_gpu_store_kvcache_fp8():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    torch.manual_seed(1)
    k, v = (torch.randn(100, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k_cache = torch.zeros(10, 16, 8, 128, device="cuda", dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(160, device="cuda")[:100]
    k_scale = k.float().abs().amax(dim=(0, 2)) / 448.0  # per kv head
    v_scale = float(v.float().abs().max()) / 448.0  # per tensor
    store_kvcache(k, v, k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    want_k = (k.float() / k_scale.view(1, -1, 1)).to(torch.float8_e4m3fn).float()
    want_v = (v.float() / v_scale).to(torch.float8_e4m3fn).float()
    got_k = k_cache.view(-1, 8, 128)[slots].float()
    got_v = v_cache.view(-1, 8, 128)[slots].float()
    torch.testing.assert_close(got_k, want_k, atol=2e-3, rtol=0.13)  # within one fp8 rounding step
    torch.testing.assert_close(got_v, want_v, atol=2e-3, rtol=0.13)

