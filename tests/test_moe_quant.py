"""Quantized mixture-of-experts models (minillm.models.moe): `LLM(mixtral, quantization=...)` gives every expert's
w13 and w2 the method a dense MLP's linears get (the router stays dense), and the expert loop runs them.

The oracle: a layer's effective weight is what it does to the identity (layer(I) = I W^T: for a weight-only method
its dequantized weight, exactly; for fp8 too, as the rows of I quantize exactly). A dense model given those weights
must give the quantized model's logits: a wrong shard, a swapped expert or an expert left dense would show.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.worker import build_model
from minillm.forward_context import forward_context, prefill_metadata
from minillm.layers.linear import Linear
from minillm.loader import load_hf_model
from minillm.quant.base import apply_quantization_override
from minillm.sampling_params import SamplingParams
from tiny import one_thread  # noqa: F401  (autouse)
from tiny_moe import TINY_MOE, save_tiny_mixtral, save_with_tokenizer, tiny_qwen3_moe

pytest.importorskip("transformers")
SHAPE = dict(hidden_size=64, intermediate_size=128)  # wide enough for groups of 64 (rtn, nf4)
WEIGHT_ONLY = ("int8_rtn", "rtn", "nf4")
FUSED = ("int8_rtn", "fp8", "rtn")  # the methods whose experts enter kernels/fused_moe.py (rtn: 4-bit g64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mixtral_q")
    save_tiny_mixtral(directory, **SHAPE)
    config, weights = load_hf_model(directory)
    return directory, config, dict(weights)


def _quantized(config, weights, method):
    return build_model(apply_quantization_override(config, method), weights.items(), torch.device("cpu"),
                       torch.float32).eval()


def _effective_weight(layer: Linear) -> torch.Tensor:
    """The [out, in] weight `layer` multiplies by: its output on the identity, transposed."""
    with torch.no_grad():
        return layer.quant_method.apply(layer, torch.eye(layer.input_size), None).T.contiguous()


def _logits(model, prompts):
    lens = [len(p) for p in prompts]
    device = next(model.parameters()).device
    with torch.no_grad(), forward_context(prefill_metadata(lens, device)):
        hidden = model(torch.tensor([t for p in prompts for t in p], device=device),
                       torch.cat([torch.arange(n) for n in lens]).to(device))
        return model.compute_logits(hidden)


PROMPTS = [[5, 6, 7, 8], [40, 2, 90, 17, 3, 3, 11, 60, 1], [9] * 13]


@pytest.mark.parametrize("method", WEIGHT_ONLY + ("fp8", "int8"))
def test_every_expert_is_quantized_and_the_router_stays_dense(checkpoint, method):
    _, config, weights = checkpoint
    model = _quantized(config, weights, method)
    dense = build_model(config, weights.items(), torch.device("cpu"), torch.float32)
    for layer, dense_layer in zip(model.model.layers, dense.model.layers):
        block = layer.mlp
        # 8-bit codes with row scales take the grouped GEMM; 4-bit and outlier-column methods the loop
        assert block.gate.is_dense and block.fusable == (method in FUSED)
        for expert in block.experts:
            assert not expert.w13.is_dense and not expert.w2.is_dense
        bytes_q = sum(p.numel() * p.element_size() for p in block.experts.parameters())
        bytes_d = sum(p.numel() * p.element_size() for p in dense_layer.mlp.experts.parameters())
        assert bytes_q < 0.3 * bytes_d, (method, bytes_q, bytes_d)  # 8 bits or fewer a weight, against fp32


@pytest.mark.parametrize("method", WEIGHT_ONLY)
def test_a_quantized_moe_computes_with_its_dequantized_weights(checkpoint, method):
    """Logits of the quantized model = those of a dense model holding every linear's effective weight (experts
    and attention), within fp32 rounding; and far from the unquantized model's, so the test sees quantization."""
    _, config, weights = checkpoint
    model = _quantized(config, weights, method)
    oracle = build_model(config, weights.items(), torch.device("cpu"), torch.float32).eval()
    quantized_layers = dict(model.named_modules())
    errors = []
    with torch.no_grad():
        for name, module in oracle.named_modules():
            if isinstance(module, Linear) and not quantized_layers[name].is_dense:
                effective = _effective_weight(quantized_layers[name])
                errors.append(float((effective - module.weight).norm() / module.weight.norm()))
                module.weight.copy_(effective)
    # each layer holds its own checkpoint tensor, rounded (another expert's would be ~1.4 away): per layer qkv, o
    # and the 4 experts' w13 and w2
    assert len(errors) == 2 * (2 + 2 * 4) and max(errors) < 0.2, errors
    dense = build_model(config, weights.items(), torch.device("cpu"), torch.float32).eval()
    got, want, unquantized = (_logits(m, PROMPTS) for m in (model, oracle, dense))
    assert (got - want).abs().max() < 1e-4
    assert (got - unquantized).abs().max() > 1e-3  # the experts really are rounded


