"""Quantization methods behind the Linear seam (rtn, gptq, awq, fp8, smoothquant, nf4, int8), the model-level
driver, `minillm quantize` checkpoints and load-time quantization, on tiny random Llamas.

Error bounds are per method: what its grid costs on Gaussian weights, measured once and given some room; each
test also checks that something was quantized (the output is not bit-identical to dense).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.forward_context import forward_context, prefill_metadata
from minillm.layers.linear import Linear
from minillm.engine.worker import build_model
from minillm.llm import LLM
from minillm.quant.checkpoint import load_time_quantization, save_quantized, save_tokenizer
from minillm.quant.driver import quantize_model
from minillm.quant.fp8 import Fp8LinearMethod, fp8_linear, quantize_fp8
from minillm.quant.int4 import awq_tensors, gptq_tensors, pack_bits, unpack_awq, unpack_bits
from minillm.quant.llm_int8 import LLMInt8LinearMethod, llm_int8_linear
from minillm.quant.nf4 import (NF4LinearMethod, double_dequantize, double_quantize, nf4_levels, quantize_nf4)
from minillm.quant.rtn import QuantizedWeight, pack_int4, quantize
from minillm.quant.smoothquant import int8_linear, smoothing_factors
from minillm.quant.weight_only import WeightOnlyLinearMethod
from minillm.sampling_params import SamplingParams
from test_quant_seam import _checkpoint
from tiny import ByteTokenizer, EOS, one_thread  # noqa: F401  (one_thread: autouse fixture)

# intermediate 128: nf4's blocks of 64 must divide every in_features; kv_size 32 fills whole 3-bit words
CONFIG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS)
CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
RUNS = {"rtn": ("rtn", dict(group_size=32)), "gptq": ("gptq", dict(group_size=32)),
        "awq": ("awq", dict(group_size=32)), "fp8": ("fp8", {}), "smoothquant": ("smoothquant", {}),
        "nf4": ("nf4", {}), "int8": ("int8", {}),
        # the other shapes of the integer grid: act-order g_idx, 3-bit symmetric, 3-bit AWQ (stored as GPTQ)
        "gptq_act_order": ("gptq", dict(group_size=32, act_order=True)),
        # gptq+: act-order with static groups (no g_idx on disk) and the searched grid range
        "gptq_plus": ("gptq", dict(group_size=32, act_order=True, static_groups=True, grid_search=True)),
        "rtn_w3_sym": ("rtn", dict(bits=3, group_size=32, sym=True)),
        "awq_w3_channel": ("awq", dict(bits=3, group_size=-1))}
# relative error of the final logits vs dense on this random model (measured: 0.20, 0.15, 0.19, 0.09, 0.02,
# 0.22, 0.02, 0.22, 0.4, 0.42; random 2-layer models amplify weight error, so these are far above a real model's)
LOGIT_ERROR = {"rtn": 0.3, "gptq": 0.3, "awq": 0.3, "fp8": 0.15, "smoothquant": 0.05, "nf4": 0.3, "int8": 0.05,
               "gptq_act_order": 0.3, "gptq_plus": 0.3, "rtn_w3_sym": 0.6, "awq_w3_channel": 0.6}


@pytest.fixture(scope="module")
def dense():
    state = _checkpoint(CONFIG)
    return build_model(CONFIG, state.items(), torch.device("cpu"), torch.float32), state


@pytest.fixture(scope="module")
def quantized(dense):
    return {label: quantize_model(dense[0], method, calibration=CALIB, progress=False, **kw)
            for label, (method, kw) in RUNS.items()}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    n, length = ids.shape
    with torch.no_grad(), forward_context(prefill_metadata([length] * n)):
        return model.compute_logits(model(ids.flatten(), torch.arange(length).repeat(n)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- packing --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (64, 5))
    words = pack_bits(codes, bits, dim=0)
    assert words.shape == (64 * bits // 32, 5) and words.dtype == torch.int32
    assert torch.equal(unpack_bits(words, bits, 64, dim=0), codes.int())
    if bits == 4:  # the same words as rtn.pack_int4's sequential layout
        assert torch.equal(pack_bits(codes.T, 4), pack_int4(codes.T, torch.int32))
    with pytest.raises(ValueError, match="codes must lie"):
        pack_bits(codes + (1 << bits), bits, dim=0)


def test_awq_layout_interleaves_nibbles():
    qw = quantize(torch.randn(16, 32), bits=4, group_size=16)
    t = awq_tensors(qw)
    assert t["qweight"].shape == (32, 2)
    word = int(t["qweight"][0, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 0xF for i in range(8)] == [int(qw.codes[j, 0]) for j in (0, 2, 4, 6, 1, 3, 5, 7)]
    assert torch.equal(unpack_awq(t["qweight"], 16), qw.codes.T.int())


# -- single layers --------------------------------------------------------------------------------------------
def _layer(method, weight: torch.Tensor) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], quant_method=method)
    layer.weight_loader(layer.weight, weight)
    method.process_weights_after_loading(layer)
    method.process_weights_after_loading(layer)  # a second call is a no-op
    return layer


@pytest.mark.parametrize("method, bound", [
    (WeightOnlyLinearMethod(4, 64, False, "dense"), 0.12), (WeightOnlyLinearMethod(3, 64, True, "dense"), 0.3),
    (WeightOnlyLinearMethod(4, -1, False, "dense"), 0.15), (Fp8LinearMethod(False, True), 0.05),
    (Fp8LinearMethod(False, False), 0.06), (NF4LinearMethod(False), 0.12), (LLMInt8LinearMethod(False, 6.0), 0.02),
], ids=["rtn4_g64", "rtn3_sym", "rtn4_channel", "fp8_channel", "fp8_tensor", "nf4", "int8"])
def test_layer_output_within_method_error(method, bound):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 128, generator=g) / 128 ** 0.5, torch.randn(9, 128, generator=g)
    layer = _layer(method, w)
    assert "weight" not in layer._parameters or layer.weight.dtype != torch.float32  # no dense copy is kept
    ref, out = x @ w.T, layer(x)
    assert 0 < _rel(out, ref) < bound


def test_fp8_emulation_matches_hand_computation():
    # x/s_x = [448, 134.4]: 134.4 lies between e4m3's neighbours 128 and 144 (step 16 in [128, 256)) -> 128
    x, w = torch.tensor([[1.0, 0.3]]), torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    w8, scale = quantize_fp8(w)
    assert torch.equal(w8.float(), torch.tensor([[448.0, 448.0], [448.0, -224.0]]))
    torch.testing.assert_close(scale, torch.tensor([1 / 448, 2 / 448]))
    y = fp8_linear(x, w8, scale)
    x_dq = [1.0, 128 / 448]
    torch.testing.assert_close(y, torch.tensor([[x_dq[0] + x_dq[1], 2 * x_dq[0] - x_dq[1]]]))


def test_int8_linear_accumulates_exactly():
    g = torch.Generator().manual_seed(0)
    qweight = torch.randint(-127, 128, (5, 3000), generator=g).to(torch.int8)
    x = torch.randint(-127, 128, (2, 3000), generator=g).float()  # per-token max 127 -> scale 1, codes = x
    x[:, 0] = 127
    y = int8_linear(x, qweight, torch.ones(5))
    exact = (x.double() @ qweight.double().T)  # |y| up to 48M: fp32 accumulation would round
    assert torch.equal(y.double(), exact.float().double())


def test_llm_int8_keeps_outlier_columns_in_float():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=g) / 8, torch.randn(16, 64, generator=g)
    x[:, 5] *= 60  # an emergent outlier feature
    qw = quantize(w, bits=8, group_size=-1, symmetric=True)
    qweight, scale = qw.codes, qw.scales[:, 0]
    ref = x @ qw.dequantize().T
    plain, mixed = int8_linear(x, qweight, scale), llm_int8_linear(x, qweight, scale, threshold=6.0)
    assert _rel(mixed, ref) < 0.01 < _rel(plain, ref)
    assert torch.equal(llm_int8_linear(x / 100, qweight, scale, 6.0), int8_linear(x / 100, qweight, scale))


def test_smoothing_moves_activation_outliers_into_weights():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 64, generator=g) / 8, torch.randn(64, 64, generator=g)
    x[:, :3] *= 40
    ref = x @ w.T

    def w8a8(w_, x_):
        qw = quantize(w_, bits=8, group_size=-1, symmetric=True)
        return int8_linear(x_, qw.codes, qw.scales[:, 0])

    s = smoothing_factors(x.abs().amax(dim=0), [w], alpha=0.5)
    assert _rel(w8a8(w * s, x / s), ref) < 0.5 * _rel(w8a8(w, x), ref)
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(x.abs().amax(dim=0), [w], alpha=1.5)


def test_nf4_levels_and_double_quant_round_trip():
    levels = nf4_levels()
    # QLoRA's published NF4 table (bitsandbytes' constants), a few entries
    for i, v in {0: -1.0, 1: -0.6961928, 6: -0.0910500, 7: 0.0, 8: 0.0795803, 14: 0.7229568, 15: 1.0}.items():
        assert abs(float(levels[i]) - v) < 1e-6, (i, float(levels[i]))
    assert torch.all(levels[1:] > levels[:-1]) and levels.numel() == 16
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(0))
    codes, absmax = quantize_nf4(w)
    assert absmax.shape == (40, 2) and int(codes.max()) <= 15
    dq = levels[codes.long()].reshape(40, 2, 64) * absmax[..., None]
    assert torch.all(dq.reshape(40, 128).sub(w).abs() <= absmax.repeat_interleave(64, 1) * 0.17)  # max gap/2
    q, scale, offset = double_quantize(absmax)
    assert q.dtype == torch.int8 and q.shape == (1, 256) and scale.shape == (1,)
    back = double_dequantize(q, scale, offset, 80).reshape(40, 2)
    assert 0 < (back - absmax).abs().max() <= scale[0] / 2 + 1e-7


# -- the driver and the engine ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(RUNS))
def test_model_logits_within_method_error(dense, quantized, method):
    test_ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    ref = _logits(dense[0], test_ids)
    out = _logits(quantized[method].build(), test_ids)
    assert 0 < _rel(out, ref) < LOGIT_ERROR[method]


def test_gptq_beats_rtn_on_its_calibration_data(dense, quantized):
    ref = _logits(dense[0], CALIB)
    gptq, rtn = (_rel(_logits(quantized[m].build(), CALIB), ref) for m in ("gptq", "rtn"))
    assert gptq < 0.9 * rtn


def test_gptq_plus_stores_no_g_idx_and_its_options_are_gptq_only(dense, quantized):
    qm = quantized["gptq_plus"]
    assert qm.quantization_config["desc_act"] is False and not any(k.endswith("g_idx") for k in qm.state)
    assert quantized["gptq_act_order"].quantization_config["desc_act"] is True
    with pytest.raises(ValueError, match="grid_search is a GPTQ option; got it with method 'rtn'"):
        quantize_model(dense[0], "rtn", grid_search=True, progress=False)


def _act_order_weight(bits: int, groups: list[int], seed: int = 0):
    """A GPTQ act-order QuantizedWeight [64, sum(groups)]: group j holds groups[j] input columns scattered by a
    random permutation (the order act-order processed them in), as g_idx records."""
    g = torch.Generator().manual_seed(seed)
    n_in, out = sum(groups), 64
    order = torch.randperm(n_in, generator=g)  # order[i]: the i-th column processed
    g_idx = torch.empty(n_in, dtype=torch.int32)
    g_idx[order] = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(groups)).int()
    codes = torch.randint(0, 1 << bits, (out, n_in), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.rand(out, len(groups), generator=g) + 0.5
    zeros = torch.randint(0, 1 << bits, (out, len(groups)), generator=g, dtype=torch.int32)
    return QuantizedWeight(codes, scales, zeros, bits, groups[0], False, g_idx=g_idx)


def _gptq_layer(qw) -> Linear:
    method = WeightOnlyLinearMethod(qw.bits, qw.group_size, False, "gptq", act_order=True)
    layer = Linear(qw.codes.shape[1], qw.codes.shape[0], quant_method=method)
    for name, tensor in gptq_tensors(qw).items():
        getattr(layer, name).weight_loader(getattr(layer, name), tensor)
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("bits", [4, 3])
def test_act_order_groups_are_sorted_once_at_load(bits):
    """An act-order checkpoint's input rows are sorted by group at load (sort_act_order): the layer holds
    act_perm instead of g_idx, so the fused kernel's plain group layout applies, and it computes what the
    per-column group gather did. Groups that are not whole (not group_size columns each) keep g_idx."""
    qw = _act_order_weight(bits, [32] * 4)
    layer = _gptq_layer(qw)
    assert hasattr(layer, "act_perm") and not hasattr(layer, "g_idx")
    assert not torch.equal(layer.act_perm, torch.arange(128))  # the permutation is not the identity
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    ref = x @ qw.dequantize().T
    assert _rel(layer(x), ref) < 1e-6
    uneven = _act_order_weight(bits, [32, 32, 32, 32], seed=2)
    uneven.g_idx[uneven.g_idx == 3] = 2  # group 2 now holds 64 columns, group 3 none
    kept = _gptq_layer(uneven)
    assert hasattr(kept, "g_idx") and not hasattr(kept, "act_perm")
    assert _rel(kept(x), x @ uneven.dequantize().T) < 1e-6


def test_act_order_checkpoints_load_sorted(quantized, dense):
    model = quantized["gptq_act_order"].build()
    layers = [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), WeightOnlyLinearMethod)]
    assert len(layers) == 2 * 4 and all(hasattr(m, "act_perm") and not hasattr(m, "g_idx") for m in layers)
    assert _rel(_logits(model, CALIB), _logits(dense[0], CALIB)) < LOGIT_ERROR["gptq_act_order"]


def test_awq_folds_scales_into_the_norms(dense, quantized):
    state = quantized["awq"].state
    norm = state["model.layers.0.input_layernorm.weight"]
    assert not torch.allclose(norm, dense[1]["model.layers.0.input_layernorm.weight"])
    assert quantized["awq"].quantization_config == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                                    "zero_point": True, "version": "gemm"}
    assert state["model.layers.0.mlp.up_proj.qweight"].shape == (64, 128 // 8)


def _engine_tokens(model, config, prompts, n):
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(max_model_len=64, max_num_seqs=4))
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in LLM.from_engine(engine).generate(prompts, params)]


@pytest.mark.parametrize("method", list(RUNS))
def test_quantized_model_generates_in_the_engine(dense, quantized, method):
    """Greedy decoding through the paged engine: the first token is the quantized model's own argmax, and for
    the 8-bit methods (small error) the first tokens equal dense's."""
    prompts = [[5, 9, 200, 17], [72, 101, 108, 108, 111]]
    model = quantized[method].build()
    out = _engine_tokens(model, quantized[method].config, prompts, 4)
    for prompt, tokens in zip(prompts, out):
        assert len(tokens) == 4
        assert tokens[0] == int(_logits(model, torch.tensor([prompt]))[-1].argmax())
    if method in ("smoothquant", "int8"):
        assert [t[:2] for t in out] == [t[:2] for t in _engine_tokens(dense[0], CONFIG, prompts, 2)]


