"""The per-step shortcuts of the torch path at batch 1: the decode gather plan (one per step, keys read in place
from consecutive blocks), the step memo that carries it from layer to layer, and RoPE rotated in place.

Each must give what the plain path gives: the plan's in-place keys the gathered keys, a reused plan a fresh one's
output, the four-op rotation `apply_rotary` bit for bit; and none may outlive its step.
"""
from __future__ import annotations

import pytest
import torch

from minillm.forward_context import AttentionMetadata, forward_context
from minillm.hooks import overriding
from minillm.layers.attention import Attention, attention_reference, gather_kv
from minillm.layers.decode_attention import decode_gather_plan, padded_decode_attention
from minillm.layers.rotary import RotaryEmbedding, apply_rotary

H, KVH, D, BLOCK = 6, 2, 8, 4


def _cache(num_blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, BLOCK, KVH, D, generator=g), torch.randn(num_blocks, BLOCK, KVH, D, generator=g)


@pytest.mark.parametrize("seq_len", [1, 4, 5, 11])  # one token, exactly one block, one past, several
def test_consecutive_blocks_are_read_in_place_and_match_the_reference(seq_len):
    k_cache, v_cache = _cache(12, seed=seq_len)
    table = torch.tensor([[3, 4, 5, -1]], dtype=torch.int32)
    plan = decode_gather_plan(table, torch.tensor([seq_len], dtype=torch.int32), seq_len, 1, BLOCK)
    assert plan.start == 3 * BLOCK and plan.slots is None and plan.mask is None
    q = torch.randn(1, H, D, generator=torch.Generator().manual_seed(1))
    out = padded_decode_attention(q, k_cache, v_cache, table, torch.tensor([seq_len]), seq_len, 1, D ** -0.5,
                                  plan=plan)
    expected = attention_reference(q, gather_kv(k_cache, table[0], seq_len), gather_kv(v_cache, table[0], seq_len))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_scattered_blocks_and_batches_take_the_gather():
    table = torch.tensor([[3, 7, 5]], dtype=torch.int32)  # not consecutive
    assert decode_gather_plan(table, torch.tensor([9]), 9, 1, BLOCK).start is None
    two = torch.tensor([[3, 4, 5], [6, 7, 8]], dtype=torch.int32)  # two sequences: always gathered and masked
    plan = decode_gather_plan(two, torch.tensor([9, 6]), 9, 1, BLOCK)
    assert plan.start is None and plan.mask.shape == (2, 1, 1, 9) and plan.mask[1, 0, 0].sum() == 6
    with pytest.raises(ValueError, match="max_seq_len 13 needs 4 blocks"):
        decode_gather_plan(two, torch.tensor([13, 6]), 13, 1, BLOCK)
    with pytest.raises(ValueError, match="this call has 1, 1, 9"):
        padded_decode_attention(torch.zeros(1, H, D), *_cache(12, 0), table, torch.tensor([9]), 9, 1, 1.0, plan=plan)


def _metadata(table: torch.Tensor, seq_len: int) -> AttentionMetadata:
    slot = int(table[0, (seq_len - 1) // BLOCK]) * BLOCK + (seq_len - 1) % BLOCK
    return AttentionMetadata(cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32),
                             seq_lens=torch.tensor([seq_len], dtype=torch.int32), max_seqlen_q=1, max_seqlen_k=seq_len,
                             slot_mapping=torch.tensor([slot]), block_tables=table, block_size=BLOCK,
                             seq_lens_list=[seq_len], query_lens_list=[1])


def test_the_step_memo_serves_every_layer_and_is_emptied_for_the_next_step():
    k_cache, v_cache = _cache(12, seed=7)
    table = torch.tensor([[2, 3, -1]], dtype=torch.int32)
    layers = [Attention(H, KVH, D, backend=b) for b in ("torch", "torch", "reference")]
    for layer in layers:
        layer.k_cache, layer.v_cache = k_cache.clone(), v_cache.clone()
    g = torch.Generator().manual_seed(3)
    meta = _metadata(table, 6)
    starts = []
    for step in range(2):  # the same metadata object entered twice, its table changed in between
        q, k, v = (torch.randn(1, n, D, generator=g) for n in (H, KVH, KVH))
        with forward_context(meta):
            outs = [layer(q, k, v) for layer in layers]
            starts.append(meta.step_memo[("decode_plan", None)].start)
            assert meta.step_memo["all_stored"]
        torch.testing.assert_close(outs[0], outs[2], rtol=1e-5, atol=1e-5)  # torch (planned) vs reference
        assert torch.equal(outs[0], outs[1])  # the second layer reused the first one's plan
        table[0, :2] = torch.tensor([5, 9], dtype=torch.int32)  # the next step: scattered blocks
        meta.slot_mapping.fill_(9 * BLOCK + 1)
    assert starts == [2 * BLOCK, None]  # the second step planned afresh, not served the first one's plan


def _qkv_views(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv = torch.randn(tokens, (H + 2 * KVH) * D, generator=torch.Generator().manual_seed(seed))
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
    return qkv, q.view(tokens, H, D), k.view(tokens, KVH, D)


def test_rope_in_place_on_a_qkv_output_is_bit_identical_to_the_exercise():
    rope = RotaryEmbedding(D, 64, base=1e4, backend="torch")
    positions = torch.tensor([0, 5, 17, 63])
    qkv, q, k = _qkv_views(4, seed=1)
    untouched = qkv.clone()
    cos, sin = rope.cos_sin(positions)
    expected_q, expected_k = apply_rotary(q.clone(), cos, sin), apply_rotary(k.clone(), cos, sin)
    rope.remember_positions(positions)
    try:
        q_rot, k_rot = rope(positions, q, k)
    finally:
        rope.forget_positions()
    assert torch.equal(q_rot, expected_q) and torch.equal(k_rot, expected_k)
    assert q_rot.data_ptr() == q.data_ptr()  # rotated where it lay: the qkv output itself
    assert torch.equal(qkv[:, (H + KVH) * D:], untouched[:, (H + KVH) * D:])  # v is left alone
    separate_q, separate_k = torch.randn(4, H, D), torch.randn(4, KVH, D)
    before = separate_q.clone()
    rope(positions, separate_q, separate_k)
    assert torch.equal(separate_q, before)  # not neighbours: new tensors, the inputs unchanged


def test_rope_override_takes_the_exercise_path():
    calls = []

    def my_rope(x, cos, sin):
        calls.append(tuple(x.shape))
        return apply_rotary(x, cos, sin)
    _, q, k = _qkv_views(3, seed=2)
    with overriding({"ch01.rope": my_rope}):
        RotaryEmbedding(D, 16, backend="torch")(torch.tensor([1, 2, 3]), q, k)
    assert calls == [(3, H + KVH, D)]
