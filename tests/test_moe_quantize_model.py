"""quantize_model (`minillm quantize`) on mixture-of-experts models: every expert's linears quantized, the routers
dense, GPTQ calibrating each expert on the rows routed to it, and checkpoints under Mixtral's / Qwen3-MoE's own
names that load back through the engine (CPU, tiny models)."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from minillm.forward_context import forward_context, prefill_metadata
from minillm.loader import load_hf_model
from minillm.quant.checkpoint import save_quantized
from minillm.quant.driver import quantize_model
from minillm.quant.rtn import quantize
from minillm.sampling_params import SamplingParams
from test_moe_quant import _quantized  # noqa: F401  (the same tiny checkpoint's loader)
from tiny import one_thread  # noqa: F401  (autouse)
from tiny_moe import save_tiny_mixtral, save_with_tokenizer, tiny_qwen3_moe

pytest.importorskip("transformers")
SHAPE = dict(hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from minillm.engine.worker import build_model
    directory = tmp_path_factory.mktemp("mixtral_qm")
    save_tiny_mixtral(directory, **SHAPE)
    config, weights = load_hf_model(directory)
    return directory, build_model(config, weights, torch.device("cpu"), torch.float32).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    n, seq_len = ids.shape
    with torch.no_grad(), forward_context(prefill_metadata([seq_len] * n, ids.device)):
        return model.compute_logits(model(ids.flatten(), torch.arange(seq_len, device=ids.device).repeat(n)))


def _calibration(n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 112, (n, seq_len), generator=torch.Generator().manual_seed(seed))  # the vocabulary


def test_a_rtn_mixtral_checkpoint_keeps_hf_names_and_loads_back(mixtral, tmp_path):
    """Experts' w1 / w3 / w2 become GPTQ-format tensors under block_sparse_moe (Mixtral's names), the routers stay
    dense, config.json is a MixtralConfig transformers reads, and the engine serves the directory with the built
    model's greedy tokens."""
    from minillm import LLM
    directory, model = mixtral
    qm = quantize_model(model, "rtn", group_size=64, progress=False)
    keys = set(qm.state)
    assert not any(".mlp." in k for k in keys)
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.block_sparse_moe"
        assert f"{prefix}.gate.weight" in keys and f"{prefix}.gate.qweight" not in keys  # the router: dense
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                assert {f"{prefix}.experts.{e}.{w}.{t}" for t in ("qweight", "scales", "qzeros")} <= keys
    out = save_quantized(qm, tmp_path / "q", source=str(directory))
    from transformers import AutoConfig
    hf = AutoConfig.from_pretrained(out)
    assert hf.model_type == "mixtral" and hf.num_local_experts == 4 and hf.num_experts_per_tok == 2
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    built = qm.build()
    prompt = [5, 6, 7, 8, 40, 2]
    llm = LLM(out, device="cpu", dtype="float32", max_model_len=64)
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0].token_ids
    tokens = list(prompt)
    for token in got:
        assert token == int(_logits(built, torch.tensor([tokens]))[-1].argmax())
        tokens.append(token)


def test_gptq_calibrates_each_expert_on_its_own_rows(mixtral):
    """GPTQ's per-expert Hessians: on the calibration text the quantized model's logits are closer to the dense
    model's than round-to-nearest's on the same grid."""
    _, model = mixtral
    ids = _calibration(8, 32)
    dense = _logits(model, ids)
    errors = {}
    for method in ("rtn", "gptq"):
        qm = quantize_model(model, method, group_size=64, calibration=ids if method == "gptq" else None,
                            progress=False)
        errors[method] = float((_logits(qm.build(), ids) - dense).pow(2).mean())
    assert errors["gptq"] < 0.8 * errors["rtn"], errors  # 0.71x when written


@pytest.mark.parametrize("group_size, act_order, tile_dot", [(64, False, False), (32, False, False),
                                                             (32, True, False), (64, False, True), (64, True, True)])
