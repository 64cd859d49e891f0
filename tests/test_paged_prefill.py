"""Paged prefill attention (kernels/paged_prefill.py): new tokens over their cached context, read through the block
table, against attention_reference on the gathered context; then the attention layer and the engine using it.

CPU: fp32, the Triton interpreter, tiny shapes with awkward sizes (context 0, exactly one block, one past a block,
one new token, tiles that cut through a sequence), GQA 3:1 as SmolLM2 (9 heads, 3 kv heads, head_dim 64), an fp8
cache, a head_dim that is not a power of two. Engine: greedy tokens with chunked prefill and prefix caching on the
triton backend equal the torch backend's, with the kernel seen serving chunks mixed with decodes.
"""
from __future__ import annotations

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.forward_context import AttentionMetadata, forward_context
from minillm.kernels import paged_prefill
from minillm.kernels.paged_prefill import paged_prefill_attention
from minillm.layers.attention import Attention, attention_reference
from minillm.layers.kv_quant import FP8_E4M3_MAX, dequantize_kv, quantize_kv
from minillm.sampling_params import SamplingParams
from test_fp8_kv_cache import tiny_config, tiny_model
from tiny import ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)


def paged_case(q_lens, seq_lens, heads, kv_heads, dim, block_size, fp8=False, seed=0):
    """q, a pool whose blocks are handed out in shuffled order (plus spare ones), block tables, and the
    per-sequence K/V a reference sees (dequantised from the very bytes for an fp8 pool)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks) + 2
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    scales = None
    if fp8:
        scales = (k_cache.abs().amax(dim=(0, 1, 3)) / FP8_E4M3_MAX, v_cache.abs().amax(dim=(0, 1, 3)) / FP8_E4M3_MAX)
        k_cache = quantize_kv(k_cache.flatten(0, 1), scales[0]).view(k_cache.shape)
        v_cache = quantize_kv(v_cache.flatten(0, 1), scales[1]).view(v_cache.shape)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in blocks:
        tables.append(order[used:used + n] + [-1] * (max(blocks) - n))
        used += n
    kv = []
    for table, seq_len in zip(tables, seq_lens):
        slots = [table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        k, v = k_cache.view(-1, kv_heads, dim)[slots], v_cache.view(-1, kv_heads, dim)[slots]
        if fp8:
            k, v = dequantize_kv(k, scales[0], torch.float32), dequantize_kv(v, scales[1], torch.float32)
        kv.append((k, v))
    q = torch.randn(sum(q_lens), heads, dim, generator=gen)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), cu, scales, kv


def check_against_reference(q_lens, seq_lens, heads, kv_heads, dim, block_size, fp8=False, **tiles):
    q, k_cache, v_cache, tables, cu, scales, kv = paged_case(q_lens, seq_lens, heads, kv_heads, dim, block_size, fp8)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), cu,
                                  k_scale=scales and scales[0], v_scale=scales and scales[1], **tiles)
    for b, (k, v) in enumerate(kv):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        torch.testing.assert_close(out[rows], attention_reference(q[rows], k, v), atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"sequence {b} (q_len {q_lens[b]}, seq_len {seq_lens[b]}): {m}")


# (q_lens, seq_lens), blocks of 4: no context (a fresh prompt), context of exactly one block, one past a block,
# a decode (q_len 1), and a long chunk whose tiles cut through it
SMOLLM2_BATCH = ([6, 3, 4, 1, 23], [6, 7, 9, 17, 30])


@pytest.mark.parametrize("block_m", [None, 16])  # 10 or 5 new tokens x 3 heads per program
def test_gqa_3_to_1_like_smollm2(block_m):
    check_against_reference(*SMOLLM2_BATCH, heads=9, kv_heads=3, dim=64, block_size=4, block_m=block_m)


def test_fp8_cache_applies_per_kv_head_scales():
    check_against_reference(*SMOLLM2_BATCH, heads=9, kv_heads=3, dim=64, block_size=4, fp8=True)


@pytest.mark.parametrize("q_lens, seq_lens", [([1], [1]), ([1], [5]), ([5], [5]), ([4], [8]), ([2, 1], [40, 33])])
def test_edge_lengths_multi_head_and_odd_head_dim(q_lens, seq_lens):
    """One token, one query over one past a block, exactly one block, two blocks; head_dim 24 pads to 32;
    the last case spans many key tiles (block_n 16) so the unmasked first loop runs several times."""
    check_against_reference(q_lens, seq_lens, heads=2, kv_heads=2, dim=24, block_size=4)


def test_contiguous_layout_one_block_per_sequence():
    check_against_reference([3, 7], [20, 7], heads=4, kv_heads=1, dim=16, block_size=32, block_m=16, block_n=32)


def test_bad_input_is_named():
    q, k_cache, v_cache, tables, cu, _, _ = paged_case([2], [5], 4, 2, 16, 4)
    seq_lens = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        paged_prefill_attention(q, k_cache, v_cache, tables, seq_lens.long(), cu)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, k_cache, v_cache, tables, seq_lens, cu[:1])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_prefill_attention(q[:, :3], k_cache, v_cache, tables, seq_lens, cu)
    with pytest.raises(ValueError, match="head_dim"):
        paged_prefill_attention(q[..., :8].contiguous(), k_cache, v_cache, tables, seq_lens, cu)
    with pytest.raises(ValueError, match="block_m"):
        paged_prefill_attention(q, k_cache, v_cache, tables, seq_lens, cu, block_m=24)
    with pytest.raises(ValueError, match="both k_scale and v_scale"):
        paged_prefill_attention(q, k_cache, v_cache, tables, seq_lens, cu, k_scale=1.0)


# -- the attention layer and the engine ------------------------------------------------------------------------
@pytest.fixture
def kernel_calls(monkeypatch):
    """(query lens, seq lens) of every paged prefill launch while the test runs."""
    calls, real = [], paged_prefill.paged_prefill_attention

    def spy(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, **kw):
        calls.append((cu_seqlens_q.diff().tolist(), seq_lens.tolist()))
        return real(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, **kw)
    monkeypatch.setattr(paged_prefill, "paged_prefill_attention", spy)
    return calls


@pytest.mark.parametrize("max_mean_query", [128, 2])
def test_attention_layer_sends_a_mixed_batch_to_one_paged_launch(kernel_calls, monkeypatch, max_mean_query):
    """A decode, a chunk over one block of context and a fresh prompt in one step: the triton layer stores the
    new k/v, then one paged launch reads everything from the cache; equal to the reference layer. Chunks longer
    on average than PAGED_PREFILL_MAX_MEAN_QUERY (4 tokens here against a limit of 2) take the gather +
    FlashAttention path instead, with the same result."""
    import minillm.layers.attention as attention_module
    monkeypatch.setattr(attention_module, "PAGED_PREFILL_MAX_MEAN_QUERY", max_mean_query)
    q_lens, seq_lens, heads, kv_heads, dim, block_size = [1, 5, 6], [9, 9, 6], 9, 3, 64, 4
    q, k_cache, v_cache, tables, cu, _, kv = paged_case(q_lens, seq_lens, heads, kv_heads, dim, block_size)
    slots = [int(tables[b, p // block_size]) * block_size + p % block_size
             for b, (ql, sl) in enumerate(zip(q_lens, seq_lens)) for p in range(sl - ql, sl)]
    k_new = torch.cat([k[sl - ql:] for (k, _), ql, sl in zip(kv, q_lens, seq_lens)])
    v_new = torch.cat([v[sl - ql:] for (_, v), ql, sl in zip(kv, q_lens, seq_lens)])
    outs = {}
    for backend in ("reference", "triton"):
        layer = Attention(heads, kv_heads, dim, backend=backend)
        layer.k_cache, layer.v_cache = k_cache.clone(), v_cache.clone()
        meta = AttentionMetadata(cu_seqlens_q=cu, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                                 max_seqlen_q=6, max_seqlen_k=9, slot_mapping=torch.tensor(slots), block_tables=tables,
                                 block_size=block_size, seq_lens_list=seq_lens, query_lens_list=q_lens)
        with forward_context(meta):
            outs[backend] = layer(q, k_new, v_new)
    assert kernel_calls == ([(q_lens, seq_lens)] if max_mean_query == 128 else [])
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=2e-5, rtol=1e-4)


def greedy(model_and_config, backend: str, prompts, **engine_kw):
    model, config = model_and_config
    kw = dict(max_model_len=64, max_num_seqs=4, block_size=4, num_kv_blocks=48, attention_backend="torch",
              scheduling="continuous", kv_layout="paged", enable_chunked_prefill=True, enable_prefix_caching=True,
              max_num_batched_tokens=8)
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(**{**kw, **engine_kw}))
    for layer in engine.runner.attention_layers:  # attention only: norms and RoPE through the interpreter are slow
        layer.backend = backend
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step() if out.finished)
    assert engine.scheduler.block_manager.prefix_cache_hits > 0
    return [done[i].outputs[0].token_ids for i in ids]


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_engine_chunked_prefill_and_prefix_cache_match_torch(kernel_calls, kv_cache_dtype):
    config = tiny_config(num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    model_and_config = (tiny_model(config), config)
    shared = list(range(60, 72))  # 3 full blocks of 4: the second request finds them in the prefix cache
    prompts = [shared + [1, 2, 3], shared + [9, 8], list(range(100, 119))]
    ref = greedy(model_and_config, "torch", prompts, kv_cache_dtype=kv_cache_dtype)
    assert not kernel_calls
    assert greedy(model_and_config, "triton", prompts, kv_cache_dtype=kv_cache_dtype) == ref
    # the case is what it claims: chunks over cached context (q_len < seq_len) in steps that also hold decodes
    assert any(1 in q and any(1 < ql < sl for ql, sl in zip(q, s)) for q, s in kernel_calls), kernel_calls


# -- on the GPU: bf16 / fp8 at Llama-3-8B's attention shape, and inside a CUDA graph ---------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_8b_shape_and_cuda_graph_replay_with_new_lengths(fp8):
    """A chunk over 4096 cached tokens, a decode, a fresh prompt and a chunk one past a block, bf16 (or an fp8
    cache) against the fp32 reference; then the launch captured in a CUDA graph, replayed after the decode's
    seq_len and the queries changed in place: lengths are read on the device, nothing was frozen at capture."""
    q_lens, seq_lens = [512, 1, 64, 300], [4608, 2049, 64, 1317]
    q, k_cache, v_cache, tables, cu, scales, kv = paged_case(q_lens, seq_lens, 32, 8, 128, 16, fp8, seed=5)
    dev = dict(device="cuda")
    q = q.to(**dev, dtype=torch.bfloat16)
    k_cache, v_cache = (c.to(**dev) if fp8 else c.to(**dev, dtype=torch.bfloat16) for c in (k_cache, v_cache))
    tables, cu, lens = tables.to(**dev), cu.to(**dev), torch.tensor(seq_lens, dtype=torch.int32, **dev)
    k_scale, v_scale = (scales[0].to(**dev), scales[1].to(**dev)) if fp8 else (None, None)

    def run():
        return paged_prefill_attention(q, k_cache, v_cache, tables, lens, cu, k_scale=k_scale, v_scale=v_scale)

    out = run()  # autotunes (outside the graph)
    for b, (k, v) in enumerate(kv):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        k, v = (x.to(**dev) if fp8 else x.to(**dev, dtype=torch.bfloat16).float() for x in (k, v))
        ref = attention_reference(q[rows].float(), k, v)
        torch.testing.assert_close(out[rows].float(), ref, atol=2e-2, rtol=2e-2, msg=lambda m: f"sequence {b}: {m}")
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = run()
    q.copy_(torch.randn_like(q))
    lens[1] = 1500  # the decode now sits at position 1499: fewer keys
    graph.replay()
    torch.testing.assert_close(static_out, run(), atol=0, rtol=0)
