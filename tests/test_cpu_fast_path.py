"""The CPU (torch backend) fast paths: batched decode attention, the fused fp32 RMSNorm, RoPE's per-forward cos/sin,
the matmul layouts of minillm.layers.cpu_matmul.

Each shortcut must give what the plain path gives: the batched decode step what the per-sequence loop and the
reference give, torch.rms_norm exactly what the exercise's formula gives, the remembered cos/sin exactly the
lookup, every matmul layout F.linear up to fp32 summation order; and a learner's override (the course's hook)
must still be called, never bypassed.
"""
from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

import minillm.layers.cpu_matmul as cpu_matmul
from minillm.forward_context import AttentionMetadata, forward_context
from minillm.hooks import overriding
from minillm.layers.attention import (Attention, attention_reference, causal_mask, gather_kv,
                                      padded_decode_attention)
from minillm.layers.cpu_matmul import (CPU_MATMUL_CANDIDATES, cpu_matmul_decisions, cpu_matmul_extra_bytes,
                                       cpu_matmul_mode, row_class, set_cpu_matmul_mode)
from minillm.layers.embedding import LMHead
from minillm.layers.kv_quant import FP8_E4M3_MAX
from minillm.layers.linear import Linear, dense_linear
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


@pytest.fixture
def matmul_mode():
    """Set a CPU matmul mode for one test; afterwards back to the environment's, with the caches emptied."""
    yield set_cpu_matmul_mode
    cpu_matmul._mode = None
    cpu_matmul.clear_cpu_matmul_cache()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("candidate", CPU_MATMUL_CANDIDATES)
def test_every_cpu_matmul_candidate_equals_f_linear(matmul_mode, candidate, bias):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(256, 320, generator=g)  # 81920 elements: above MIN_ELEMENTS
    b = torch.randn(256, generator=g) if bias else None
    matmul_mode(candidate)
    for shape in ((1, 320), (3, 320), (2, 10, 320)):  # row classes 1, 2-16 and 17+ (a 3-D input)
        x = torch.randn(*shape, generator=g)
        got = dense_linear(x, weight, b)
        assert got.shape == (*shape[:-1], 256) and got.is_contiguous()
        torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)
    copies = candidate == "transposed" or (candidate == "onednn" and cpu_matmul._onednn_available())
    assert (cpu_matmul_extra_bytes() > 0) == copies  # only these two keep a re-laid-out weight


def test_cpu_matmul_decision_is_timed_once_per_shape_and_row_class(matmul_mode, monkeypatch):
    matmul_mode("auto")
    timed = []
    real_decide = cpu_matmul._decide

    def counting(x2, weight, bias, rows_class):
        timed.append((tuple(weight.shape), rows_class))
        return real_decide(x2, weight, bias, rows_class)
    monkeypatch.setattr(cpu_matmul, "_decide", counting)
    g = torch.Generator().manual_seed(2)
    layers = [Linear(320, 256) for _ in range(2)]  # two layers of one shape share the decision
    for layer in layers:
        layer.weight.data.normal_(generator=g)
    for rows in (1, 1, 4, 8, 1):
        x = torch.randn(rows, 320, generator=g)
        for layer in layers:
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-4)
    assert timed == [((256, 320), "1"), ((256, 320), "2-16")]
    decisions = cpu_matmul_decisions()
    assert set(decisions) == {(256, 320, False, "1"), (256, 320, False, "2-16")}
    assert set(decisions.values()) <= set(CPU_MATMUL_CANDIDATES)
    assert [row_class(m) for m in (1, 2, 16, 17)] == ["1", "2-16", "2-16", "17+"]
    with pytest.raises(ValueError, match="rows must be >= 1, got 0"):
        row_class(0)


def test_cpu_matmul_copies_follow_an_in_place_weight_update(matmul_mode):
    matmul_mode("transposed")
    head = LMHead(256, 320)
    head.weight.data.normal_()
    x = torch.randn(1, 320)
    head(x)
    with torch.no_grad():
        head.weight.mul_(-2.0)  # bumps the version counter: the transposed copy is stale
    torch.testing.assert_close(head(x), F.linear(x, head.weight), rtol=1e-5, atol=1e-4)
    assert cpu_matmul_extra_bytes() == head.weight.numel() * 4  # the stale copy replaced, not kept beside


@pytest.mark.parametrize("write", ["copy", "mask"])
def test_cpu_matmul_copies_follow_writes_through_data(matmul_mode, write):
    """GPTQ, AWQ, SmoothQuant and pruning run calibration batches through a layer, then write its weight through
    `.data`, which does not move the version counter: the copy must still be dropped."""
    matmul_mode("transposed")
    g = torch.Generator().manual_seed(3)
    layer = Linear(320, 256)
    layer.weight.data.normal_(generator=g)
    x = torch.randn(1, 320, generator=g)
    layer(x)  # the calibration forward lays out the copy
    if write == "copy":
        layer.weight.data.copy_(torch.randn(256, 320, generator=g))  # GPTQ's dequantized result
    else:
        layer.weight.data.mul_((torch.rand(256, 320, generator=g) > 0.5).float())  # a 50% pruning mask
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-4)


def test_cpu_matmul_switch_env_and_errors(matmul_mode, monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_mode", None)
    monkeypatch.setenv("MINILLM_CPU_MATMUL", "MM")
    assert cpu_matmul_mode() == "mm"
    monkeypatch.setattr(cpu_matmul, "_mode", None)
    monkeypatch.setenv("MINILLM_CPU_MATMUL", "fast")
    with pytest.raises(ValueError, match="MINILLM_CPU_MATMUL must be one of auto, linear.*got 'fast'"):
        cpu_matmul_mode()
    with pytest.raises(ValueError, match="CPU matmul mode must be one of .*got 'gemv'"):
        set_cpu_matmul_mode("gemv")


def test_cpu_matmul_leaves_autograd_small_weights_and_other_dtypes_to_f_linear(matmul_mode, monkeypatch):
    matmul_mode("auto")
    monkeypatch.setattr(cpu_matmul, "_decide", lambda *a: pytest.fail("timed a matmul F.linear must do"))
    weight = torch.randn(256, 320, requires_grad=True)
    x = torch.randn(2, 320)
    y = dense_linear(x, weight)  # autograd needs W's gradient: the copies have no backward
    y.sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(0).expand(256, 320))
    small = torch.randn(24, 32)  # below MIN_ELEMENTS
    x = torch.randn(1, 32)
    assert torch.equal(dense_linear(x, small), F.linear(x, small))
    x16, w16 = torch.randn(1, 320, dtype=torch.bfloat16), torch.randn(256, 320, dtype=torch.bfloat16)
    assert torch.equal(dense_linear(x16, w16), F.linear(x16, w16))
    assert cpu_matmul_decisions() == {}