def test_a_gptq_moe_checkpoint_runs_the_grouped_gemm_with_the_loops_logits(mixtral, group_size, act_order, tile_dot,
                                                                          monkeypatch):
    """GPTQ's 4-bit experts (asymmetric) enter kernels/fused_moe.py's int4 kernel on the Triton backend (here
    Triton's interpreter, K tiles of 64): the per-expert loop's logits in fp32, with one group a tile (its scale
    applied to the tile's sums), with two (each weight scaled), and with act-order (each expert's rows sorted by
    group at load, its own input permutation gathered by the kernel); `tile_dot`: one-group tiles as one dot
    (fused_moe.INT4_TILE_DOT), plain and act-order."""
    import minillm.kernels.fused_moe as fused_moe_module
    monkeypatch.setattr(fused_moe_module, "INT4_TILE_DOT", tile_dot)
    _, model = mixtral
    ids = _calibration(4, 16)
    built = quantize_model(model, "gptq", group_size=group_size, calibration=ids, progress=False,
                           act_order=act_order).build()
    perms = [getattr(e.w2, "act_perm", None) for e in built.model.layers[0].mlp.experts]
    assert all((p is not None) == act_order for p in perms)
    if act_order:  # experts' own orders (a shared one would not test the per-expert gather)
        assert not torch.equal(perms[0], perms[1])
    loop = _logits(built, ids)
    built.attention_backend = "triton"
    fused = _logits(built, ids)
    assert built.model.layers[0].mlp._stacks[0][0].dtype == torch.int32
    torch.testing.assert_close(fused, loop, rtol=1e-4, atol=1e-4)


def test_an_awq_moe_checkpoint_reads_as_the_same_codes_in_gptq_layout(mixtral):
    """Hub AWQ MoE checkpoints (AutoAWQ's gemm format: words packed along the outputs in AWQ's nibble order, the
    experts' w1 / w3 packed into w13 by columns): the same 4-bit codes written as GPTQ and as AWQ tensors give one
    model's logits, and the AWQ one runs the int4 grouped GEMM with the loop's logits."""
    from minillm.engine.worker import build_model
    from minillm.quant.driver import hf_state_dict
    from minillm.quant.int4 import awq_tensors, gptq_tensors
    _, model = mixtral
    states = {"gptq": {}, "awq": {}}
    for name, tensor in hf_state_dict(model).items():
        prefix = name.removesuffix(".weight")
        # every decoder linear (attention and experts); not the routers (block_sparse_moe.gate) nor the norms
        if ".layers." in name and name.endswith(".weight") and tensor.dim() == 2 and not name.endswith(".gate.weight"):
            qw = quantize(tensor, 4, 64, False)
            for fmt, tensors in (("gptq", gptq_tensors(qw, zero_offset=1)), ("awq", awq_tensors(qw))):
                states[fmt].update({f"{prefix}.{k}": v.half() if k == "scales" else v for k, v in tensors.items()})
        else:
            for state in states.values():
                state[name] = tensor
    configs = {"gptq": dict(quant_method="gptq", bits=4, group_size=64, sym=False, desc_act=False),
               "awq": dict(quant_method="awq", bits=4, group_size=64, zero_point=True, version="gemm")}
    ids = _calibration(3, 12)
    logits = {}
    for fmt, state in states.items():
        config = dataclasses.replace(model.config, quantization=fmt, quantization_config=configs[fmt])
        built = build_model(config, state.items(), torch.device("cpu"), torch.float32).eval()
        logits[fmt] = _logits(built, ids)
    torch.testing.assert_close(logits["awq"], logits["gptq"], rtol=1e-5, atol=1e-5)
    assert (logits["awq"] - _logits(model, ids)).abs().max() > 1e-3  # the experts really are 4-bit
    built.attention_backend = "triton"
    assert built.model.layers[1].mlp._stacks[0][0].dtype == torch.int32
    torch.testing.assert_close(_logits(built, ids), logits["awq"], rtol=1e-4, atol=1e-4)


