"""Sliding-window attention (kernels/sliding_window.py): the mask, every attention path against a brute-force
reference (interpreter kernels included), the config, and tiny Mistral / Qwen2 models against transformers."""
from __future__ import annotations

import json

import pytest
import torch

import minillm  # noqa: F401  (TRITON_INTERPRET=1 before triton runs anything, without CUDA)
from minillm import LLM

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.forward_context import forward_context, prefill_metadata
from minillm.kernels.paged_attention import paged_decode_attention
from minillm.kernels.paged_prefill import paged_prefill_attention
from minillm.layers.decode_attention import padded_decode_attention
from minillm.kernels.sliding_window import sliding_window_mask
from minillm.loader.hf import load_hf_model
from minillm.models.llama import LlamaForCausalLM
from minillm.sampling_params import SamplingParams
from tiny import ByteTokenizer, one_thread, run_to_completion, tiny_qwen2_checkpoint  # noqa: F401  (one_thread)

transformers = pytest.importorskip("transformers")


def _banded_reference(q, k, v, window, scale):
    """softmax over keys pos - window < key <= pos, written out: q [q_len, H, D], k/v [kv_len, KVH, D]."""
    q_len, kv_len = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    keys = torch.arange(kv_len)[None, :]
    scores = scores.masked_fill(~((keys <= pos) & (keys > pos - window)), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).float()


def test_mask_is_the_band_and_bad_windows_are_named():
    mask = sliding_window_mask(3, 6, 2)
    assert mask.tolist() == [[False, False, True, True, False, False], [False, False, False, True, True, False],
                             [False, False, False, False, True, True]]
    assert sliding_window_mask(3, 6, 2, first_key=2).tolist() == [row[2:] for row in mask.tolist()]
    assert sliding_window_mask(2, 4, None).tolist() == [[True, True, True, False], [True, True, True, True]]
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window must be None"):
            sliding_window_mask(1, 4, bad)
    with pytest.raises(ValueError, match="first_key"):
        sliding_window_mask(2, 4, 2, first_key=3)


def _paged(seq_lens, block_size, kv_heads, head_dim, gen):
    """Random K/V of every sequence stored at shuffled blocks of a pool: (k_cache, v_cache, block_tables, keys)."""
    blocks = [-(-n // block_size) for n in seq_lens]
    pool = sum(blocks) + 2
    order = torch.randperm(pool, generator=gen).tolist()
    k_cache = torch.randn(pool, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(pool, block_size, kv_heads, head_dim, generator=gen)
    tables = torch.full((len(seq_lens), max(blocks)), -1, dtype=torch.int32)
    keys = []
    for i, n in enumerate(seq_lens):
        ids = [order.pop() for _ in range(blocks[i])]
        tables[i, :len(ids)] = torch.tensor(ids)
        keys.append((k_cache[ids].flatten(0, 1)[:n], v_cache[ids].flatten(0, 1)[:n]))
    return k_cache, v_cache, tables, keys


@pytest.mark.parametrize("window", [1, 5, 21, 64])
def test_paged_prefill_kernel_keeps_to_the_band(window):
    gen = torch.Generator().manual_seed(window)
    q_lens, seq_lens = [40, 1, 9, 70], [40, 50, 33, 90]  # a fresh prompt, a decode, chunks over context
    k_cache, v_cache, tables, keys = _paged(seq_lens, 16, 2, 32, gen)
    q = torch.randn(sum(q_lens), 6, 32, generator=gen)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), cu,
                                  window=window, block_m=32, block_n=16)
    for i, (k, v) in enumerate(keys):
        rows = slice(cu[i], cu[i + 1])
        torch.testing.assert_close(out[rows], _banded_reference(q[rows], k, v, window, 32 ** -0.5),
                                   atol=2e-5, rtol=1e-4)
    full = paged_prefill_attention(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), cu,
                                   block_m=32, block_n=16)
    assert (full - out).abs().max() > 1e-3  # the window changed something: the test can tell


