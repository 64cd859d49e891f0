"""The CPU (torch backend) fast paths: batched decode attention, the fused fp32 RMSNorm, RoPE's per-forward cos/sin.

Each shortcut must give what the plain path gives: the batched decode step what the per-sequence loop and the
reference give, torch.rms_norm exactly what the exercise's formula gives, the remembered cos/sin exactly the
lookup; and a learner's override (the course's hook) must still be called, never bypassed.
"""
from __future__ import annotations

import pytest
import torch

from minillm.forward_context import AttentionMetadata, forward_context
from minillm.hooks import overriding
from minillm.layers.attention import (Attention, attention_reference, causal_mask, gather_kv,
                                      padded_decode_attention)
from minillm.layers.kv_quant import FP8_E4M3_MAX
from minillm.layers.norm import RMSNorm, rms_norm
from minillm.layers.rotary import RotaryEmbedding, apply_rotary

H, KVH, D, BLOCK = 6, 2, 8, 4


def _pool(seq_lens: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A shuffled pool of random keys/values and block tables (-1 padded) holding sequences of these lengths."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK) for n in seq_lens]
    pool = torch.randperm(sum(need) + 3, generator=g).tolist()
    tables = torch.full((len(seq_lens), max(need) + 1), -1, dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor([pool.pop() for _ in range(n)], dtype=torch.int32)
    shape = (sum(need) + 3, BLOCK, KVH, D)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), tables


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("seq_lens", [[5], [1, 4, 5, 9, 13]])  # one token, exactly one block, one past, ...
def test_padded_decode_attention_matches_each_sequence(seq_lens, q_len):
    seq_lens = [max(n, q_len) for n in seq_lens]
    k_cache, v_cache, tables = _pool(seq_lens, seed=len(seq_lens) + q_len)
    q = torch.randn(len(seq_lens) * q_len, H, D, generator=torch.Generator().manual_seed(5))
    out = padded_decode_attention(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32),
                                  max(seq_lens), q_len, D ** -0.5)
    for i, n in enumerate(seq_lens):
        rows = slice(i * q_len, (i + 1) * q_len)
        expected = attention_reference(q[rows], gather_kv(k_cache, tables[i], n), gather_kv(v_cache, tables[i], n))
        torch.testing.assert_close(out[rows], expected, rtol=1e-5, atol=1e-5)


def test_padded_decode_attention_fp8_cache_dequantizes():
    seq_lens = [3, 7]
    k_cache, v_cache, tables = _pool(seq_lens, seed=11)
    k_scale, v_scale = k_cache.abs().amax((0, 1, 3)) / FP8_E4M3_MAX, v_cache.abs().amax((0, 1, 3)) / FP8_E4M3_MAX
    k8 = (k_cache / k_scale[:, None]).to(torch.float8_e4m3fn)
    v8 = (v_cache / v_scale[:, None]).to(torch.float8_e4m3fn)
    q = torch.randn(2, H, D, generator=torch.Generator().manual_seed(6))
    out = padded_decode_attention(q, k8, v8, tables, torch.tensor(seq_lens, dtype=torch.int32), 7, 1, D ** -0.5,
                                  k_scale, v_scale)
    for i, n in enumerate(seq_lens):
        k = gather_kv(k8, tables[i], n).float() * k_scale[:, None]
        v = gather_kv(v8, tables[i], n).float() * v_scale[:, None]
        torch.testing.assert_close(out[i:i + 1], attention_reference(q[i:i + 1], k, v), rtol=1e-5, atol=1e-5)


def test_padded_decode_attention_rejects_a_wrong_row_count():
    k_cache, v_cache, tables = _pool([4, 4], seed=1)
    with pytest.raises(ValueError, match="q has 3 rows, expected 2 sequences x q_len 1"):
        padded_decode_attention(torch.zeros(3, H, D), k_cache, v_cache, tables, torch.tensor([4, 4]), 4, 1, 1.0)


