"""The fused RoPE + KV-cache store (kernels/rope_store.py) against the two launches it replaces, bit for bit, and
with Qwen3's q/k norms inside it against the norm kernel run first."""
import pytest
import torch

from minillm.kernels.fused import rms_norm, rotary_embedding_, store_kvcache
from minillm.kernels.rope_store import rotary_and_store_kvcache_


def _cos_sin_cache(max_pos, d):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _case(device, dtype, cache_dtype, tokens=5, heads=6, kv_heads=3, d=16, block_size=4, num_blocks=6):
    g = torch.Generator().manual_seed(7)
    qkv = (4 * torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g)).to(device, dtype)  # one projection
    q = qkv[:, :heads * d].view(tokens, heads, d)
    k = qkv[:, heads * d:(heads + kv_heads) * d].view(tokens, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d:].view(tokens, kv_heads, d)
    positions = torch.tensor([3, 0, 17, 40, 63][:tokens], device=device)
    slots = torch.tensor([5, -1, 0, 22, 9][:tokens], device=device)  # -1: a padding token, not stored
    caches = [torch.zeros(num_blocks, block_size, kv_heads, d, device=device).to(cache_dtype) for _ in range(2)]
    return qkv, q, k, v, positions, slots, caches


def _both(device, dtype, cache_dtype, scales, norms=None):
    """(qkv, k cache, v cache) after the two launches, and after the fused one, from the same inputs; `norms`
    (q gain, k gain, eps): the q/k norms first (rms_norm's kernel) or inside the fused launch."""
    results = []
    for fused in (False, True):
        qkv, q, k, v, positions, slots, (kc, vc) = _case(device, dtype, cache_dtype)
        cos_sin = _cos_sin_cache(64, q.shape[-1]).to(device)
        if fused:
            rotary_and_store_kvcache_(positions, q, k, v, cos_sin, kc, vc, slots, *scales, qk_norm=norms)
        else:
            if norms is not None:
                for x, gain in ((q, norms[0]), (k, norms[1])):
                    x.copy_(rms_norm(x.reshape(-1, x.shape[-1]), gain, norms[2]).view(x.shape))
            rotary_embedding_(positions, q, k, cos_sin)
            store_kvcache(k, v, kc, vc, slots, *scales)
        results.append((qkv, kc, vc))
    return results


@pytest.mark.parametrize("cache_dtype,scales", [(torch.float32, (None, None)),
                                                (torch.float8_e4m3fn, (None, None)),
                                                (torch.float8_e4m3fn, (torch.tensor([0.5, 2.0, 0.03]), 0.7))],
                         ids=["same-dtype", "fp8", "fp8-scaled"])
def test_fused_equals_rotary_then_store(cache_dtype, scales):
    (qkv_a, kc_a, vc_a), (qkv_b, kc_b, vc_b) = _both("cpu", torch.float32, cache_dtype, scales)
    assert torch.equal(qkv_a, qkv_b)  # q and k rotated in place identically, v untouched
    assert torch.equal(kc_a.view(torch.uint8), kc_b.view(torch.uint8))
    assert torch.equal(vc_a.view(torch.uint8), vc_b.view(torch.uint8))
    assert kc_b.float().abs().sum() > 0  # something was stored (a test that cannot pass vacuously)


def _gains(device, d=16):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(d, generator=g) * 2).to(device), (torch.rand(d, generator=g) * 2).to(device), 1e-6


def test_fused_qk_norm_equals_norm_then_rotary_then_store():
    """Qwen3's per-head norms inside the launch: what rms_norm over each head, then RoPE and the store give, to
    fp32 rounding (each head's sum of squares is added up in two halves here, in one row there)."""
    (qkv_a, kc_a, vc_a), (qkv_b, kc_b, vc_b) = _both("cpu", torch.float32, torch.float32, (None, None), _gains("cpu"))
    torch.testing.assert_close(qkv_b, qkv_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kc_b, kc_a, rtol=1e-5, atol=1e-6)
    assert torch.equal(vc_a, vc_b)
    plain = _both("cpu", torch.float32, torch.float32, (None, None))[1][0]
    assert (plain - qkv_b).abs().max() > 0.1  # the norms did run (inputs of scale 4, gains in [0, 2])
    qkv, q, k, v, positions, slots, (kc, vc) = _case("cpu", torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"qk_norm gains must be contiguous \[16\]"):
        rotary_and_store_kvcache_(positions, q, k, v, _cos_sin_cache(64, 16), kc, vc, slots,
                                  qk_norm=(torch.ones(8), torch.ones(16), 1e-6))


def test_fused_rejects_mismatched_cache():
    qkv, q, k, v, positions, slots, (kc, vc) = _case("cpu", torch.float32, torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        rotary_and_store_kvcache_(positions, q, k, v, _cos_sin_cache(64, 16), kc[..., :8], vc[..., :8], slots)
    with pytest.raises(ValueError, match="positions"):
        rotary_and_store_kvcache_(positions[:2], q, k, v, _cos_sin_cache(64, 16), kc, vc, slots)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_fused_equals_rotary_then_store_gpu(cache_dtype):
    scales = (torch.tensor([0.5, 2.0, 0.03]), 0.7) if cache_dtype == torch.float8_e4m3fn else (None, None)
    (qkv_a, kc_a, vc_a), (qkv_b, kc_b, vc_b) = _both("cuda", torch.bfloat16, cache_dtype, scales)
    assert torch.equal(qkv_a, qkv_b)
    assert torch.equal(kc_a.view(torch.uint8), kc_b.view(torch.uint8))
    assert torch.equal(vc_a.view(torch.uint8), vc_b.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_qk_norm_gpu_bf16():
    """On the GPU in bf16: the normalised heads are rounded to bf16 before the rotation in both paths, so at most
    the last bit of a value can differ (a sum of squares added in another order)."""
    (qkv_a, kc_a, _), (qkv_b, kc_b, _) = _both("cuda", torch.bfloat16, torch.bfloat16, (None, None), _gains("cuda"))
    torch.testing.assert_close(qkv_b, qkv_a, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(kc_b, kc_a, rtol=8e-3, atol=1e-2)
    assert (qkv_a != qkv_b).float().mean() < 0.02
