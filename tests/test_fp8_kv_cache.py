"""The FP8 KV cache (`kv_cache_dtype="fp8"`): pool, write path, every read path, engine outputs.

CPU, fp32 models, Triton through the interpreter where a test says so. Ground truth for "correct" is a torch
reference that dequantises the very bytes the cache holds (exact up to fp32 rounding) for the kernels and
layers, and a cache-less full forward (exact K/V) for the engine, compared on the fp8 run's own tokens:
log-probabilities within LOGPROB_TOL, and every greedy choice the exact argmax or within LOGPROB_TOL of it.
"""
from __future__ import annotations

import logging

import pytest
import torch
import triton
import triton.language as tl

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.kv_cache import KVCache, kv_bytes_per_block, num_device_blocks
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import RandomWeights
from minillm.forward_context import AttentionMetadata, forward_context
from minillm.kernels.fp8_kv_tile import _fp8_tile
from minillm.kernels.paged_attention import paged_decode_attention
from minillm.layers.attention import Attention, attention_reference
from minillm.layers.kv_quant import FP8_E4M3_MAX, dequantize_kv, quantize_kv
from minillm.models.llama import LlamaForCausalLM
from minillm.sampling_params import SamplingParams
from tiny import EOS, ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)

FP8 = torch.float8_e4m3fn
# e4m3 keeps 3 mantissa bits: each cached value is off by up to 6.25% (half a step). Measured against exact K/V,
# the largest log-prob difference of a generated token was 0.08 nats on the tiny model below (also with chunked
# prefill) and 0.08 on SmolLM2; 0.25 leaves room, while a scale left out (a factor of 10-300 here) is far beyond.
LOGPROB_TOL = 0.25
PROMPTS = [[5, 9, 200], [17] * 11, list(range(40, 59)), [3, 80, 81, 82, 83, 84, 85]]


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS)
    return ModelConfig(**{**base, **kw})


def tiny_model(config: ModelConfig, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.5 if "embed" in name else p.shape[-1] ** -0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config()
    return tiny_model(config), config


def generate(model_and_config, max_tokens=10, triton_attention=False, **engine_kwargs):
    """Greedy outputs (with the sampled tokens' log-probs) of PROMPTS, and the engine. triton_attention: the
    attention layers (only: norms and RoPE are not what is tested, and are slow in the interpreter) on Triton."""
    model, config = model_and_config
    # the backend is always explicit: an engine switches the shared model's operator modules to its own
    kwargs = dict(dict(max_model_len=64, max_num_seqs=4, block_size=4, num_kv_blocks=64, attention_backend="torch"),
                  **engine_kwargs)
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(**kwargs))
    for layer in engine.runner.attention_layers:
        layer.backend = "triton" if triton_attention else layer.backend
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(None, p, params) for p in PROMPTS]
    done = {}
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step() if out.finished)
    return [done[i].outputs[0] for i in ids], engine


def full_forward_logprobs(model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), torch.arange(len(tokens)))
        return torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)