# -- checkpoints ---------------------------------------------------------------------------------------------
def _byte_tokenizer_json(path):
    """Byte-level tokenizer.json: ids 0..255 are bytes, 256..299 special tokens (the tiny vocabulary is 300)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(f"<|{i}|>", special=True) for i in range(256, CONFIG.vocab_size)])
    backend.save(str(path / "tokenizer.json"))


@pytest.mark.parametrize("method", list(RUNS))
def test_checkpoint_round_trip_through_llm(tmp_path, quantized, method):
    qm = quantized[method]
    _byte_tokenizer_json(tmp_path)
    save_quantized(qm, tmp_path / "q", source=str(tmp_path))
    raw = json.loads((tmp_path / "q" / "config.json").read_text())
    assert raw["quantization_config"] == qm.quantization_config
    llm = LLM(model=tmp_path / "q", max_model_len=64, max_num_seqs=2)
    assert llm.llm_engine.model_config == qm.config
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(llm.llm_engine.runner.model, ids), _logits(qm.build(), ids))
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_cli_quantize_writes_a_gptq_checkpoint(tmp_path, dense, capsys):
    from safetensors.torch import save_file

    from minillm.cli import main
    from minillm.quant.checkpoint import hf_config_dict
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    save_file(dense[1], str(tmp_path / "model.safetensors"))
    _byte_tokenizer_json(tmp_path)
    code = main(["quantize", str(tmp_path), "--method", "rtn", "--bits", "3", "--group-size", "32", "--sym",
                 "--out", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym")} == \
        {"quant_method": "gptq", "bits": 3, "group_size": 32, "desc_act": False, "sym": True}
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    assert main(["quantize", str(tmp_path), "--method", "rtn", "--group-size", "48", "--out", str(tmp_path / "x")]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_gguf_tokenizer_is_written_as_tokenizer_json(tmp_path):
    from minillm.loader import Tokenizer, default_model_path
    tok = Tokenizer.from_gguf(default_model_path())
    save_tokenizer(tok, str(tmp_path))
    back = Tokenizer.from_hf_dir(tmp_path)
    text = "Quantization: 4-bit weights, <|im_end|> 123"
    assert back.encode(text) == tok.encode(text)
    assert (back.bos_token_id, back.eos_token_id, back.chat_template) == (tok.bos_token_id, tok.eos_token_id,
                                                                          tok.chat_template)


# -- load-time quantization and errors ----------------------------------------------------------------------
def test_load_time_quantization(dense):
    config = load_time_quantization(CONFIG, "rtn", {"bits": 8, "group_size": -1})
    assert config.quantization == "rtn" and load_time_quantization(CONFIG, None) is CONFIG
    model = build_model(config, dense[1].items(), torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    assert 0 < _rel(_logits(model, ids), _logits(dense[0], ids)) < 0.03
    for name in ("gptq", "awq", "smoothquant"):
        with pytest.raises(ValueError, match=f"minillm quantize MODEL --method {name}"):
            load_time_quantization(CONFIG, name)
    with pytest.raises(ValueError, match="bits must be one of"):
        load_time_quantization(CONFIG, "rtn", {"bits": 1})


def test_quantize_model_validates_its_inputs(dense):
    model = dense[0]
    with pytest.raises(ValueError, match="unknown method 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="needs calibration token ids"):
        quantize_model(model, "gptq", progress=False)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        quantize_model(model, "rtn", group_size=48)
    with pytest.raises(ValueError, match="fp8 stores 8-bit"):
        quantize_model(model, "fp8", bits=4)
    with pytest.raises(ValueError, match=r"calibration ids must lie in \[0, 300\)"):
        quantize_model(model, "awq", calibration=CALIB + 1000, progress=False)
    with pytest.raises(TypeError, match="needs a dense model"):
        quantize_model(build_model(dataclasses.replace(CONFIG, quantization="int8"), dense[1].items(),
                                   torch.device("cpu"), torch.float32), "rtn")


def test_int4_linear_keeps_the_reference_where_the_kernel_does_not_apply():
    """The fused INT4 kernel takes over only on CUDA, for 4-bit codes without act-order (g_idx)."""
    from minillm.quant.int4 import fused_kernel_applies
    qweight = torch.zeros(64, 256, dtype=torch.int32)  # K = 512, N = 256
    x = torch.randn(3, 512, dtype=torch.bfloat16)
    assert not fused_kernel_applies(x, qweight, 4, 128, None)  # CPU
    if torch.cuda.is_available():
        x, qweight = x.cuda(), qweight.cuda()
        assert fused_kernel_applies(x, qweight, 4, 128, None)
        assert not fused_kernel_applies(x, qweight, 4, 128, torch.zeros(512, dtype=torch.int32, device="cuda"))
        assert not fused_kernel_applies(x, qweight[:48], 3, 128, None)
        assert not fused_kernel_applies(x.float(), qweight, 4, 128, None)


@pytest.mark.gpu
def test_reference_call_sites_on_cuda_in_bf16(monkeypatch):
    """On the GPU the call sites (int4_linear, fp8_linear, int8_linear) agree with the CPU reference, and the
    FP8 / INT8 ones run the Triton GEMMs (minillm.kernels.fp8_gemm / int8_gemm), not the emulation."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import minillm.kernels.fp8_gemm as fp8_kernels
    import minillm.kernels.int8_gemm as int8_kernels
    launched = []
    for module, name in ((fp8_kernels, "fp8_gemm"), (int8_kernels, "int8_gemm")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _k=kernel, _n=name, **kw: launched.append(_n) or _k(*a, **kw))
    from minillm.quant.int4 import gptq_tensors, int4_linear
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(256, 512, generator=g) / 512 ** 0.5, torch.randn(33, 512, generator=g)
    t = gptq_tensors(quantize(w, 4, 128))
    ref = int4_linear(x, t["qweight"], t["scales"], t["qzeros"], 128)
    cuda = {k: v.cuda() for k, v in t.items()}
    from minillm.quant.int4 import fused_kernel_applies
    assert fused_kernel_applies(x.cuda().bfloat16(), cuda["qweight"], 4, 128, None)  # the Triton kernel, not the reference
    out = int4_linear(x.cuda().bfloat16(), cuda["qweight"], cuda["scales"].bfloat16(), cuda["qzeros"], 128)
    assert _rel(out.float().cpu(), ref) < 0.02
    w8, s = quantize_fp8(w)
    assert _rel(fp8_linear(x.cuda().bfloat16(), w8.cuda(), s.cuda()).float().cpu(), fp8_linear(x, w8, s)) < 0.02
    qw = quantize(w, bits=8, group_size=-1, symmetric=True)
    ref = int8_linear(x, qw.codes, qw.scales[:, 0])
    assert _rel(int8_linear(x.cuda(), qw.codes.cuda(), qw.scales[:, 0].cuda()).cpu(), ref) < 1e-4
    assert launched == ["fp8_gemm", "int8_gemm"]