@pytest.mark.parametrize("method", FUSED)
def test_quantized_experts_in_the_grouped_gemm_give_the_loops_logits(checkpoint, method, monkeypatch):
    """On the Triton backend (here Triton's interpreter) int8_rtn, fp8 and 4-bit rtn experts run
    kernels/fused_moe.py on their codes (stacked per layer, each expert's parameters views into the stacks): 8-bit
    codes with the row scales applied after the sum, fp8's activation rows rounded to e4m3 first, 4-bit words
    dequantized per group in the K loop: the loop's logits (the same codes dequantized in torch, the same e4m3
    activations), in fp32."""
    import minillm.kernels.fused_moe as fused_moe_module
    _, config, weights = checkpoint
    model = _quantized(config, weights, method)
    loop = _logits(model, PROMPTS)
    calls, fused = [], fused_moe_module.fused_moe
    monkeypatch.setattr(fused_moe_module, "fused_moe", lambda *a, **kw: calls.append(kw) or fused(*a, **kw))
    model.attention_backend = "triton"
    got = _logits(model, PROMPTS)
    assert len(calls) == config.num_hidden_layers
    assert all((kw.get("quantize_rows") is not None) == (method == "fp8") for kw in calls)
    block = model.model.layers[1].mlp
    operands, _ = block._stacks
    assert operands[0].dtype == {"int8_rtn": torch.int8, "fp8": torch.float8_e4m3fn, "rtn": torch.int32}[method]
    names = block.experts[2].w13.quant_method.expert_operands
    assert len(names) == len(operands) == (3 if method == "rtn" else 2)
    for name, stack in zip(names, operands):  # views, not copies
        assert getattr(block.experts[2].w13, name).data_ptr() == stack[2].data_ptr()
    torch.testing.assert_close(got, loop, rtol=1e-4, atol=1e-4)
    dense = build_model(config, weights.items(), torch.device("cpu"), torch.float32).eval()
    assert (got - _logits(dense, PROMPTS)).abs().max() > 1e-3  # the codes really are rounded


def _check_serving(directory, config, weights, method, device):
    """LLM(mixtral, quantization=method) on `device`: the engine's greedy tokens are the quantized model's own
    greedy argmax run step by step without a cache (on a GPU, where kernels round by batch shape, up to a tie)."""
    from minillm import LLM
    llm = LLM(str(directory), quantization=method, device=device, dtype="float32", max_model_len=64,
              **({"kv_cache_memory": 64 << 20} if device == "cuda" else {}))
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    del llm
    model = build_model(apply_quantization_override(config, method), weights.items(), torch.device(device),
                        torch.float32).eval()
    for prompt, out in zip(PROMPTS, outs):
        tokens = list(prompt)
        for got in out.outputs[0].token_ids:
            row = _logits(model, [tokens])[-1].float().cpu()
            if got != int(row.argmax()):
                assert device == "cuda" and float(row.max() - row[got]) < 1e-3, (method, prompt, tokens, got)
                break
            tokens.append(got)


