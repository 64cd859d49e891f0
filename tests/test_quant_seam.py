"""The quantized-linear seam (minillm.quant.base) with a method that really quantizes: int8 RTN, weight-only.

A tiny random Llama is saved as HF-named tensors, loaded once dense and once with quantization="int8_rtn"
through the same `build_model` path LLM uses; the int8 model must hold only int8 weights and scales, match the
dense layers within int8's rounding error, and generate the same greedy tokens in the engine.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.layers.linear import Linear, MergedColumnLinear, QKVLinear
from minillm.engine.worker import build_model
from minillm.llm import LLM
from minillm.quant.base import (QUANTIZATION_METHODS, UnquantizedLinearMethod, apply_quantization_override,
                                check_quantization_name, make_quant_config)
from minillm.quant.int8_rtn import Int8RTNConfig, Int8RTNLinearMethod, quantize_per_channel_int8
from minillm.quant.rtn import quantize
from minillm.sampling_params import SamplingParams
from tiny import ByteTokenizer, EOS, one_thread  # noqa: F401  (one_thread: autouse fixture)

CONFIG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS)


def _checkpoint(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random weights (separate q/k/v and gate/up tensors, as a checkpoint stores them)."""
    from minillm.loader.model_files import expected_weight_shapes
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_weight_shapes(config).items():
        if "norm" in name:
            state[name] = torch.ones(shape)
        else:
            std = 0.5 if "embed" in name else shape[-1] ** -0.5
            state[name] = torch.randn(shape, generator=g) * std
    return state


@pytest.fixture(scope="module")
def models():
    state = _checkpoint(CONFIG)
    dense = build_model(CONFIG, state.items(), torch.device("cpu"), torch.float32)
    int8_config = apply_quantization_override(CONFIG, "int8_rtn")
    quantized = build_model(int8_config, state.items(), torch.device("cpu"), torch.float32)
    return dense, quantized, int8_config, state


def _linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def test_every_linear_holds_int8_weights_and_no_dense_copy(models):
    dense, quantized, _, _ = models
    linears = _linears(quantized)
    assert len(linears) == 4 * CONFIG.num_hidden_layers
    for name, layer in linears.items():
        assert isinstance(layer.quant_method, Int8RTNLinearMethod), name
        params = dict(layer.named_parameters())
        assert set(params) == {"qweight", "weight_scale"}, name
        assert params["qweight"].dtype == torch.int8 and params["qweight"].shape == (layer.output_size,
                                                                                      layer.input_size)
        assert params["weight_scale"].shape == (layer.output_size,)
        assert not hasattr(layer, "weight")
    assert all(isinstance(m.quant_method, UnquantizedLinearMethod) for m in _linears(dense).values())
    int8_bytes = sum(p.numel() * p.element_size() for m in linears.values() for p in m.parameters())
    fp32_bytes = sum(p.numel() * p.element_size() for m in _linears(dense).values() for p in m.parameters())
    assert int8_bytes < 0.27 * fp32_bytes  # 1 byte per weight + one fp32 scale per row


