"""Layer tests: RMSNorm, RoPE (+ llama3/linear scaling), causal mask, and attention over a paged KV cache."""
from __future__ import annotations

import math

import pytest
import torch

from minillm.forward_context import AttentionMetadata, forward_context, prefill_metadata
from minillm.layers.activation import silu_and_mul
from minillm.layers.attention import Attention, attention_reference, causal_mask, sdpa_attention
from minillm.layers.norm import RMSNorm, rms_norm
from minillm.layers.rotary import RotaryEmbedding, apply_rotary, rope_attention_factor, rope_inv_freq


# ---------------------------------------------------------------- norm and activation

def test_rms_norm_matches_formula():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 33, generator=g), torch.randn(33, generator=g)
    x64, w64 = x.double(), w.double()
    expected = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5) * w64
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (out.double() - expected).abs().max() < 1e-5
    assert (rms_norm(torch.zeros(2, 33), w, 1e-5) == 0).all()  # eps keeps the zero vector finite


def test_rms_norm_bf16_keeps_dtype_and_accumulates_in_fp32():
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 577, generator=g) * 40).to(torch.bfloat16)
    w = torch.ones(577, dtype=torch.bfloat16)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.bfloat16
    x64 = x.double()
    expected = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-6)
    assert (out.double() - expected).abs().max() < 2e-2  # one bf16 rounding of values of size ~1


def test_rmsnorm_module_fuses_residual_add():
    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(48, eps=1e-6)
    norm.weight.data = torch.randn(48, generator=g)
    x, res = torch.randn(9, 48, generator=g), torch.randn(9, 48, generator=g)
    normed, new_res = norm(x, res)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(normed, rms_norm(x + res, norm.weight, 1e-6))
    torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, 1e-6))
    with pytest.raises(ValueError, match="last dimension 48"):
        norm(torch.zeros(3, 47))


def test_silu_and_mul():
    x = torch.randn(4, 2 * 37, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(silu_and_mul(x), torch.nn.functional.silu(x[:, :37]) * x[:, 37:])
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 5))


# ---------------------------------------------------------------- rotary

def _rope_complex(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Channel pair (i, i + D/2) as the complex number x_i + j x_{i+D/2}, multiplied by e^{j pos inv_freq_i}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    angle = positions.double()[:, None] * inv_freq.double()[None, :]
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def test_rope_matches_complex_rotation():
    g = torch.Generator().manual_seed(4)
    head_dim, base = 24, 10000.0
    rope = RotaryEmbedding(head_dim, max_position=700, base=base)
    positions = torch.tensor([0, 1, 5, 17, 16, 699, 300])
    q = torch.randn(7, 5, head_dim, generator=g)
    k = torch.randn(7, 1, head_dim, generator=g)
    q_rot, k_rot = rope(positions, q, k)
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    assert (q_rot.double() - _rope_complex(q, positions, inv_freq)).abs().max() < 1e-4
    assert (k_rot.double() - _rope_complex(k, positions, inv_freq)).abs().max() < 1e-4
    torch.testing.assert_close(q_rot[0], q[0])  # position 0 is the identity rotation


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(5)
    rope = RotaryEmbedding(16, max_position=64, base=100.0)
    q, k = torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g)
    scores = []
    for shift in (0, 9, 40):
        qr, _ = rope(torch.tensor([3 + shift]), q, k)
        _, kr = rope(torch.tensor([1 + shift]), q, k)
        scores.append(float((qr * kr).sum()))
    assert max(scores) - min(scores) < 1e-4


def test_apply_rotary_keeps_dtype():
    x = torch.randn(3, 2, 8).to(torch.bfloat16)
    cos, sin = torch.ones(3, 4), torch.zeros(3, 4)
    out = apply_rotary(x, cos, sin)
    assert out.dtype == torch.bfloat16 and torch.equal(out, x)