def check_close_to_exact_kv(model, prompt: list[int], out) -> None:
    """The fp8 run's tokens, scored by a cache-less forward: same log-probs within LOGPROB_TOL, and each greedy
    choice the exact argmax or a near-tie within LOGPROB_TOL of it."""
    ref = full_forward_logprobs(model, prompt + out.token_ids)[len(prompt) - 1:-1]
    chosen = ref[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
    ours = torch.tensor([entry[t].logprob for t, entry in zip(out.token_ids, out.logprobs)])
    torch.testing.assert_close(ours, chosen, atol=LOGPROB_TOL, rtol=0)
    assert float((ref.max(-1).values - chosen).max()) <= LOGPROB_TOL


# -- configuration and the pool ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["int8", "fp16", "FP8", "e4m3", None])
def test_bad_kv_cache_dtype_names_the_allowed_values(bad):
    with pytest.raises(ValueError, match=r"kv_cache_dtype=.*allowed: 'auto', 'fp8', 'fp8_e4m3'"):
        EngineConfig(kv_cache_dtype=bad)
    with pytest.raises(ValueError, match="pipeline_parallel_size=1"):
        EngineConfig(kv_cache_dtype="fp8", pipeline_parallel_size=2)


def test_fp8_pool_holds_4x_the_blocks_of_fp32_and_2x_of_bf16(model_and_config, caplog):
    _, config = model_and_config
    fp32_block = kv_bytes_per_block(config, 16, torch.float32)
    assert kv_bytes_per_block(config, 16, torch.bfloat16) == 2 * kv_bytes_per_block(config, 16, FP8)
    assert fp32_block == 4 * kv_bytes_per_block(config, 16, FP8)
    budget = 10 * fp32_block + 5  # a budget that is not a whole number of blocks
    counts = {}
    for kv_dtype in ("auto", "fp8", "fp8_e4m3"):
        resolved = EngineConfig(max_model_len=32, max_num_seqs=2, kv_cache_memory=budget, kv_cache_dtype=kv_dtype)
        with caplog.at_level(logging.INFO, logger="minillm.engine.kv_cache"):
            counts[kv_dtype] = num_device_blocks(resolved, config, torch.float32, torch.device("cpu"))
    assert counts == {"auto": 10, "fp8": 40, "fp8_e4m3": 40}
    assert "40 blocks of 16 tokens in torch.float8_e4m3fn" in caplog.text
    cache = KVCache(config, counts["fp8"], 16, torch.float32, torch.device("cpu"), kv_cache_dtype="fp8")
    assert cache.storage.dtype == FP8 and cache.nbytes <= budget
    assert cache.scales.shape == (2, config.num_hidden_layers, config.num_key_value_heads)
    assert KVCache(config, 10, 16, torch.float32, torch.device("cpu")).scales is None


def test_engine_pool_is_fp8_with_calibrated_scales_bound_to_the_layers(model_and_config):
    model, config = model_and_config
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(max_model_len=32, max_num_seqs=2,
                                                                    kv_cache_memory=1 << 16, kv_cache_dtype="fp8"))
    cache = engine.runner.kv_cache
    auto = LLMEngine(model, ByteTokenizer(), config, EngineConfig(max_model_len=32, max_num_seqs=2,
                                                                  kv_cache_memory=1 << 16))
    assert cache.storage.dtype == FP8 and cache.num_blocks == 4 * auto.runner.kv_cache.num_blocks
    assert auto.runner.attention_layers[0].k_scale is None  # the second engine rebound the shared layers
    engine.runner.bind_kv_cache()
    for i, layer in enumerate(engine.runner.attention_layers):
        assert layer.k_scale.data_ptr() == cache.scales[0, i].data_ptr()  # views: graphs capture the address
        assert layer.v_scale.data_ptr() == cache.scales[1, i].data_ptr()
    # calibrated (not vLLM's 1.0), positive, and the same for every engine: independent of the requests
    assert torch.all(cache.scales > 0) and not torch.all(cache.scales == 1.0)
    again = LLMEngine(model, ByteTokenizer(), config, EngineConfig(max_model_len=32, max_num_seqs=2,
                                                                   kv_cache_memory=1 << 16, kv_cache_dtype="fp8"))
    assert torch.equal(again.runner.kv_cache.scales, cache.scales)


def test_quantize_saturates_instead_of_nan():
    x = torch.tensor([[[1e6, -1e6, 3.0, 0.0]]])
    q = quantize_kv(x, torch.tensor([1.0]))
    assert q.dtype == FP8
    assert dequantize_kv(q, torch.tensor([1.0]), torch.float32).tolist() == [[[FP8_E4M3_MAX, -FP8_E4M3_MAX, 3.0, 0.0]]]


# -- kernels and layers against a torch reference on the same bytes ------------------------------------------------
def random_fp8_pool(num_blocks=12, block_size=16, kv_heads=3, head_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g) * 4
    v = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g)
    k_scale = k.abs().amax(dim=(0, 1, 3)) / FP8_E4M3_MAX
    v_scale = torch.full((kv_heads,), float(v.abs().max()) / FP8_E4M3_MAX)
    kq = quantize_kv(k.flatten(0, 1), k_scale).view(k.shape)
    vq = quantize_kv(v.flatten(0, 1), v_scale).view(v.shape)
    return kq, vq, k_scale, v_scale