def test_packed_shards_land_in_their_rows(models):
    """q/k/v and gate/up loaded through the packed weight_loader: each shard's rows quantize on their own."""
    _, quantized, _, state = models
    attn, mlp = quantized.model.layers[1].self_attn, quantized.model.layers[1].mlp
    assert isinstance(attn.qkv_proj, QKVLinear) and isinstance(mlp.gate_up_proj, MergedColumnLinear)
    p = "model.layers.1."
    for layer, names in ((attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                         (mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj"))):
        dense_rows = torch.cat([state[p + n + ".weight"] for n in names])
        q, scale = quantize_per_channel_int8(dense_rows)
        assert torch.equal(layer.qweight, q)
        torch.testing.assert_close(layer.weight_scale, scale)
        dequant = layer.qweight.float() * layer.weight_scale[:, None]
        # round-to-nearest: every weight within half a step of its channel's grid
        assert ((dequant - dense_rows).abs() <= layer.weight_scale[:, None] / 2 + 1e-7).all()


def test_layer_outputs_within_int8_tolerance(models):
    dense, quantized, _, _ = models
    x = torch.randn(7, CONFIG.hidden_size, generator=torch.Generator().manual_seed(3))
    for (name, d), (_, q) in zip(_linears(dense).items(), _linears(quantized).items()):
        if d.input_size != CONFIG.hidden_size:
            continue
        ref, out = d(x), q(x)
        rel = (out - ref).norm() / ref.norm()
        assert rel < 0.02, f"{name}: relative error {rel:.4f}"
        assert not torch.equal(out, ref), f"{name}: int8 output identical to dense (nothing was quantized?)"


def _engine_outputs(model, config: ModelConfig, prompts, n: int, **options) -> list[list[int]]:
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(max_model_len=64, max_num_seqs=4, **options))
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in LLM.from_engine(engine).generate(prompts, params)]


def test_int8_model_generates_like_dense_in_the_engine(models):
    dense, quantized, int8_config, _ = models
    prompts = ["Hello", [5, 9, 200, 17], "int8 RTN"]
    ref = _engine_outputs(dense, CONFIG, prompts, 6)
    out = _engine_outputs(quantized, int8_config, prompts, 6)
    for r, o in zip(ref, out):
        assert len(o) == 6
        assert o[:3] == r[:3], (o, r)


@pytest.mark.parametrize("method", ["draft_model", "self_speculative"])
def test_a_draft_of_a_quantized_targets_first_layers_speculates_losslessly(models, method):
    """An undistilled draft of the target's first layers runs those (quantized) layers themselves: a copy built
    from the config could not take their processed int8 tensors (draft_model raised KeyError on qkv_proj.weight)."""
    _, quantized, int8_config, _ = models
    prompts = ["Hello", [5, 9, 200, 17], "int8 RTN"]
    spec = {"method": method, "num_speculative_tokens": 3, "draft_num_layers": 1}
    assert _engine_outputs(quantized, int8_config, prompts, 8, speculative_config=spec) == \
        _engine_outputs(quantized, int8_config, prompts, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_a_draft_sharing_a_quantized_targets_layers_keeps_its_own_cache():
    """The draft of an int8 target's first layer runs the target's own modules with a KV pool of its own: each
    runner points the shared attention modules at its pool before its forward, and each captures its own CUDA
    graphs. Greedy speculation gives the tokens of plain decoding, under graphs and eagerly."""
    int8_config = apply_quantization_override(CONFIG, "int8_rtn")
    model = build_model(int8_config, _checkpoint(CONFIG).items(), torch.device("cuda"), torch.float32)
    prompts = [[5, 9, 200, 17], list(range(40, 90)), [7] * 30]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    spec = {"method": "draft_model", "num_speculative_tokens": 3, "draft_num_layers": 1}
    runs = {}
    for name, options in (("plain", {}), ("draft", dict(speculative_config=spec)),
                          ("draft eager", dict(speculative_config=spec, enforce_eager=True))):
        engine = LLMEngine(model, ByteTokenizer(), int8_config, EngineConfig(
            max_model_len=128, max_num_seqs=4, kv_cache_memory=32 << 20, **options), device="cuda",
            dtype=torch.float32)
        runs[name] = [o.outputs[0].token_ids for o in LLM.from_engine(engine).generate(prompts, params)]
    assert runs["draft"] == runs["plain"] and runs["draft eager"] == runs["plain"]


def test_modules_to_not_convert_keeps_layers_dense():
    config = dataclasses.replace(CONFIG, quantization="int8_rtn",
                                 quantization_config={"quant_method": "int8_rtn", "modules_to_not_convert": ["mlp"]})
    model = build_model(config, _checkpoint(CONFIG).items(), torch.device("cpu"), torch.float32)
    kinds = {name: type(m.quant_method).__name__ for name, m in _linears(model).items()}
    assert kinds["model.layers.0.mlp.down_proj"] == "UnquantizedLinearMethod"
    assert kinds["model.layers.0.self_attn.o_proj"] == "Int8RTNLinearMethod"


def test_unknown_quantization_names_the_known_ones():
    known = ", ".join(sorted(QUANTIZATION_METHODS))
    with pytest.raises(ValueError, match=rf"unknown quantization 'int3_magic'; known quantization methods: {known}"):
        ModelConfig(quantization="int3_magic")
    with pytest.raises(ValueError, match="does not implement yet.*int8_rtn"):
        apply_quantization_override(CONFIG, "bitsandbytes")
    with pytest.raises(TypeError, match="quantization must be a string"):
        check_quantization_name(8)
    with pytest.raises(ValueError, match="bits=4"):
        make_quant_config(dataclasses.replace(CONFIG, quantization="int8_rtn", quantization_config={"bits": 4}))
    already = dataclasses.replace(CONFIG, quantization="int8_rtn")
    assert apply_quantization_override(already, None) is already
    assert isinstance(make_quant_config(already), Int8RTNConfig) and make_quant_config(CONFIG) is None


def test_hf_config_quantization_config_selects_the_method(tmp_path):
    import json

    from safetensors.torch import save_file

    from minillm.loader import load_model
    raw = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               quantization_config={"quant_method": "int8_rtn"})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file(_checkpoint(CONFIG), str(tmp_path / "model.safetensors"))
    from minillm.loader.hf import load_hf_model
    config, _ = load_hf_model(tmp_path)
    assert config.quantization == "int8_rtn" and config.quantization_config == {"quant_method": "int8_rtn"}
    raw["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="config.json: quantization 'bitsandbytes' .*known .*: .*int8_rtn"):
        load_model(str(tmp_path))


def test_unquantized_int8_layer_refuses_to_run():
    layer = Linear(8, 4, quant_method=Int8RTNLinearMethod())
    with pytest.raises(RuntimeError, match="not been quantized yet"):
        layer(torch.zeros(1, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_on_gpu_in_bf16_with_cuda_graphs():
    """On a GPU: the quantize-after-load path on CUDA, bf16 activations, and decode through CUDA graphs."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    state = _checkpoint(CONFIG)
    int8_config = apply_quantization_override(CONFIG, "int8_rtn")
    dense = build_model(CONFIG, state.items(), device, dtype)
    quantized = build_model(int8_config, state.items(), device, dtype)
    layer = quantized.model.layers[0].mlp.down_proj
    assert layer.qweight.is_cuda and layer.qweight.dtype == torch.int8 and layer.weight_scale.dtype == dtype

    def generate(model, config, eager: bool) -> list[list[int]]:
        engine = LLMEngine(model, ByteTokenizer(), config,
                           EngineConfig(max_model_len=64, max_num_seqs=4, num_kv_blocks=64, enforce_eager=eager),
                           device=device, dtype=dtype)
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        return [o.outputs[0].token_ids for o in LLM.from_engine(engine).generate(["Hello", [5, 9, 200]], params)]

    graphs, eager = generate(quantized, int8_config, False), generate(quantized, int8_config, True)
    assert graphs == eager  # the same kernels replayed
    assert [t[:2] for t in graphs] == [t[:2] for t in generate(dense, CONFIG, True)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_decode_reads_the_codes_on_gpu(monkeypatch):
    """At decode (<= 16 rows) an int8_rtn layer runs the GEMV on its int8 codes (weight_scale), not a dequantized
    copy; prefill keeps the reference. Both agree with x (q * s)^T in fp32."""
    import minillm.kernels.gemv as gemv_module
    calls, kernel = [], gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **kw: calls.append(kw.get("weight_scale") is not None)
                        or kernel(*a, **kw))
    layer = Linear(512, 384, quant_method=Int8RTNLinearMethod())
    layer.weight_loader(layer.weight, torch.randn(384, 512) / 512 ** 0.5)
    layer.quant_method.process_weights_after_loading(layer)
    layer = layer.to("cuda", torch.bfloat16)
    w = layer.qweight.float() * layer.weight_scale.float()[:, None]
    for rows, gemv_runs in ((1, True), (7, True), (16, True), (40, False)):
        x = torch.randn(rows, 512, device="cuda")
        calls.clear()
        with torch.no_grad():
            y = layer(x.bfloat16())
        assert calls == ([True] if gemv_runs else [])
        ref = x.bfloat16().float() @ w.T
        assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("method", ["int8_rtn", "fp8", "smoothquant"])
def test_quantized_decode_layers_fuse_the_norm_and_swiglu(monkeypatch, method):
    """Where a quantized layer's decode step is the GEMV on its 8-bit codes (LinearMethod.decode_codes), Linear
    fuses the RMSNorm before it and SwiGLU into that GEMV as for a dense weight. On the CPU the rule is forced
    (the interpreter runs the kernel): the fused calls equal norm, then the layer's own forward."""
    import importlib
    from minillm.kernels.fused import rms_norm, silu_and_mul
    from minillm.layers.norm import RMSNorm
    from minillm.quant.fp8 import Fp8LinearMethod
    from minillm.quant.smoothquant import Int8W8A8LinearMethod
    module = importlib.import_module({"int8_rtn": "minillm.quant.int8_rtn", "fp8": "minillm.quant.fp8",
                                      "smoothquant": "minillm.quant.smoothquant"}[method])
    k, n = 64, 48
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    if method == "smoothquant":
        qw = quantize(w, bits=8, group_size=-1, symmetric=True)
        layer = Linear(k, n, quant_method=Int8W8A8LinearMethod())
        layer.weight.data.copy_(qw.codes)
        layer.weight_scale.data.copy_(qw.scales[:, 0])
    else:
        layer = Linear(k, n, quant_method=Int8RTNLinearMethod() if method == "int8_rtn" else Fp8LinearMethod(False, True))
        layer.weight_loader(layer.weight, w)
        layer.quant_method.process_weights_after_loading(layer)
    x, res = torch.randn(1, k, generator=g), torch.randn(1, k, generator=g)
    assert not layer.fuses_rms_norm(x) and not layer.fuses_swiglu(torch.cat([x, x], -1))  # CPU: the reference
    monkeypatch.setattr(module, "quantized_gemv_applies", lambda x, *rows: True)
    norm = RMSNorm(k, eps=1e-5)
    norm.weight.data.copy_(torch.rand(k, generator=g) + 0.5)
    assert layer.fuses_rms_norm(x)
    y, h = layer.forward_rms_norm(x, res, norm)
    x_normed, h_ref = rms_norm(x, norm.weight, 1e-5, res)
    assert torch.equal(h, h_ref) and (y - layer(x_normed)).abs().max() < 1e-5
    gate_up = torch.randn(1, 2 * k, generator=g)
    assert layer.fuses_swiglu(gate_up)
    assert (layer(gate_up, swiglu=True) - layer(silu_and_mul(gate_up))).abs().max() < 1e-5