@pytest.mark.parametrize("q_len,num_splits", [(1, 1), (1, 3), (4, 1), (4, 2)])
def test_paged_decode_kernel_keeps_to_the_band(q_len, num_splits):
    gen = torch.Generator().manual_seed(q_len * 10 + num_splits)
    seq_lens = [7, 45, 100]
    k_cache, v_cache, tables, keys = _paged(seq_lens, 16, 2, 32, gen)
    q = torch.randn(len(seq_lens) * q_len, 4, 32, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    for window in (3, 17, 64):
        out = paged_decode_attention(q, k_cache, v_cache, tables, lens, q_len=q_len, num_splits=num_splits,
                                     window=window)
        torch_out = padded_decode_attention(q, k_cache, v_cache, tables, lens, max(seq_lens), q_len, 32 ** -0.5,
                                            window=window)
        for i, (k, v) in enumerate(keys):
            rows = slice(i * q_len, (i + 1) * q_len)
            ref = _banded_reference(q[rows], k, v, window, 32 ** -0.5)
            torch.testing.assert_close(out[rows], ref, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(torch_out[rows], ref, atol=2e-5, rtol=1e-4)


def test_single_sequence_decode_reads_a_slice_of_its_window():
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = torch.randn(8, 16, 2, 32, generator=gen), torch.randn(8, 16, 2, 32, generator=gen)
    tables = torch.tensor([[2, 3, 4, 5]], dtype=torch.int32)  # consecutive blocks: the in-place view
    q = torch.randn(1, 4, 32, generator=gen)
    out = padded_decode_attention(q, k_cache, v_cache, tables, torch.tensor([60], dtype=torch.int32), 60, 1,
                                  32 ** -0.5, window=10)
    k, v = k_cache[2:6].flatten(0, 1)[:60], v_cache[2:6].flatten(0, 1)[:60]
    torch.testing.assert_close(out, _banded_reference(q, k, v, 10, 32 ** -0.5), atol=2e-5, rtol=1e-4)


def test_the_torch_path_attends_in_chunks_of_queries():
    from minillm.layers.attention import _banded, sdpa_attention
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(37, 4, 16, generator=gen), torch.randn(50, 2, 16, generator=gen), \
        torch.randn(50, 2, 16, generator=gen)
    for chunk in (5, 64):
        out = torch.cat(_banded(sdpa_attention, q, k, v, 0.25, window=9, chunk=chunk))
        torch.testing.assert_close(out, _banded_reference(q, k, v, 9, 0.25), atol=2e-5, rtol=1e-4)


def test_gather_kv_from_a_window_start_reads_the_same_keys():
    from minillm.layers.attention import gather_kv
    cache = torch.randn(6, 4, 2, 8)
    table = torch.tensor([3, 0, 5, 1], dtype=torch.int32)
    for start in (0, 1, 4, 7, 8, 12, 13):
        assert torch.equal(gather_kv(cache, table, 14, start), gather_kv(cache, table, 14)[start:])


def test_config_reads_windows_as_transformers_does(tmp_path):
    config = ModelConfig(architecture="qwen2", num_hidden_layers=3, sliding_window=8,
                         layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    assert [config.sliding_window_of(i) for i in range(3)] == [None, 8, 8]
    with pytest.raises(ValueError, match="layer_types names sliding_attention"):
        ModelConfig(num_hidden_layers=1, layer_types=["sliding_attention"])
    with pytest.raises(ValueError, match="layer_types must list"):
        ModelConfig(num_hidden_layers=2, sliding_window=8, layer_types=["sliding_attention"])
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        ModelConfig(sliding_window=0)
    hf = transformers.Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                                  max_window_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=64)
    transformers.Qwen2ForCausalLM(hf).save_pretrained(tmp_path, safe_serialization=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("layer_types", None)  # older exports: the layers follow from max_window_layers
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config, _ = load_hf_model(tmp_path)
    assert config.sliding_window == 8 and config.layer_types == hf.layer_types
    assert config.max_position_embeddings == hf.max_position_embeddings  # no longer capped at the window


def _tiny_mistral(window: int, layer_types=None):
    torch.manual_seed(0)
    common = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, sliding_window=window,
                  eos_token_id=257, bos_token_id=None)
    if layer_types is None:
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common)).eval()
    hf = transformers.Qwen2Config(**common, use_sliding_window=True, layer_types=layer_types)
    return transformers.Qwen2ForCausalLM(hf).eval()


def _ours(hf, window: int, layer_types=None, backend: str = "auto") -> tuple[ModelConfig, LlamaForCausalLM]:
    arch = "mistral" if layer_types is None else "qwen2"
    c = hf.config
    config = ModelConfig(architecture=arch, vocab_size=260, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=c.rope_parameters["rope_theta"],
                         attention_bias=arch == "qwen2", eos_token_id=257, sliding_window=window,
                         layer_types=layer_types)
    model = LlamaForCausalLM(config, backend=backend).eval()
    model.load_weights(hf.state_dict().items())
    return config, model


@pytest.mark.parametrize("layer_types,backend", [(None, "torch"), (["full_attention", "sliding_attention"], "torch"),
                                                 (None, "triton")], ids=["mistral", "qwen2", "mistral-triton"])
