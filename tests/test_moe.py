"""Mixtral-style sparse MoE in one process (chapter 11): the router, the expert loop with and without a capacity,
the model against transformers' MixtralForCausalLM and Qwen3MoeForCausalLM (the oracles) on tiny checkpoints saved
at test time and read by our HF loader, and the engine generating from them."""
from __future__ import annotations

import pytest
import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.forward_context import forward_context, prefill_metadata
from minillm.layers.moe import combine_expert_outputs, expert_capacity, route, route_topk, run_experts
from minillm.loader import load_hf_model
from minillm.models import MixtralForCausalLM, get_model_class
from minillm.sampling_params import SamplingParams
from tiny import one_thread  # noqa: F401  (autouse)
from tiny_moe import MOE_CONFIG, TINY_MOE, save_tiny_mixtral, save_with_tokenizer, tiny_qwen3_moe

transformers = pytest.importorskip("transformers")


def test_route_topk_keeps_the_best_experts_with_weights_that_sum_to_one():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 8, generator=g) * 3
    weights, ids = route_topk(logits, 2)
    assert weights.dtype == torch.float32 and ids.shape == (37, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(37))
    assert torch.equal(ids, logits.topk(2, dim=-1).indices)  # softmax is monotonic: the top logits win
    # renormalised top-k weights are a softmax over the kept logits alone
    torch.testing.assert_close(weights, torch.softmax(logits.gather(1, ids), dim=-1))
    assert (weights[:, 0] >= weights[:, 1]).all()
    # transformers' Mixtral router on the same logits picks the same experts with the same weights
    router = transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter(
        transformers.MixtralConfig(num_local_experts=8, num_experts_per_tok=2, hidden_size=8))
    router.weight.data = torch.eye(8)
    _, hf_weights, hf_ids = router(logits)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights)
    w1, i1 = route_topk(logits, 1)
    assert torch.equal(w1, torch.ones(37, 1)) and torch.equal(i1[:, 0], logits.argmax(-1))
    for bad in (0, 9, 2.0):
        with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 8\]"):
            route_topk(logits, bad)
    with pytest.raises(ValueError, match="router_logits must be"):
        route_topk(logits[0], 2)


def test_route_without_renormalising_keeps_the_softmax_probabilities():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 3.0]])
    weights, ids = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, dim=-1)
    assert torch.equal(ids, route_topk(logits, 2)[1])
    torch.testing.assert_close(weights, probs.gather(1, ids))  # [[0.665, 0.245], ...]: not summing to 1
    torch.testing.assert_close(route(logits, 2)[0], route_topk(logits, 2)[0])


def test_run_experts_groups_rows_and_drops_over_capacity_in_row_order():
    experts = [lambda x, s=s: x * s for s in (10.0, 20.0, 30.0)]
    rows = torch.arange(1.0, 8.0).unsqueeze(1)  # rows 1..7
    expert_of_row = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    out, counts, dropped = run_experts(rows, expert_of_row, experts)
    assert counts.tolist() == [2, 1, 4] and dropped == 0
    assert out[:, 0].tolist() == [30.0, 20.0, 90.0, 120.0, 100.0, 60.0, 210.0]
    out, counts, dropped = run_experts(rows, expert_of_row, experts, capacity=2)
    assert counts.tolist() == [2, 1, 4] and dropped == 2  # expert 2 keeps its first two rows (rows 1 and 3)
    assert out[:, 0].tolist() == [30.0, 20.0, 90.0, 0.0, 100.0, 60.0, 0.0]
    assert expert_capacity(10, 2, 4, None) is None and expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 2, 4, 1.25) == 7
    combined = combine_expert_outputs(torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([[0.5, 0.5],
                                                                                                [0.25, 0.75]]))
    assert combined[:, 0].tolist() == [1.5, 3.75]
    # no tokens at all (an expert-parallel rank whose slice of a decode step is empty)
    out, counts, dropped = run_experts(rows[:0], expert_of_row[:0], experts, capacity=2)
    assert out.shape == (0, 1) and counts.tolist() == [0, 0, 0] and dropped == 0
    assert combine_expert_outputs(out, torch.empty(0, 2)).shape == (0, 1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixtral")
    return directory, save_tiny_mixtral(directory)


def _prefill_logits(model, hf) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(prompt lengths, our logits, transformers') of three seeded prompts of 1, 13 and 40 tokens, ours packed in one
    prefill, transformers' one prompt at a time."""
    lens = [1, 13, 40]
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, MOE_CONFIG["vocab_size"], (n,), generator=g) for n in lens]
    with torch.no_grad(), forward_context(prefill_metadata(lens)):
        ours = model.compute_logits(model(torch.cat(seqs), torch.cat([torch.arange(n) for n in lens])))
        ref = torch.cat([hf(s[None]).logits[0] for s in seqs])
    return lens, ours, ref