def _hf_inv_freq(rope_parameters: dict, head_dim: int) -> tuple[torch.Tensor, float]:
    """transformers' (inv_freq, attention factor) for these rope parameters."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=131072, rope_parameters=rope_parameters)
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, "cpu")


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.2's values
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},  # Qwen3's long context
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},  # DeepSeek-V3's
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192, "mscale": 1.0,
     "mscale_all_dim": 0.5},
])
def test_rope_scaling_frequencies_match_transformers(scaling):
    theta, head_dim = 500000.0, 128
    ours = rope_inv_freq(head_dim, theta, scaling)
    theirs, attention_factor = _hf_inv_freq({**scaling, "rope_theta": theta}, head_dim)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=0)
    assert rope_attention_factor(scaling) == pytest.approx(attention_factor, rel=1e-12)
    table = RotaryEmbedding(head_dim, 16, theta, scaling).cos_sin_cache
    assert float(table[0, 0]) == pytest.approx(attention_factor)  # cos(0), scaled as transformers scales it
    plain = rope_inv_freq(head_dim, theta)
    assert not torch.allclose(ours, plain)  # scaling did something
    if scaling["rope_type"] == "llama3":
        assert ours[0] == plain[0] and torch.isclose(ours[-1], plain[-1] / scaling["factor"])


def test_rope_scaling_errors_name_the_problem():
    with pytest.raises(ValueError, match="dynamic"):
        rope_inv_freq(64, 1e4, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope_inv_freq(64, 1e4, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(64, 1e4, {"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        RotaryEmbedding(8, 32)(torch.tensor([32]), torch.zeros(1, 1, 8), torch.zeros(1, 1, 8))


# ---------------------------------------------------------------- causal mask and attention

@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 17), (5, 5), (7, 17), (16, 33)])
def test_causal_mask_bottom_right(q_len, kv_len):
    mask = causal_mask(q_len, kv_len)
    assert mask.shape == (q_len, kv_len) and mask.dtype == torch.bool
    for i in range(q_len):
        position = kv_len - q_len + i
        assert mask[i, : position + 1].all() and not mask[i, position + 1:].any()
    if q_len == 1:
        assert mask.all()  # a decode step sees everything
    with pytest.raises(ValueError, match="q_len=3, kv_len=2"):
        causal_mask(3, 2)


def test_attention_reference_gqa_against_explicit_loop():
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(5, 6, 8, generator=g), torch.randn(9, 2, 8, generator=g), torch.randn(9, 2, 8, generator=g)
    out = attention_reference(q, k, v, scale=0.3)
    for h in range(6):
        kv = h // 3  # query heads 0-2 read kv head 0, 3-5 kv head 1
        scores = q[:, h] @ k[:, kv].T * 0.3
        for i in range(5):
            scores[i, 9 - 5 + i + 1:] = -math.inf
        torch.testing.assert_close(out[:, h], torch.softmax(scores, -1) @ v[:, kv], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v, scale=0.3), out, rtol=1e-5, atol=1e-5)


H, KVH, D, BLOCK = 6, 2, 8, 16


def _random_qkv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, H, D, generator=g), torch.randn(n, KVH, D, generator=g), torch.randn(n, KVH, D, generator=g))


def _paged_metadata(seq_lens, q_lens, block_tables):
    """Metadata for sequences whose last q_lens[i] tokens are new; slots from the block tables."""
    slots = []
    for i, (s, q) in enumerate(zip(seq_lens, q_lens)):
        slots += [int(block_tables[i, p // BLOCK]) * BLOCK + p % BLOCK for p in range(s - q, s)]
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    return AttentionMetadata(cu_seqlens_q=cu, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                             max_seqlen_q=max(q_lens), max_seqlen_k=max(seq_lens),
                             slot_mapping=torch.tensor(slots, dtype=torch.int64),
                             block_tables=block_tables, block_size=BLOCK,
                             seq_lens_list=list(seq_lens), query_lens_list=list(q_lens))


def _attention_with_cache(num_blocks: int, backend: str = "torch") -> Attention:
    attn = Attention(H, KVH, D, backend=backend)
    attn.k_cache = torch.zeros(num_blocks, BLOCK, KVH, D)
    attn.v_cache = torch.zeros(num_blocks, BLOCK, KVH, D)
    return attn


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_paged_prefill_equals_cacheless(backend):
    lens = [1, 16, 17, 33]  # one token, exactly one block, one past a block, two blocks and one
    q, k, v = _random_qkv(sum(lens), seed=7)
    cacheless = Attention(H, KVH, D, backend=backend)
    with forward_context(prefill_metadata(lens)):
        expected = cacheless(q, k, v)
    # scatter the sequences over a shuffled pool, so block ids are neither contiguous nor ordered
    pool = torch.randperm(12, generator=torch.Generator().manual_seed(8)).tolist()
    block_tables = torch.full((4, 3), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        for j in range(-(-n // BLOCK)):
            block_tables[i, j] = pool.pop()
    attn = _attention_with_cache(12, backend)
    with forward_context(_paged_metadata(lens, lens, block_tables)):
        out = attn(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # and each sequence equals the one-sequence reference
    start = 0
    for n in lens:
        ref = attention_reference(q[start:start + n], k[start:start + n], v[start:start + n], D ** -0.5)
        torch.testing.assert_close(out[start:start + n], ref, rtol=1e-5, atol=1e-5)
        start += n


def test_chunked_prefill_and_decode_through_cache():
    q, k, v = _random_qkv(18, seed=9)
    with forward_context(prefill_metadata([18])):
        expected = Attention(H, KVH, D)(q, k, v)
    attn = _attention_with_cache(5)
    table = torch.tensor([[3, 1, -1]], dtype=torch.int32)
    outputs = []
    for start, end in ((0, 10), (10, 17), (17, 18)):  # prefill 10, a 7-token chunk, then one decode step
        with forward_context(_paged_metadata([end], [end - start], table)):
            outputs.append(attn(q[start:end], k[start:end], v[start:end]))
    torch.testing.assert_close(torch.cat(outputs), expected, rtol=1e-5, atol=1e-5)


def test_slot_minus_one_is_not_stored_and_no_context_means_one_sequence():
    q, k, v = _random_qkv(3, seed=10)
    attn = _attention_with_cache(2)
    meta = prefill_metadata([3])
    meta.slot_mapping = torch.tensor([0, -1, 2])
    with forward_context(meta):  # no block_tables: a fresh prefill attends to its own k/v
        out = attn(q, k, v)
    assert torch.equal(attn.k_cache[0, 0], k[0]) and torch.equal(attn.k_cache[0, 2], k[2])
    assert attn.k_cache[0, 1].abs().sum() == 0
    torch.testing.assert_close(Attention(H, KVH, D)(q, k, v), out)  # no forward context at all


def test_attention_rejects_inconsistent_input():
    q, k, v = _random_qkv(4, seed=11)
    with pytest.raises(ValueError, match="kv_heads|k and v"):
        Attention(H, 3, D)(q, k, v)
    with forward_context(prefill_metadata([2, 3])), pytest.raises(ValueError, match="5 query tokens"):
        Attention(H, KVH, D)(q, k, v)
    meta = _paged_metadata([6], [4], torch.tensor([[0]], dtype=torch.int32))
    meta.slot_mapping = None
    with forward_context(meta), pytest.raises(ValueError, match="need a KV cache"):
        Attention(H, KVH, D)(q, k, v)