def test_w8a8_gemv_rows_follow_the_matrix_size():
    """W8A8 layers leave x unquantized and run the code GEMV on one row, on up to four for small matrices."""
    from minillm.layers.gemv_dispatch import SMALL_MATRIX, w8a8_gemv_max_m
    assert w8a8_gemv_max_m(torch.empty(960, 576, dtype=torch.int8)) == 4  # SmolLM2's qkv
    assert w8a8_gemv_max_m(torch.empty(SMALL_MATRIX // 2048, 2048, dtype=torch.int8)) == 1
    assert w8a8_gemv_max_m(torch.empty(6144, 4096, dtype=torch.int8)) == 1  # Llama-3-8B's qkv


@pytest.mark.gpu
def test_w8a8_decode_runs_the_weight_only_gemv_on_cuda(monkeypatch):
    """On a decode step of one row (up to four on a small matrix) fp8_linear and int8_linear leave x in bf16 and
    run the GEMV on the 8-bit codes (W8A16); past that, the W8A8 GEMMs. Both agree with the CPU's exact W8A8
    reference within rounding."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import minillm.kernels.gemv as gemv_module
    calls, kernel = [], gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    g = torch.Generator().manual_seed(0)
    cases = (((384, 512), ((1, True), (4, True), (5, False), (17, False))),  # small: up to four rows
             ((4096, 2048), ((1, True), (2, False))))  # 2^23 weights: one row
    for (n, k), rows_runs in cases:
        w8, s = quantize_fp8(torch.randn(n, k, generator=g) / k ** 0.5)
        for rows, gemv_runs in rows_runs:
            calls.clear()
            x = torch.randn(rows, k, generator=g)
            y = fp8_linear(x.cuda().bfloat16(), w8.cuda(), s.cuda())
            assert bool(calls) == gemv_runs, (n, k, rows)
            assert _rel(y.float().cpu(), fp8_linear(x, w8, s)) < 0.03
        qw = quantize(torch.randn(n, k, generator=g) / k ** 0.5, bits=8, group_size=-1, symmetric=True)
        q, s = qw.codes, qw.scales[:, 0]
        for rows, gemv_runs in rows_runs:  # SmoothQuant's int8 call site: the same rule
            calls.clear()
            x = torch.randn(rows, k, generator=g)
            y = int8_linear(x.cuda().bfloat16(), q.cuda(), s.cuda())
            assert bool(calls) == gemv_runs, (n, k, rows)
            assert _rel(y.float().cpu(), int8_linear(x, q, s)) < 0.03


@pytest.mark.gpu
def test_act_order_layer_runs_the_fused_kernel_on_cuda(monkeypatch):
    """Sorted at load, an act-order layer on CUDA in bf16 runs minillm.kernels.int4_gemm (no per-call dequantize)
    and agrees with the CPU reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import minillm.kernels.int4_gemm as kernels
    launched, kernel = [], kernels.int4_gemm
    monkeypatch.setattr(kernels, "int4_gemm", lambda *a, **kw: launched.append(1) or kernel(*a, **kw))
    qw = _act_order_weight(4, [32] * 4)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    out = _gptq_layer(qw).to("cuda", torch.bfloat16)(x.cuda().bfloat16())
    assert launched and _rel(out.float().cpu(), x @ qw.dequantize().T) < 0.02


@pytest.mark.gpu
@pytest.mark.parametrize("method", list(RUNS))
def test_quantized_engine_on_cuda_graphs_equals_eager(quantized, method):
    """Each method's model on CUDA in bf16: decode replayed from CUDA graphs gives eager's tokens (the reference
    paths have no host syncs and no data-dependent shapes)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device, dtype = torch.device("cuda"), torch.bfloat16
    model = quantized[method].build(device, dtype)

    def generate(eager: bool) -> list[list[int]]:
        # an explicit pool: profiling would count whatever earlier GPU tests of this process still hold
        config = EngineConfig(max_model_len=64, max_num_seqs=4, num_kv_blocks=64, enforce_eager=eager)
        engine = LLMEngine(model, ByteTokenizer(), quantized[method].config, config, device=device, dtype=dtype)
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        return [o.outputs[0].token_ids for o in LLM.from_engine(engine).generate(["Hello", [5, 9, 200]], params)]

    assert generate(False) == generate(True)