def test_logits_match_transformers_mixtral(checkpoint):
    directory, hf = checkpoint
    config, weights = load_hf_model(directory)
    assert (config.architecture, config.num_local_experts, config.num_experts_per_tok) == ("mixtral", 4, 2)
    model = get_model_class(config.architecture)(config).eval()
    assert isinstance(model, MixtralForCausalLM)
    model.load_weights(weights)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())  # experts and routers counted
    lens, ours, ref = _prefill_logits(model, hf)
    assert ref.abs().max() > 1.0  # logits of a real scale: a wrong expert or weight would show
    assert (ours - ref).abs().max() <= 1e-4
    load = [block.load.last.tolist() for block in (layer.mlp for layer in model.model.layers)]
    assert all(sum(counts) == sum(lens) * 2 for counts in load)  # 54 tokens x top-2 rows per layer
    assert sum(1 for counts in load for c in counts if c) > 4  # the router spreads tokens over experts

    # every expert matters: zeroing one expert's down projection changes the logits
    model.model.layers[1].mlp.experts[3].w2.weight.data.zero_()
    assert (_prefill_logits(model, hf)[1] - ref).abs().max() > 1e-2


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_matches_transformers_and_generates(tmp_path, norm_topk_prob):
    """Qwen3-MoE: Mixtral's block under Llama's MLP names, on attention with per-head q/k norms, experts
    moe_intermediate_size wide, the router's k probabilities renormalised or kept as they are (norm_topk_prob)."""
    from minillm import LLM
    from minillm.models import Qwen3MoeForCausalLM
    hf = save_with_tokenizer(tiny_qwen3_moe(norm_topk_prob=norm_topk_prob), tmp_path)
    config, weights = load_hf_model(tmp_path)
    assert (config.architecture, config.qk_norm, config.num_local_experts, config.intermediate_size,
            config.norm_topk_prob, config.head_dim) == ("qwen3_moe", True, 4, 24, norm_topk_prob, 16)
    model = get_model_class(config.architecture)(config).eval()
    assert isinstance(model, Qwen3MoeForCausalLM)
    model.load_weights(weights)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())
    _, ours, ref = _prefill_logits(model, hf)
    assert ref.abs().max() > 1.0 and (ours - ref).abs().max() <= 1e-4
    llm = LLM(tmp_path, device="cpu", dtype="float32", max_model_len=64)
    prompt = [40, 2, 90, 17, 3, 3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()


def test_qwen3_moe_configs_we_cannot_run_are_named(tmp_path):
    from minillm.loader.hf import config_from_hf
    raw = tiny_qwen3_moe().config.to_dict()
    for bad, message in (({"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\], decoder_sparse_step=1\) is not"),
                         ({"decoder_sparse_step": 2}, r"decoder_sparse_step=2\) is not supported"),
                         ({"moe_intermediate_size": None}, "missing moe_intermediate_size")):
        with pytest.raises(ValueError, match=message):
            config_from_hf({**raw, **bad})


def test_the_fused_moe_path_gives_the_loops_logits(checkpoint, monkeypatch):
    """On the Triton backend (here Triton's interpreter) every MoE block runs kernels/fused_moe.py: the logits and
    the per-expert row counts of the loop, the experts' weights become views into the layer's stacks, and a weight
    update written into an expert's parameter reaches the fused path."""
    import minillm.kernels.fused_moe as fused_moe_module
    directory, hf = checkpoint
    config, weights = load_hf_model(directory)
    model = get_model_class(config.architecture)(config).eval()
    model.load_weights(weights)
    _, loop_logits, ref = _prefill_logits(model, hf)
    loop_counts = [layer.mlp.load.last.tolist() for layer in model.model.layers]
    calls, fused = [], fused_moe_module.fused_moe
    monkeypatch.setattr(fused_moe_module, "fused_moe", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    model.attention_backend = "triton"
    _, fused_logits, _ = _prefill_logits(model, hf)
    assert len(calls) == config.num_hidden_layers
    torch.testing.assert_close(fused_logits, loop_logits, rtol=1e-4, atol=1e-4)
    assert [layer.mlp.load.last.tolist() for layer in model.model.layers] == loop_counts
    block = model.model.layers[1].mlp
    assert block.experts[2].w13.weight.data_ptr() == block._stacks[0][0][2].data_ptr()  # a view, not a copy
    name = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    model.load_weights([(name, torch.zeros_like(block.experts[2].w2.weight))], strict=False)
    updated = _prefill_logits(model, hf)[1]
    assert (updated - fused_logits).abs().max() > 1e-3  # the stack saw the update
    model.attention_backend = "torch"
    torch.testing.assert_close(updated, _prefill_logits(model, hf)[1], rtol=1e-4, atol=1e-4)


def test_moe_engines_take_cuda_graphs_where_the_fused_path_runs():
    """On CUDA an MoE model's decode steps become graphs like a dense model's unless the expert loop must run
    (expert capacity, expert parallelism), whose shapes follow the routing (engine/cache_config.py)."""
    from minillm.engine.cache_config import resolve_engine_config
    cuda = torch.device("cuda")
    assert not resolve_engine_config(EngineConfig(), TINY_MOE, cuda).enforce_eager
    assert resolve_engine_config(EngineConfig(moe_capacity_factor=1.25), TINY_MOE, cuda).enforce_eager
    assert resolve_engine_config(EngineConfig(expert_parallel_size=2), TINY_MOE, cuda).enforce_eager
    assert resolve_engine_config(EngineConfig(), TINY_MOE, torch.device("cpu")).enforce_eager
    with pytest.raises(ValueError, match="moe_capacity_factor=1.25"):
        resolve_engine_config(EngineConfig(enforce_eager=False, moe_capacity_factor=1.25), TINY_MOE, cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_moe_decode_runs_in_cuda_graphs_with_the_eager_tokens(checkpoint):
    """With the fused path (no capacity, no expert parallelism) an MoE model's decode steps are captured as CUDA
    graphs like a dense model's: the greedy tokens of an eager engine, and the expert counts still kept."""
    from minillm import LLM
    from minillm.parallel.expert import collect_load_stats
    directory, _ = checkpoint
    prompts = [[5, 6, 7, 8], [40, 2, 90, 17, 3, 3], [9] * 11]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        # (a pool of its own size: from gpu_memory_utilization, an engine built after the file's other GPU tests
        # measured their engines' memory as its peak and found room for no block)
        llm = LLM(directory, device="cuda", dtype="float32", max_model_len=64, enforce_eager=eager,
                  kv_cache_memory=64 << 20)
        runner = llm.llm_engine.executor.driver_worker.runner
        assert (runner.cuda_graphs is None) == eager
        collect_load_stats(llm.llm_engine.executor, reset=True)
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        total = collect_load_stats(llm.llm_engine.executor)["total"]
        assert all(sum(layer) >= (4 + 6 + 11 + 3 * 11) * 2 for layer in total)  # every row of every step, top-2
        del llm
    assert outs[False] == outs[True]


def test_llm_greedy_matches_transformers_generate(checkpoint):
    from minillm import LLM
    directory, hf = checkpoint
    llm = LLM(directory, device="cpu", dtype="float32", max_model_len=64)
    prompts = [[5, 6, 7, 8], [40, 2, 90, 17, 3, 3]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()


def test_missing_expert_tensor_and_bad_moe_settings_are_named(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file
    directory, _ = checkpoint
    for name in ("config.json",):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    state = load_file(directory / "model.safetensors")
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        load_hf_model(tmp_path)
    with pytest.raises(ValueError, match="'mixtral' and 'qwen3_moe' need num_local_experts >= 1"):
        ModelConfig(architecture="mixtral")
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in \[1, num_local_experts=4\], got 5"):
        ModelConfig(architecture="mixtral", num_local_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="expert_parallel_size=2 runs attention replicated"):
        EngineConfig(expert_parallel_size=2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="moe_capacity_factor must be None or a finite number > 0"):
        EngineConfig(moe_capacity_factor=0)


def test_tensor_parallel_2_splits_every_expert_and_matches_one_process():
    """Without expert parallelism a MoE model still splits by tensor parallelism: each expert's w13 by columns and
    w2 by rows, like Llama's MLP, one all-reduce per MoE block after the combine (2 processes, gloo)."""
    from minillm.engine.executor import MultiProcExecutor
    from minillm.engine.llm_engine import LLMEngine
    from test_expert_parallel import ENGINE, _generate, _kwargs, expected_tokens
    from tiny import ByteTokenizer
    executor = MultiProcExecutor(_kwargs(tensor_parallel_size=2))
    try:
        engine = LLMEngine(None, ByteTokenizer(), TINY_MOE, EngineConfig(**ENGINE), executor=executor)
        assert _generate(engine) == expected_tokens()
        executor.collective_rpc("get_comm_stats", True)
        engine.add_request("bytes", list(range(1, 8)), SamplingParams(temperature=0, max_tokens=1))
        engine.step()
        # per layer 2 all-reduces of [T, hidden] (attention, MoE block), one after the embedding; fp32
        all_reduce = (2 * TINY_MOE.num_hidden_layers + 1) * 7 * TINY_MOE.hidden_size * 4
        assert [s["all_reduce"] for s in executor.collective_rpc("get_comm_stats")] == [all_reduce] * 2
    finally:
        executor.shutdown()


@pytest.mark.parametrize("method", ["draft_model", "self_speculative"])
def test_a_draft_of_the_first_layers_of_a_moe_target_keeps_its_experts(checkpoint, method):
    """draft_model with draft_num_layers copies the target's first layers into a model of the target's class:
    a Mixtral's layers hold experts, which a dense Llama has no place for (it raised KeyError on
    'mlp.gate_up_proj'). Greedy speculation gives plain decoding's tokens."""
    from minillm import LLM
    directory, _ = checkpoint
    prompts = [[5, 6, 7, 8], [40, 2, 90, 17, 3, 3]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    plain = LLM(directory, device="cpu", dtype="float32", max_model_len=64)
    spec = LLM(directory, device="cpu", dtype="float32", max_model_len=64,
               speculative_config={"method": method, "num_speculative_tokens": 3, "draft_num_layers": 1})
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert spec.llm_engine.speculative.metrics.num_verify_steps > 0