def _decode_metadata(seq_lens: list[int], q_len: int, tables: torch.Tensor) -> AttentionMetadata:
    slots = [int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK for i, n in enumerate(seq_lens) for p in range(n - q_len, n)]
    return AttentionMetadata(
        cu_seqlens_q=torch.arange(len(seq_lens) + 1, dtype=torch.int32) * q_len,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), max_seqlen_q=q_len, max_seqlen_k=max(seq_lens),
        slot_mapping=torch.tensor(slots), block_tables=tables, block_size=BLOCK, seq_lens_list=list(seq_lens),
        query_lens_list=[q_len] * len(seq_lens))


@pytest.mark.parametrize("q_len", [1, 2])
def test_attention_module_batched_decode_equals_reference_backend(q_len):
    """The torch backend takes the batched path, the reference backend the per-sequence loop: same outputs."""
    seq_lens = [2, 6, 9]
    k_cache, v_cache, tables = _pool(seq_lens, seed=3)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3 * q_len, n, D, generator=g) for n in (H, KVH, KVH))
    outs = {}
    for backend in ("torch", "reference"):
        attn = Attention(H, KVH, D, backend=backend)
        attn.k_cache, attn.v_cache = k_cache.clone(), v_cache.clone()
        with forward_context(_decode_metadata(seq_lens, q_len, tables)):
            outs[backend] = attn(q, k, v)
    torch.testing.assert_close(outs["torch"], outs["reference"], rtol=1e-5, atol=1e-5)


def test_a_learners_causal_mask_still_reaches_verify_steps():
    seq_lens = [5, 7]
    k_cache, v_cache, tables = _pool(seq_lens, seed=8)
    attn = Attention(H, KVH, D, backend="torch")
    attn.k_cache, attn.v_cache = k_cache, v_cache
    calls = []

    def my_mask(q_len, kv_len, device=None):
        calls.append((q_len, kv_len))
        return causal_mask(q_len, kv_len, device)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(6, n, D, generator=g) for n in (H, KVH, KVH))
    with overriding({"ch02.causal_mask": my_mask}), forward_context(_decode_metadata(seq_lens, 3, tables)):
        attn(q, k, v)
    assert calls == [(3, 5), (3, 7)]


def test_fused_rms_norm_is_bit_identical_to_the_exercise_formula():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(576, eps=1e-5, backend="torch")
    norm.weight.data = torch.randn(576, generator=g)
    for rows in (1, 8, 37):
        x, residual = torch.randn(rows, 576, generator=g) * 3, torch.randn(rows, 576, generator=g)
        assert torch.equal(norm(x), rms_norm(x, norm.weight, 1e-5))
        out, summed = norm(x, residual)
        assert torch.equal(out, rms_norm(x + residual, norm.weight, 1e-5)) and torch.equal(summed, x + residual)


def test_rms_norm_override_still_called():
    norm = RMSNorm(16, backend="torch")
    calls = []

    def my_norm(x, weight, eps):
        calls.append(x.shape)
        return rms_norm(x, weight, eps)
    with overriding({"ch01.rms_norm": my_norm}):
        norm(torch.randn(3, 16))
    assert calls == [torch.Size([3, 16])]


def test_rope_remembered_positions_give_the_same_rotation_and_are_forgotten():
    rope = RotaryEmbedding(D, 64, base=1e4, backend="torch")
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(5, H, D, generator=g), torch.randn(5, KVH, D, generator=g)
    positions = torch.tensor([0, 3, 9, 10, 63])
    plain = rope(positions, q, k)
    cos, sin = rope.cos_sin(positions)
    torch.testing.assert_close(plain[0], apply_rotary(q, cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(plain[1], apply_rotary(k, cos, sin), rtol=0, atol=0)
    rope.remember_positions(positions)
    try:
        first, second = rope(positions, q, k), rope(positions, q, k)  # the second call reuses the lookup
        other = torch.tensor([1, 2, 3, 4, 5])
        moved = rope(other, q, k)  # another positions tensor: looked up afresh
    finally:
        rope.forget_positions()
    for got in (first, second):
        assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    cos, sin = rope.cos_sin(other)
    assert torch.equal(moved[0], apply_rotary(q, cos, sin))
    assert rope._cos_sin_memo is None
    with pytest.raises(ValueError, match="rotary positions"):
        rope(torch.tensor([0, 1, 2, 3, 64]), q, k)