@pytest.mark.parametrize("method", ["int8_rtn", "fp8"])
def test_llm_serves_a_quantized_moe_checkpoint(checkpoint, method):
    _check_serving(*checkpoint, method, "cpu")


def test_llm_serves_a_quantized_qwen3_moe_checkpoint(tmp_path):
    """Qwen3-MoE's experts (Llama's MLP names, moe_intermediate_size wide) quantize the same way."""
    save_with_tokenizer(tiny_qwen3_moe(), tmp_path)
    config, weights = load_hf_model(tmp_path)
    assert config.architecture == "qwen3_moe"
    _check_serving(tmp_path, config, dict(weights), "int8_rtn", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["int8_rtn", "rtn", "nf4", "fp8"])
def test_on_a_gpu_llm_serves_a_quantized_moe_checkpoint(checkpoint, method):
    """The same on CUDA, where each method's GPU kernels run every expert's rows (the loop, eagerly)."""
    _check_serving(*checkpoint, method, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", FUSED)
def test_on_a_gpu_quantized_experts_in_the_grouped_gemm_give_the_loops_logits(checkpoint, method):
    """The same on CUDA, where int8 and 4-bit codes meet the activations as TF32 in registers and e4m3 rows meet e4m3
    codes on the fp8 tensor cores. int8_rtn and rtn: the loop's logits (cuBLAS on the dequantized weights, the INT4
    kernels) within TF32's sum order.
    fp8: the loop runs an expert's few rows as W8A16 (the decode GEMV: bf16 activations) and more as W8A8, the
    fused path every row as W8A8, so the two differ by activation rounding: the fused logits must then be as close
    to the unquantized model's as the loop's are (within 1.5x)."""
    _, config, weights = checkpoint
    cuda = torch.device("cuda")
    model = build_model(apply_quantization_override(config, method), weights.items(), cuda, torch.float32).eval()
    model.attention_backend = "torch"
    loop = _logits(model, PROMPTS).float()
    model.attention_backend = "triton"
    fused = _logits(model, PROMPTS).float()
    assert model.model.layers[0].mlp._stacks is not None
    scale = loop.abs().max()
    if method != "fp8":
        assert (fused - loop).abs().max() < 2e-2 * scale, (fused - loop).abs().max()
    else:
        dense = _logits(build_model(config, weights.items(), cuda, torch.float32).eval(), PROMPTS).float()
        loop_error, fused_error = (loop - dense).abs().max(), (fused - dense).abs().max()
        assert fused_error < 1.5 * loop_error + 1e-3 * scale, (fused_error, loop_error)


def test_only_quantized_moe_models_on_the_expert_loop_run_eagerly_on_cuda():
    """int8_rtn, fp8 and 4-bit experts keep the fused path, whose decode steps are CUDA graphs; the other experts
    (nf4, 3-bit, act-order GPTQ split by tensor parallelism) run the loop, whose shapes follow the routing: eager,
    and enforce_eager=False refused by name."""
    from minillm.engine.cache_config import resolve_engine_config
    cuda = torch.device("cuda")
    gptq = dict(quant_method="gptq", bits=4, group_size=32, sym=False)
    act_order = dataclasses.replace(TINY_MOE, quantization="gptq", quantization_config={**gptq, "desc_act": True})
    fused = [dataclasses.replace(TINY_MOE, quantization=method) for method in FUSED] + [
        dataclasses.replace(TINY_MOE, quantization="gptq", quantization_config=gptq), act_order]
    for config in fused:
        assert not resolve_engine_config(EngineConfig(), config, cuda).enforce_eager, config.quantization
    loop = [dataclasses.replace(TINY_MOE, quantization="nf4"),
            dataclasses.replace(TINY_MOE, quantization="rtn", quantization_config={"bits": 3, "group_size": 32})]
    for config in loop:
        assert resolve_engine_config(EngineConfig(), config, cuda).enforce_eager, config.quantization_config
    # a row-parallel rank's share of act-order's groups is not whole: its w2 keeps g_idx, so the loop
    assert resolve_engine_config(EngineConfig(tensor_parallel_size=2), act_order, cuda).enforce_eager
    assert not resolve_engine_config(EngineConfig(tensor_parallel_size=2), fused[-2], cuda).enforce_eager
    with pytest.raises(ValueError, match="quantization='nf4'.*int8_rtn, fp8 or 4-bit .* experts"):
        resolve_engine_config(EngineConfig(enforce_eager=False), loop[0], cuda)


def test_expert_parallel_rows_take_the_grouped_gemm_with_the_loops_outputs(checkpoint):
    """Under expert parallelism a rank's received rows (one local expert each) run the grouped GEMM as top-1 routing
    of weight 1: each row's own expert's output and the per-expert counts of run_experts (the loop), and nothing
    for an empty receipt."""
    from minillm.layers.moe import run_experts
    _, config, weights = checkpoint
    block = _quantized(config, weights, "int8_rtn").model.layers[0].mlp
    block.experts[0].act_fn.backend = "triton"
    rows = torch.randn(11, config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([3, 0, 0, 2, 3, 3, 1, 0, 2, 2, 3])
    stacks = block._fused_stacks(rows)
    assert stacks is not None
    out, counts = block._grouped_rows(stacks, rows, ids)
    want, want_counts, _ = run_experts(rows, ids, list(block.experts))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert counts.tolist() == want_counts.tolist() == [3, 1, 3, 4]
    out, counts = block._grouped_rows(stacks, rows[:0], ids[:0])
    assert out.shape == (0, config.hidden_size) and counts.tolist() == [0, 0, 0, 0]


def test_pruning_and_the_recipes_refuse_experts_by_name(checkpoint):
    """Pruning's, the recipes' (gptq+, awq+gptq) and AutoRound's layer walks know a dense MLP only: a clear error, not an AttributeError deep in a layer, naming
    the load-time methods that do take experts (quantize_model's experts: tests/test_moe_quantize_model.py)."""
    from minillm.quant.prune import prune_model
    _, config, weights = checkpoint
    model = build_model(config, weights.items(), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"prune_model .*'mixtral' has 4 experts a layer.*quantization=.*int8_rtn"):
        prune_model(model, "magnitude", 0.5)
    from minillm.quant.autoround import quantize_autoround
    from minillm.quant.recipes import quantize_recipe
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"quantize_recipe \('awq\+gptq'\) .*'mixtral' has 4 experts"):
        quantize_recipe(model, "awq+gptq", ids)
    with pytest.raises(ValueError, match=r"quantize_autoround .*'mixtral' has 4 experts"):
        quantize_autoround(model, ids)


@pytest.mark.parametrize("parallel, quantization", [
    (dict(expert_parallel_size=2), dict(quantization="int8_rtn")),
    # a row's scale over w2's and o_proj's whole input, of which each rank holds half (whole_weight_amax)
    (dict(tensor_parallel_size=2), dict(quantization="int8_rtn")),
    # per group of 32 input columns: every group inside one rank's half
    (dict(tensor_parallel_size=2), dict(quantization="rtn", quantization_options={"group_size": 32})),
    # the grouped GEMM (Triton's interpreter) on each rank's halves of the experts' 4-bit words
    (dict(tensor_parallel_size=2), dict(quantization="rtn", quantization_options={"group_size": 32},
                                        attention_backend="triton")),
    # each rank's received rows through the grouped GEMM (top-1), int8 codes
    (dict(expert_parallel_size=2), dict(quantization="int8_rtn", attention_backend="triton"))])
def test_parallel_workers_quantize_their_own_experts_alike(checkpoint, parallel, quantization):
    """Each worker quantizes the experts (or the halves of each expert) it holds while loading; the tokens and
    log-probs are one process's."""
    from minillm import LLM
    directory, _, _ = checkpoint
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)
    options = dict(**quantization, device="cpu", dtype="float32", max_model_len=64)

    def results(llm):  # (token ids, [(token, log-prob) of each position's top entries])
        return [(o.outputs[0].token_ids, [(t, lp.logprob) for d in o.outputs[0].logprobs for t, lp in d.items()])
                for o in llm.generate(PROMPTS, params)]
    expected = results(LLM(str(directory), **options))
    llm = LLM(str(directory), **parallel, **options)
    try:
        got = results(llm)
    finally:
        llm.llm_engine.shutdown()
    for (ids, entries), (want_ids, want_entries) in zip(got, expected):
        assert ids == want_ids and [t for t, _ in entries] == [t for t, _ in want_entries]
        assert max(abs(a - b) for (_, a), (_, b) in zip(entries, want_entries)) < 1e-4