def test_prefill_logits_match_transformers(layer_types, backend):
    """Without a KV cache (perplexity, the pool's profiling run): a 5-token prompt inside the window, 40 past it."""
    hf = _tiny_mistral(7, layer_types)
    _, model = _ours(hf, 7, layer_types, backend)
    lens = [5, 40]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in lens]
    with torch.no_grad(), forward_context(prefill_metadata(lens)):
        ours = model.compute_logits(model(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens])))
        ref = torch.cat([hf(s[None]).logits[0] for s in seqs])
    assert (ours - ref).abs().max() <= 1e-4
    full = _tiny_mistral(1000, layer_types)(seqs[1][None]).logits[0]
    assert (full - ref[5:]).abs().max() > 1e-2  # the window matters at 40 tokens


ENGINES = {  # engine settings that take every path: paged decode, chunks over context, prefix hits, preemption
    "torch": dict(attention_backend="torch"),
    "triton": dict(attention_backend="triton"),
    "chunked": dict(attention_backend="triton", enable_chunked_prefill=True, max_num_batched_tokens=16),
    "prefix_swap": dict(attention_backend="torch", enable_prefix_caching=True, num_kv_blocks=16,
                        preemption_mode="swap", swap_space=1 << 20),
    # verify steps of 1 + 3 queries per sequence, each with its own window edge (the torch path's windowed gather
    # plan; the kernel's q_len = 4 is checked in test_paged_decode_kernel_keeps_to_the_band, 4x cheaper than here)
    "spec_ngram": dict(attention_backend="torch", speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                                      "prompt_lookup_min": 1}),
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_greedy_tokens_match_transformers_generate(engine):
    hf = _tiny_mistral(9)
    config, model = _ours(hf, 9)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 30, 12)]
    prompts.append(prompts[1][:20] + [7, 8])  # shares a prefix with prompt 1
    max_tokens = 24
    with torch.no_grad():
        want = [hf.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    options = {"block_size": 4, "num_kv_blocks": 64, "max_model_len": 128, **ENGINES[engine]}
    llm = LLMEngine(model, ByteTokenizer(), config, EngineConfig(**options))
    got = run_to_completion(llm, prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    assert got == want


def test_tree_speculation_is_refused_beside_a_window():
    config = ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=9)
    with pytest.raises(ValueError, match="ngram_tree.*sliding-window"):
        LLMEngine(LlamaForCausalLM(config), ByteTokenizer(), config,
                  EngineConfig(speculative_config={"method": "ngram_tree", "num_speculative_tokens": 3}))


def check_bf16_against_band(out, dec, q, cu, keys, window):
    """GPU kernels' bf16 outputs against the band in fp32 over bf16-rounded inputs: `out` the prefill's rows of every
    sequence, `dec` each sequence's last query as a decode step (head_dim 128)."""
    for i, (k, v) in enumerate(keys):
        k, v = k.bfloat16().float(), v.bfloat16().float()
        rows = slice(cu[i], cu[i + 1])
        ref = _banded_reference(q[rows].bfloat16().float(), k, v, window, 128 ** -0.5)
        torch.testing.assert_close(out[rows].float().cpu(), ref, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(dec[i].float().cpu(), ref[-1], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_kernels_keep_to_the_band_and_graphs_replay_it():
    """bf16 kernels on the GPU against the banded reference, then a windowed engine whose decode steps replay CUDA
    graphs gives the tokens of the same engine run eagerly."""
    gen = torch.Generator().manual_seed(5)
    seq_lens, q_lens = [300, 1000, 37], [300, 64, 1]
    k_cache, v_cache, tables, keys = _paged(seq_lens, 16, 2, 128, gen)
    q = torch.randn(sum(q_lens), 8, 128, generator=gen)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    cuda = [t.cuda() for t in (k_cache, v_cache)]
    kb, vb = (t.to(torch.bfloat16) for t in cuda)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    for window in (33, 256):
        out = paged_prefill_attention(q.cuda().bfloat16(), kb, vb, tables.cuda(), lens, cu.cuda(), window=window)
        last = q[cu[1:] - 1].cuda().bfloat16()  # each sequence's last query as a decode step
        dec = paged_decode_attention(last, kb, vb, tables.cuda(), lens, window=window, num_splits=4)
        check_bf16_against_band(out, dec, q, cu, keys, window)
    hf = _tiny_mistral(9)
    config, model = _ours(hf, 9)
    prompts = [list(range(40, 40 + n)) for n in (3, 30, 12)]
    outputs = []
    for eager in (True, False):
        engine = LLMEngine(model.to("cuda", torch.bfloat16), ByteTokenizer(), config,
                           EngineConfig(block_size=16, max_model_len=128, num_kv_blocks=64, enforce_eager=eager),
                           device=torch.device("cuda"), dtype=torch.bfloat16)
        outputs.append(run_to_completion(engine, prompts, SamplingParams(max_tokens=30, temperature=0.0,
                                                                         ignore_eos=True)))
        assert eager or engine.runner.forward_counts["graph"] > 0
    assert outputs[0] == outputs[1]


def test_disable_sliding_window_attends_fully_within_a_context_capped_at_the_window(tmp_path):
    """vLLM's disable_sliding_window: inside the window full attention is the window's, so the same tokens; the
    context is the window; a longer max_model_len is refused naming the cap; an engine given a windowed model is
    told to build it from model_config.without_sliding_window()."""
    tiny_qwen2_checkpoint(tmp_path, sliding_window=8)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    windowed = LLM(str(tmp_path), num_kv_blocks=32, block_size=4)
    full = LLM(str(tmp_path), num_kv_blocks=32, block_size=4, disable_sliding_window=True)
    assert windowed.llm_engine.model_config.sliding_window == 8 and windowed.llm_engine.max_model_len == 256
    assert full.llm_engine.model_config.sliding_window is None and full.llm_engine.max_model_len == 8
    assert full.llm_engine.scheduler.block_manager.sliding_window is None
    prompt = [5, 6, 7, 8, 9]
    assert [o.outputs[0].token_ids for o in full.generate([prompt], params)] == \
        [o.outputs[0].token_ids for o in windowed.generate([prompt], params)]
    with pytest.raises(ValueError, match="max_model_len=16 exceeds the model's context of 8 tokens .capped at its"):
        LLM(str(tmp_path), max_model_len=16, disable_sliding_window=True)
    with pytest.raises(ValueError, match="without_sliding_window"):
        LLMEngine(windowed.llm_engine.runner.model, ByteTokenizer(), windowed.llm_engine.model_config,
                  EngineConfig(num_kv_blocks=8, disable_sliding_window=True))
    with pytest.raises(TypeError, match="disable_sliding_window must be a bool"):
        EngineConfig(disable_sliding_window="yes")


def test_a_model_of_mixed_layers_is_cut_with_its_layer_types():
    """ModelConfig.layers(start, end) cuts layer_types with the layers: a self-speculative draft of the first layer
    and the stages of pipeline parallelism on a model whose layers mix full and sliding attention (Qwen2's
    use_sliding_window) were refused ("layer_types must list one ... for each of the 1 layers"); now their tokens
    are the plain engine's."""
    from minillm.engine.cache_config import resolve_engine_config
    from minillm.engine.executor import MultiProcExecutor, UniProcExecutor
    from minillm.engine.worker import RandomWeights, Worker
    config = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=6,
                         layer_types=["full_attention", "sliding_attention"])
    assert config.layers(1, 2).layer_types == ["sliding_attention"] and config.layers(0, 1).num_hidden_layers == 1
    with pytest.raises(ValueError, match="layers 1..2 are not a non-empty range of this model's 2"):
        config.layers(1, 3)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 5, 6, 7], [40, 41, 42]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = dict(max_model_len=64, block_size=4, num_kv_blocks=32)

    def tokens(**parallel) -> list[list[int]]:  # over RandomWeights(3): in this process, or in worker processes
        resolved = resolve_engine_config(EngineConfig(**engine, **parallel), config, torch.device("cpu"))
        kwargs = dict(model_config=config, engine_config=resolved, device=torch.device("cpu"), dtype=torch.float32,
                      model_source=RandomWeights(seed=3))
        executor = MultiProcExecutor({**kwargs, "seed": 0}) if parallel else UniProcExecutor(Worker(**kwargs))
        try:
            llm = LLMEngine(None, ByteTokenizer(), config, EngineConfig(**engine, **parallel), executor=executor)
            return run_to_completion(llm, prompts, params)
        finally:
            executor.shutdown()

    plain = tokens()
    assert tokens(pipeline_parallel_size=2) == plain
    model = RandomWeights(seed=3)(config, torch.device("cpu"), torch.float32)
    spec = {"method": "self_speculative", "num_speculative_tokens": 3, "draft_num_layers": 1}
    llm = LLMEngine(model, ByteTokenizer(), config, EngineConfig(**engine, speculative_config=spec))
    assert run_to_completion(llm, prompts, params) == plain