def test_an_expert_no_calibration_token_reached_is_rounded_to_nearest(mixtral):
    """One token routes to 2 of 4 experts per layer: the other two have no Hessian and get RTN's codes exactly; the
    two that saw the token get GPTQ's (which differ from RTN's)."""
    _, model = mixtral
    qm = quantize_model(model, "gptq", group_size=64, sym=True, calibration=_calibration(1, 1), progress=False)
    params = dict(model.named_parameters())
    same = []
    for e in range(4):
        name = f"model.layers.0.mlp.experts.{e}.w2.weight"
        rtn = quantize(params[name].detach(), 4, 64, True).unsigned_codes()
        stored = qm.state[f"model.layers.0.block_sparse_moe.experts.{e}.w2.qweight"]
        unpacked = torch.stack([(stored >> (4 * i)) & 0xF for i in range(8)], 1).reshape(-1, stored.shape[1]).T
        same.append(torch.equal(unpacked, rtn))
    assert sorted(same) == [False, False, True, True], same


def test_qwen3_moe_checkpoint_keeps_llama_expert_names(tmp_path):
    save_with_tokenizer(tiny_qwen3_moe(), tmp_path)
    from minillm.engine.worker import build_model
    config, weights = load_hf_model(tmp_path)
    weights = dict(weights)
    model = build_model(config, weights.items(), torch.device("cpu"), torch.float32).eval()
    qm = quantize_model(model, "fp8", progress=False)
    assert "model.layers.0.mlp.experts.3.gate_proj.weight_scale" in qm.state
    assert qm.state["model.layers.0.mlp.gate.weight"].dtype == torch.float32  # the router
    out = save_quantized(qm, tmp_path / "q", source=str(tmp_path))
    reread, _ = load_hf_model(out)
    assert (reread.architecture, reread.num_local_experts, reread.intermediate_size) == \
        ("qwen3_moe", config.num_local_experts, config.intermediate_size)
    ids = _calibration(2, 12)
    torch.testing.assert_close(_logits(qm.build(), ids), _logits(_quantized(config, weights, "fp8"), ids))


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="awq"), r"awq is not available for mixture-of-experts models \('mixtral', 4 experts"),
    (dict(method="smoothquant"), "smoothquant is not available"),
    (dict(method="gptq", asym_calib=True), "asym_calib is not available"),
    (dict(method="fp8", fp8_gptq=True), "fp8 with calibration is not available")])
def test_methods_that_fold_scales_or_pair_walks_refuse_experts_by_name(mixtral, kwargs, message):
    _, model = mixtral
    with pytest.raises(ValueError, match=message):
        quantize_model(model, calibration=_calibration(2, 8), progress=False, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("act_order", [False, True])
def test_on_a_gpu_gptq_experts_in_the_grouped_gemm_give_the_loops_logits(mixtral, act_order):
    """The int4 grouped GEMM on CUDA (bf16 dots of code - zero, act-order's permuted loads): the loop's logits (the
    INT4 kernels per expert) within TF32 / bf16 rounding."""
    from minillm.engine.worker import build_model
    _, model = mixtral
    ids = _calibration(4, 16)
    qm = quantize_model(model, "gptq", group_size=32, calibration=ids, progress=False, act_order=act_order)
    built = build_model(qm.config, qm.state.items(), torch.device("cuda"), torch.float32).eval()
    cuda_ids = ids.cuda()
    built.attention_backend = "torch"
    loop = _logits(built, cuda_ids).float()
    built.attention_backend = "triton"
    fused = _logits(built, cuda_ids).float()
    assert built.model.layers[0].mlp._stacks[0][0].dtype == torch.int32
    assert (fused - loop).abs().max() < 2e-2 * loop.abs().max(), (fused - loop).abs().max()