def _fp8_block_32(w):
    from minillm.quant.fp8_block import quantize_fp8_block
    return quantize_fp8_block(w, (32, 32))


@pytest.mark.parametrize("hub_config, scale_name, load_time", [
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "weight_scale", ("fp8", None)),
    # DeepSeek-V3's / Qwen3-FP8's spelling: "fp8" with weight_block_size, one weight_scale_inv per tile
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [32, 32]},
     "weight_scale_inv", ("fp8_block", {"weight_block_size": [32, 32]}))])
def test_an_fp8_moe_checkpoint_loads_as_load_time_fp8(checkpoint, tmp_path, hub_config, scale_name, load_time):
    """A serialized fp8 Mixtral (every expert's w1 / w2 / w3 and the attention's projections as float8_e4m3fn
    with their scales, the router and embeddings dense, as fp8 checkpoints on the hub store them) gives the logits
    of the dense checkpoint quantized the same way while loading: w1 and w3 land in their halves of w13, codes and
    scales alike."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    from minillm.quant.fp8 import quantize_fp8
    directory, config, weights = checkpoint
    quantizer = quantize_fp8 if scale_name == "weight_scale" else _fp8_block_32
    state = load_file(directory / "model.safetensors")
    for name in [n for n in state if n.endswith("proj.weight") or ".experts." in n]:
        state[name], state[name.removesuffix("weight") + scale_name] = quantizer(state[name])
    assert any(f".experts.3.w3.{scale_name}" in n for n in state)
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(directory / "tokenizer.json", tmp_path / "tokenizer.json")
    hf_config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "quantization_config": hub_config}))
    served_config, served_weights = load_hf_model(tmp_path)
    assert served_config.quantization == load_time[0]
    served = build_model(served_config, served_weights, torch.device("cpu"), torch.float32).eval()
    assert served.model.layers[1].mlp.experts[2].w13.weight.dtype == torch.float8_e4m3fn
    assert served.model.layers[1].mlp.gate.weight.dtype == torch.float32
    method, options = load_time
    at_load = dataclasses.replace(config, quantization=method, quantization_config=options)
    expected = build_model(at_load, weights.items(), torch.device("cpu"), torch.float32).eval()
    torch.testing.assert_close(_logits(served, PROMPTS), _logits(expected, PROMPTS), atol=1e-5, rtol=1e-5)
    if "fmt" in hub_config:  # e5m2 weights are refused by name, not read as e4m3
        (tmp_path / "config.json").write_text(json.dumps({**hf_config, "quantization_config": {**hub_config,
                                                                                               "fmt": "e5m2"}}))
        with pytest.raises(ValueError, match="format 'e5m2'; minillm reads e4m3 only"):
            load_hf_model(tmp_path)
