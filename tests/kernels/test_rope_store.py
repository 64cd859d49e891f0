"""The fused RoPE + KV-cache store (kernels/rope_store.py) against the two launches it replaces, bit for bit."""
import pytest
import torch

from minillm.kernels.fused import rotary_embedding_, store_kvcache
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


def _both(device, dtype, cache_dtype, scales):
    """(qkv, k cache, v cache) after the two launches, and after the fused one, from the same inputs."""
    results = []
    for fused in (False, True):
        qkv, q, k, v, positions, slots, (kc, vc) = _case(device, dtype, cache_dtype)
        cos_sin = _cos_sin_cache(64, q.shape[-1]).to(device)
        if fused:
            rotary_and_store_kvcache_(positions, q, k, v, cos_sin, kc, vc, slots, *scales)
        else:
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