def dequantized_sequence(cache_q, scale, block_table, seq_len):
    """The first seq_len tokens of one sequence, read back from the fp8 bytes and dequantised, in plain torch."""
    block_size = cache_q.shape[1]
    rows = [cache_q[block_table[p // block_size], p % block_size] for p in range(seq_len)]
    return torch.stack(rows).float() * scale[:, None]


@pytest.mark.parametrize("q_len, num_splits", [(1, 1), (1, 3), (3, 2)])
def test_paged_decode_kernel_reads_fp8_like_a_dequantising_reference(q_len, num_splits):
    kq, vq, k_scale, v_scale = random_fp8_pool()
    block_tables = torch.tensor([[3, 7, 1, -1], [0, 5, 2, 9], [11, -1, -1, -1]], dtype=torch.int32)
    seq_lens = torch.tensor([40, 50, 16], dtype=torch.int32)  # several blocks, one past, exactly one block
    q = torch.randn(3 * q_len, 9, 64, generator=torch.Generator().manual_seed(1))
    out = paged_decode_attention(q, kq, vq, block_tables, seq_lens, k_scale=k_scale, v_scale=v_scale,
                                 num_splits=num_splits, q_len=q_len)
    for b in range(3):
        n = int(seq_lens[b])
        k = dequantized_sequence(kq, k_scale, block_tables[b].tolist(), n)
        v = dequantized_sequence(vq, v_scale, block_tables[b].tolist(), n)
        ref = attention_reference(q[b * q_len:(b + 1) * q_len], k, v, causal=True)
        torch.testing.assert_close(out[b * q_len:(b + 1) * q_len], ref, atol=2e-5, rtol=1e-4)


@triton.jit
def _widen_words_kernel(WORDS, OUT, ROWS: tl.constexpr, D: tl.constexpr):
    rows = tl.arange(0, ROWS)
    words = tl.load(WORDS + rows[:, None] * (D // 4) + tl.arange(0, D // 4)[None, :])
    tile = _fp8_tile(words.to(tl.uint32, bitcast=True), ROWS, D, False)
    tl.store(OUT + rows[:, None] * D + tl.arange(0, D)[None, :], tile)


def test_fp8_words_widen_every_finite_e4m3_code_exactly():
    """_fp8_tile's bit trick on all 254 finite e4m3 codes (0x7f/0xff are NaN, never stored): byte s.eeee.mmm read
    as fp16 s.0eeee.mmm0000000 is the value / 2^8, subnormals and -0 included; byte i of a word is element 4j+i."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)] + [0, 0x80], dtype=torch.uint8)
    codes = codes[torch.randperm(256, generator=torch.Generator().manual_seed(0))].view(8, 32)
    out = torch.empty(8, 32, dtype=torch.float16)
    _widen_words_kernel[(1,)](codes.view(torch.int32), out, ROWS=8, D=32)
    expected = codes.view(FP8).to(torch.float16) / 256
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))  # bit for bit, signs of zero too


def test_store_kernel_quantises_to_the_bytes_of_quantize_kv():
    """One launch divides by the scale, saturates and rounds to e4m3 in fp32 arithmetic: the same bytes as the torch
    path, also where Triton's interpreter would round its own fp8 cast wrongly (31.9 -> 16), at +-448, beyond it,
    for subnormals and for small negatives (-0)."""
    from minillm.kernels.fused import store_kvcache
    g = torch.Generator().manual_seed(4)
    tokens, kv_heads, dim = 40, 2, 32
    k = torch.randn(tokens, kv_heads, dim, generator=g) * torch.logspace(-4, 3, tokens)[:, None, None]
    v = torch.randn(tokens, kv_heads, dim, generator=g) * 30
    k[0, 0, :9] = torch.tensor([31.9, -31.9, 448.0, 464.0, 500.0, -1e6, 1e-3, -1e-4, 0.0])
    k_scale, v_scale = torch.tensor([1.0, 2.5]), torch.tensor([0.7, 0.25])
    k_cache = torch.zeros(6, 8, kv_heads, dim, dtype=FP8)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(48, generator=g)[:tokens]
    slots[5] = -1  # not stored
    store_kvcache(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    keep = slots >= 0
    for cache, x, scale in ((k_cache, k, k_scale), (v_cache, v, v_scale)):
        stored = cache.view(-1, kv_heads, dim)[slots[keep]].view(torch.uint8)
        assert torch.equal(stored, quantize_kv(x[keep], scale).view(torch.uint8))
    assert int((k_cache.view(torch.uint8) != 0).any(-1).any(-1).sum()) == tokens - 1


@pytest.mark.parametrize("head_dim", [64, 20, 6])
def test_fp8_decode_widening_paths_agree(head_dim):
    """The int32-word path (bits; head_dim % 4 == 0), the plain widening (cast) and the fp8 loads widened to fp16
    (cast16) read the same values; a head_dim that is no whole number of words falls back to the cast."""
    kq, vq, k_scale, v_scale = random_fp8_pool(head_dim=head_dim)
    block_tables = torch.tensor([[3, 7, 1, -1], [0, 5, 2, 9]], dtype=torch.int32)
    seq_lens = torch.tensor([37, 64], dtype=torch.int32)
    q = torch.randn(2, 6, head_dim, generator=torch.Generator().manual_seed(3))
    common = dict(k_scale=k_scale, v_scale=v_scale, num_splits=2)
    default = paged_decode_attention(q, kq, vq, block_tables, seq_lens, **common)
    cast = paged_decode_attention(q, kq, vq, block_tables, seq_lens, fp8_widen="cast", **common)
    torch.testing.assert_close(default, cast, atol=2e-6, rtol=1e-5)
    cast16 = paged_decode_attention(q, kq, vq, block_tables, seq_lens, fp8_widen="cast16", **common)
    torch.testing.assert_close(cast16, cast, atol=2e-6, rtol=1e-5)  # (fp16 dots only on a GPU)
    if head_dim % 4 == 0:
        bits = paged_decode_attention(q, kq, vq, block_tables, seq_lens, fp8_widen="bits", **common)
        torch.testing.assert_close(bits, cast, atol=2e-6, rtol=1e-5)
    else:
        with pytest.raises(ValueError, match="head_dim % 4"):
            paged_decode_attention(q, kq, vq, block_tables, seq_lens, fp8_widen="bits", **common)


def test_fp8_widen_is_checked():
    kq, vq, k_scale, v_scale = random_fp8_pool(num_blocks=2, head_dim=16)
    args = (torch.randn(1, 3, 16), kq, vq, torch.tensor([[0, 1]], dtype=torch.int32),
            torch.tensor([20], dtype=torch.int32))
    with pytest.raises(ValueError, match="fp8_widen"):
        paged_decode_attention(*args, k_scale=k_scale, v_scale=v_scale, fp8_widen="fp16")
    with pytest.raises(ValueError, match="fp8_widen"):  # a bf16/fp32 cache has nothing to widen
        paged_decode_attention(args[0], kq.float(), vq.float(), *args[3:], fp8_widen="bits")
    with pytest.raises(ValueError, match="'cvt', a GPU"):  # inline PTX: not in the interpreter
        paged_decode_attention(*args, k_scale=k_scale, v_scale=v_scale, fp8_widen="cvt")


def test_decode_rule_counts_fp8_bytes():
    """An fp8 split must hold twice the keys of a bf16 one before it pays for the merge (bytes, not tokens), and
    the fp8 tile is the word path's: 128 keys x 8 warps (2 stages on a full grid, the H200's measured best for
    32 x 4k; 3 on a sparse one), 64 keys x 4 warps where one split's grid holds more than two programs per SM,
    32 x 4 only where a split holds fewer than 128 keys."""
    from minillm.kernels.decode_split_rule import choose_decode_config
    # 32 x 8 = 256 programs on 132 SMs: every SM busy, so a split needs 1024 bf16 / 2048 fp8 keys
    assert choose_decode_config(32, 8, 2048, 132, kv_bytes=2).num_splits == 2
    assert choose_decode_config(32, 8, 2048, 132, kv_bytes=1).num_splits == 1
    assert choose_decode_config(32, 8, 4096, 132, kv_bytes=1).num_splits == 2
    full = choose_decode_config(32, 8, 4096, 132, kv_bytes=1)
    assert (full.block_n, full.num_warps, full.num_stages) == (128, 8, 2)
    # one split over more than two programs per SM: the 64-key, 4-warp, 2-stage tile (the H200's best there)
    serving = choose_decode_config(64, 8, 2048, 132, kv_bytes=1)
    assert (serving.num_splits, serving.block_n, serving.num_warps, serving.num_stages) == (1, 64, 4, 2)
    assert choose_decode_config(256, 8, 16384, 132, kv_bytes=1).block_n == 64
    assert choose_decode_config(33, 8, 2048, 132, kv_bytes=1).block_n == 128  # 264 programs: two per SM, not more
    assert choose_decode_config(34, 8, 2048, 132, kv_bytes=1).block_n == 64
    short = choose_decode_config(64, 8, 100, 132, kv_bytes=1)
    assert (short.num_splits, short.block_n, short.num_warps) == (1, 32, 4)
    sparse = choose_decode_config(1, 8, 32768, 132, kv_bytes=1)
    assert (sparse.num_splits, sparse.block_n, sparse.num_warps) == (32, 128, 8)
    assert choose_decode_config(1, 8, 32768, 132) == choose_decode_config(1, 8, 32768, 132, kv_bytes=2)
    with pytest.raises(ValueError, match="kv_bytes"):
        choose_decode_config(1, 8, 1024, 132, kv_bytes=3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_layer_writes_quantised_bytes_and_a_chunk_reads_them_back(backend):
    """A prefill of 10 tokens, then a 7-token chunk (q_len 7 < seq_len 17): the chunk attends to the cached
    prefix through the fp8 bytes (the chunked-prefill / prefix-cache read path of both backends)."""
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, block_size = 4, 2, 16, 4
    layer = Attention(heads, kv_heads, dim, backend=backend)
    k_cache = torch.zeros(8, block_size, kv_heads, dim, dtype=FP8)
    v_cache = torch.zeros_like(k_cache)
    scales = torch.tensor([[0.02, 0.03], [0.01, 0.015]])
    layer.k_cache, layer.v_cache, layer.k_scale, layer.v_scale = k_cache, v_cache, scales[0], scales[1]
    table = torch.tensor([[6, 2, 5, 0, 7]], dtype=torch.int32)
    k, v, q = (torch.randn(17, n, dim, generator=g) for n in (kv_heads, kv_heads, heads))
    slots = torch.tensor([int(table[0, p // block_size]) * block_size + p % block_size for p in range(17)])

    def step(lo, hi):
        meta = AttentionMetadata(cu_seqlens_q=torch.tensor([0, hi - lo], dtype=torch.int32),
                                 seq_lens=torch.tensor([hi], dtype=torch.int32), max_seqlen_q=hi - lo,
                                 max_seqlen_k=hi, slot_mapping=slots[lo:hi], block_tables=table, block_size=block_size,
                                 seq_lens_list=[hi], query_lens_list=[hi - lo])
        with forward_context(meta):
            return layer(q[lo:hi], k[lo:hi], v[lo:hi])

    first = step(0, 10)  # a plain prefill attends to its exact k/v
    torch.testing.assert_close(first, attention_reference(q[:10], k[:10], v[:10]), atol=2e-5, rtol=1e-4)
    chunk = step(10, 17)
    stored_k = k_cache.view(-1, kv_heads, dim)[slots]
    assert torch.equal(stored_k.view(torch.uint8), quantize_kv(k, scales[0]).view(torch.uint8))
    k_ref = dequantized_sequence(k_cache, scales[0], table[0].tolist(), 17)
    v_ref = dequantized_sequence(v_cache, scales[1], table[0].tolist(), 17)
    torch.testing.assert_close(chunk, attention_reference(q[10:], k_ref, v_ref), atol=2e-5, rtol=1e-4)


# -- the engine ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine_kwargs", [
    dict(),
    dict(enable_chunked_prefill=True, max_num_batched_tokens=8,
         enable_prefix_caching=True),
])
def test_fp8_engine_matches_exact_kv_within_tolerance(model_and_config, engine_kwargs):
    outs, engine = generate(model_and_config, kv_cache_dtype="fp8", **engine_kwargs)
    assert engine.runner.kv_cache.storage.dtype == FP8
    for prompt, out in zip(PROMPTS, outs):
        check_close_to_exact_kv(model_and_config[0], prompt, out)


def test_fp8_torch_and_triton_paths_agree_token_for_token(model_and_config):
    """The triton path (flash prefill, paged decode kernel, through the interpreter) reads the same bytes."""
    torch_outs, _ = generate(model_and_config, kv_cache_dtype="fp8")
    triton_outs, _ = generate(model_and_config, kv_cache_dtype="fp8", triton_attention=True)
    assert [o.token_ids for o in torch_outs] == [o.token_ids for o in triton_outs]
    for prompt, out in zip(PROMPTS, triton_outs):
        check_close_to_exact_kv(model_and_config[0], prompt, out)


def test_swap_preemption_with_fp8_keeps_outputs_identical(model_and_config):
    reference, _ = generate(model_and_config, max_tokens=9, kv_cache_dtype="fp8")
    swapped, engine = generate(model_and_config, max_tokens=9, kv_cache_dtype="fp8", num_kv_blocks=12,
                               preemption_mode="swap", swap_space=1 << 20)
    assert engine.scheduler.num_preemptions > 0  # the small pool really did swap blocks out and back in
    assert engine.runner.kv_cache.cpu_storage.dtype == FP8
    assert [o.token_ids for o in swapped] == [o.token_ids for o in reference]


def test_perplexity_sees_the_fp8_cache_only_through_chunked_prefill(model_and_config):
    """minillm.bench.perplexity on token windows: a prompt prefilled in one piece attends to its exact k/v (fp8
    changes nothing), chunks of 8 read their context back from the cache (fp8 changes a little)."""
    from minillm import LLM
    from minillm.bench import perplexity
    model, config = model_and_config
    windows = [list(range(40, 70)), [(7 * i) % 250 for i in range(25)]]
    ref = [full_forward_logprobs(model, w)[:-1].gather(-1, torch.tensor(w[1:])[:, None]) for w in windows]
    exact = float(torch.exp(-torch.cat(ref).mean()))

    def ppl(**kw):
        engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(
            max_model_len=64, max_num_seqs=2, block_size=4, num_kv_blocks=32, attention_backend="torch", **kw))
        return perplexity(LLM.from_engine(engine), windows)

    assert ppl() == pytest.approx(exact, rel=1e-5)
    assert ppl(kv_cache_dtype="fp8") == pytest.approx(exact, rel=1e-5)
    chunked = dict(enable_chunked_prefill=True, max_num_batched_tokens=8)
    assert ppl(**chunked) == pytest.approx(exact, rel=1e-5)
    fp8 = ppl(kv_cache_dtype="fp8", **chunked)
    assert fp8 != exact and fp8 == pytest.approx(exact, rel=0.02)


def test_smollm2_fp8_kv_cache_stays_with_fp32():
    """A few greedy tokens of the bundled SmolLM2 with an fp8 cache, scored by a full fp32 forward."""
    from minillm import LLM
    llm = LLM(max_model_len=96, max_num_seqs=2, dtype="float32")
    fp8 = llm.share_model(kv_cache_dtype="fp8")
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    exact = [o.outputs[0] for o in llm.generate(prompts, params)]
    quant = fp8.generate(prompts, params)
    model = llm.llm_engine.runner.model
    for out, ref in zip(quant, exact):
        check_close_to_exact_kv(model, out.prompt_token_ids, out.outputs[0])
        if out.outputs[0].token_ids != ref.token_ids:  # allowed only at a near-tie (checked above)
            print(f"fp8 diverged on {out.prompt!r}: {out.outputs[0].text!r} vs {ref.text!r}")


# Graph replays and eager steps are not bit-identical in bf16: a graph's attention keeps the split count it was
# captured with, an eager step picks one for its context, and the partial sums round differently. On the H200
# (2026-12-04) that moved a log-prob by 0.016 and turned a near-tie into an exact one (two tokens at -3.8891),
# which argmax then broke the other way. A frozen scale changes log-probs by far more than SAME_STEP_TOL.
SAME_STEP_TOL = 0.1


def assert_same_greedy(outs, refs) -> None:
    """Two greedy runs of the same model and cache format: equal tokens with log-probs within SAME_STEP_TOL, up
    to a first difference that must be a near-tie in both runs (each ranks the other's choice within
    SAME_STEP_TOL of its own); after it the continuations differ, so the rest is not compared. At least half
    of all tokens must be compared."""
    compared = total = 0
    for out, ref in zip(outs, refs, strict=True):
        total += len(ref.token_ids)
        for n, (a, b) in enumerate(zip(out.token_ids, ref.token_ids)):
            mine, theirs = out.logprobs[n], ref.logprobs[n]
            if a != b:
                assert b in mine and a in theirs, f"position {n}: {a} vs {b} is no near-tie ({mine}, {theirs})"
                assert mine[a].logprob - mine[b].logprob <= SAME_STEP_TOL, (n, mine)
                assert theirs[b].logprob - theirs[a].logprob <= SAME_STEP_TOL, (n, theirs)
                break
            assert abs(mine[a].logprob - theirs[b].logprob) <= SAME_STEP_TOL, (n, mine[a], theirs[b])
            compared += 1
    assert compared >= total // 2, f"only {compared} of {total} tokens compared: the runs parted too early"


def test_assert_same_greedy_accepts_a_near_tie_and_nothing_else():
    """The GPU test's comparison, on made-up outputs: equal runs pass; parting at a near-tie passes; parting where
    one run was sure fails, as do log-probs that differ by more than SAME_STEP_TOL and runs that part too early."""
    from minillm.outputs import CompletionOutput, Logprob

    def out(tokens, tops):  # tops: per position, {token: logprob}
        return CompletionOutput(0, "", tokens, logprobs=[{t: Logprob(lp) for t, lp in top.items()} for top in tops])

    sure = {1: -0.1, 2: -3.0}
    ref = out([1, 1, 1, 1], [sure] * 4)
    assert_same_greedy([out([1, 1, 1, 1], [sure] * 4)], [ref])
    tie_ref = out([1, 1, 1, 1], [sure, sure, {1: -1.00, 2: -1.01}, sure])
    assert_same_greedy([out([1, 1, 2, 2], [sure, sure, {2: -1.000, 1: -1.002}, sure])], [tie_ref])
    with pytest.raises(AssertionError):  # the reference was sure of token 1
        assert_same_greedy([out([1, 1, 2, 2], [sure, sure, {2: -1.0, 1: -1.02}, sure])], [ref])
    with pytest.raises(AssertionError):  # same tokens, log-probs apart by 0.5
        assert_same_greedy([out([1, 1, 1, 1], [sure, {1: -0.6, 2: -3.0}, sure, sure])], [ref])
    with pytest.raises(AssertionError):  # a near-tie at the first token: nothing compared
        assert_same_greedy([out([2, 2, 2, 2], [{2: -1.0, 1: -1.0}] * 4)], [out([1, 1, 1, 1], [{1: -1.0, 2: -1.0}] * 4)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp8_kv_decode_with_cuda_graphs():
    """bf16 model, fp8 cache, decode steps replayed by CUDA graphs: the same greedy choices as eager fp8 steps
    (`assert_same_greedy`), log-probs close to a bf16 cache's, 2x its blocks for the same memory. Then the scales
    are doubled in place: a graph that had frozen the old values would now read its cache with the wrong scale
    (the eager prefill writes with the new one) and part from the eager engine."""
    config = tiny_config(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                         intermediate_size=512, max_position_embeddings=512)
    model = RandomWeights(seed=3)(config, torch.device("cuda"), torch.bfloat16)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)

    def engine(**kw):
        return LLMEngine(model, ByteTokenizer(), config, EngineConfig(
            block_size=16, kv_cache_memory=8 << 20, max_model_len=256, max_num_seqs=8, **kw),
            device="cuda", dtype=torch.bfloat16)

    def run(eng):
        eng.runner.bind_kv_cache()  # the engines share the model's layers: point them at this one's cache
        ids = [eng.add_request(None, p, params) for p in PROMPTS]
        done = {}
        while eng.has_unfinished_requests():
            done.update((o.request_id, o) for o in eng.step() if o.finished)
        return [done[i].outputs[0] for i in ids]

    graphed, eager, bf16 = engine(kv_cache_dtype="fp8"), engine(kv_cache_dtype="fp8", enforce_eager=True), engine()
    assert graphed.runner.cuda_graphs is not None and eager.runner.cuda_graphs is None
    assert graphed.runner.kv_cache.storage.dtype == FP8 and bf16.runner.kv_cache.storage.dtype == torch.bfloat16
    assert graphed.runner.kv_cache.num_blocks == 2 * bf16.runner.kv_cache.num_blocks
    graph_outs, eager_outs, bf16_outs = run(graphed), run(eager), run(bf16)
    assert_same_greedy(graph_outs, eager_outs)
    for out, ref in zip(graph_outs, bf16_outs):
        n = next((i for i, (a, b) in enumerate(zip(out.token_ids, ref.token_ids)) if a != b), len(ref.token_ids))
        ours = torch.tensor([e[t].logprob for t, e in zip(out.token_ids[:n], out.logprobs[:n])])
        theirs = torch.tensor([e[t].logprob for t, e in zip(ref.token_ids[:n], ref.logprobs[:n])])
        torch.testing.assert_close(ours, theirs, atol=LOGPROB_TOL, rtol=0)
    for eng in (graphed, eager):
        eng.runner.kv_cache.scales.mul_(2.0)
    assert_same_greedy(run(graphed), run(eager))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch, q_len", [(1, 1), (8, 1), (48, 1), (4, 3)])
def test_gpu_fp8_decode_paths_and_store_match(batch, q_len):
    """On the GPU: the store kernel writes quantize_kv's bytes; the word path with the hardware conversion (cvt),
    with the bit trick (bits) and the plain widening (cast) read the same values as the bf16 kernel reading the
    dequantised cache (fp16 vs bf16 operands: a few 1e-3 of the output's range)."""
    from minillm.kernels.fused import store_kvcache
    dev, g = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0)
    kv_heads, dim, block_size, blocks_per_seq = 8, 128, 16, 40
    num_blocks = batch * blocks_per_seq + 1
    k = torch.randn(num_blocks * block_size, kv_heads, dim, device=dev, generator=g, dtype=torch.bfloat16) * 3
    v = torch.randn(num_blocks * block_size, kv_heads, dim, device=dev, generator=g, dtype=torch.bfloat16)
    k_scale, v_scale = k.float().abs().amax(dim=(0, 2)) * 4 / 448, torch.full((kv_heads,), 0.01, device=dev)
    kq = torch.empty(num_blocks, block_size, kv_heads, dim, dtype=FP8, device=dev)
    vq = torch.empty_like(kq)
    store_kvcache(k, v, kq, vq, torch.arange(k.shape[0], device=dev), k_scale, v_scale)
    assert torch.equal(kq.view(torch.uint8).flatten(0, 1), quantize_kv(k, k_scale).view(torch.uint8))
    assert torch.equal(vq.view(torch.uint8).flatten(0, 1), quantize_kv(v, v_scale).view(torch.uint8))
    kd = dequantize_kv(kq.flatten(0, 1), k_scale, torch.bfloat16).view(kq.shape)
    vd = dequantize_kv(vq.flatten(0, 1), v_scale, torch.bfloat16).view(vq.shape)
    tables = (torch.randperm(num_blocks - 1, device=dev, generator=g) + 1).view(batch, -1).to(torch.int32)
    seq_lens = torch.randint(q_len, blocks_per_seq * block_size + 1, (batch,), device=dev, generator=g).to(torch.int32)
    q = torch.randn(batch * q_len, 32, dim, device=dev, generator=g, dtype=torch.bfloat16)
    ref = paged_decode_attention(q, kd, vd, tables, seq_lens, q_len=q_len).float()
    for widen in ("cvt", "bits", "cast", "cast16"):
        out = paged_decode_attention(q, kq, vq, tables, seq_lens, k_scale=k_scale, v_scale=v_scale, q_len=q_len,
                                     fp8_widen=widen).float()
        assert float((out - ref).abs().max()) <= 1e-2 * float(ref.abs().max()), widen
