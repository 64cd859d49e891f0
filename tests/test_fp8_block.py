"""Block-wise FP8 W8A8 (minillm/quant/fp8_block.py): finer scales beat per-tensor and per-channel fp8 on a layer
with a massive activation (and only there); GPTQ onto the tile grid; checkpoints load through LLM(model=DIR) and
the CLI; tiles that do not divide are refused."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from minillm.engine.worker import build_model
from minillm.forward_context import forward_context, prefill_metadata
from minillm.llm import LLM
from minillm.quant.checkpoint import save_quantized
from minillm.sampling_params import SamplingParams
from minillm.quant.driver import quantize_model
from minillm.quant.fp8 import FP8_DTYPE, fp8_linear, quantize_fp8
from minillm.quant.fp8_block import (Fp8BlockConfig, dequantize_fp8_block, fp8_block_linear, gptq_fp8_block,
                                     quantize_fp8_block, quantize_fp8_per_token_group)
from minillm.quant.gptq import HessianAccumulator
from test_quant_methods import CALIB, CONFIG, _byte_tokenizer_json, _logits, _rel
from test_quant_seam import _checkpoint
from tiny import one_thread  # noqa: F401  (autouse fixture)

BLOCK = (32, 32)  # the tiny model's k/v projections have 32 rows: 64 does not divide them


def test_tile_scales_are_local():
    """An outlier raises its own tile's scale only: every other tile's codes are the outlier-free ones."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    w8, scale = quantize_fp8_block(w, BLOCK)
    spiked = w.clone()
    spiked[40, 70] = 500.0  # tile (1, 2)
    w8s, scale_s = quantize_fp8_block(spiked, BLOCK)
    changed = scale_s != scale
    assert changed.sum() == 1 and changed[1, 2]
    assert torch.equal(scale, (w.reshape(2, 32, 3, 32).abs().amax(dim=(1, 3)) / 448))
    assert _rel(dequantize_fp8_block(w8, scale), w) < 0.04  # e4m3's ~2.4% RMS rounding
    x8, x_scale = quantize_fp8_per_token_group(torch.randn(5, 96, generator=g), 32)
    assert x8.dtype == FP8_DTYPE and x_scale.shape == (5, 3)


def test_output_error_below_per_tensor_and_per_channel_fp8():
    """A layer with a massive activation (Sun et al. 2024: single channels 1e4-1e5x the median, met by a tiny
    weight column). e4m3's normal range spans 2^15 below its 448, so a 25x outlier costs a per-token scale
    nothing; a 1e5x one pushes the token's other channels into e4m3's subnormals (fewer mantissa bits, then
    zero). Per-token-group scales confine that to the outlier's own group of 32 channels."""
    g = torch.Generator().manual_seed(0)
    n, k = 64, 128
    x = torch.randn(256, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.3 * torch.randn(256, k, generator=g)
    w = torch.randn(n, k, generator=g)
    ref_moderate = x @ w.T
    x[:, 5] *= 1e5
    w[:, 5] /= 1e5
    ref = x @ w.T

    def errors(x, ref):
        return (_rel(fp8_block_linear(x, *quantize_fp8_block(w, BLOCK), BLOCK), ref),
                _rel(fp8_linear(x, *quantize_fp8(w, per_channel=True)), ref),
                _rel(fp8_linear(x, *quantize_fp8(w, per_channel=False)), ref))

    block, per_channel, per_tensor = errors(x, ref)
    assert block < 0.7 * per_channel and block < 0.7 * per_tensor, (block, per_channel, per_tensor)
    # without the massive activation all three are e4m3's relative rounding, within 10% of each other
    block, per_channel, per_tensor = errors(x / torch.where(torch.arange(k) == 5, 1e5, 1.0), ref_moderate)
    assert abs(block / per_channel - 1) < 0.1 and abs(block / per_tensor - 1) < 0.1


def test_gptq_onto_the_tile_grid_lowers_output_error():
    """GPTQ per tile row in scaled coordinates (gptq_fp8_block): same tile scales as round-to-nearest, far less
    output error on held-out inputs with the calibration's correlations."""
    g = torch.Generator().manual_seed(0)
    k = 96
    mix = torch.randn(8, k, generator=g)

    def inputs(n: int) -> torch.Tensor:
        return torch.randn(n, 8, generator=g) @ mix + 0.3 * torch.randn(n, k, generator=g)

    w = torch.randn(64, k, generator=g) * 0.05
    acc = HessianAccumulator(k)
    acc.add(inputs(1024))
    held_out = inputs(256)
    rtn_codes, rtn_scale = quantize_fp8_block(w, BLOCK)
    ref = held_out @ w.T
    rtn_err = _rel(held_out @ dequantize_fp8_block(rtn_codes, rtn_scale).T, ref)
    for act_order in (False, True):
        codes, scale = gptq_fp8_block(w, acc.H, BLOCK, act_order=act_order)
        assert codes.dtype == FP8_DTYPE and torch.equal(scale, rtn_scale)
        assert _rel(held_out @ dequantize_fp8_block(codes, scale).T, ref) < 0.5 * rtn_err


@pytest.fixture(scope="module")
def dense():
    state = _checkpoint(CONFIG)
    return build_model(CONFIG, state.items(), torch.device("cpu"), torch.float32), state


def test_checkpoint_round_trips_through_llm(tmp_path, dense):
    qm = quantize_model(dense[0], "fp8_block", progress=False, weight_block_size=BLOCK)
    assert qm.quantization_config == {"quant_method": "fp8_block", "activation_scheme": "dynamic",
                                      "weight_block_size": [32, 32]}
    assert qm.state["model.layers.0.self_attn.k_proj.weight"].dtype == FP8_DTYPE
    assert qm.state["model.layers.0.self_attn.k_proj.weight_scale_inv"].shape == (1, 2)  # [32 / 32, 64 / 32]
    _byte_tokenizer_json(tmp_path)
    save_quantized(qm, tmp_path / "q", source=str(tmp_path))
    llm = LLM(model=tmp_path / "q", max_model_len=64, max_num_seqs=2)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    quantized = _logits(llm.llm_engine.runner.model, ids)
    # the q/k/v and gate/up scale shards land in their tile rows: the same model as quantizing the packed
    # dense weights at load time
    at_load = dataclasses.replace(CONFIG, quantization="fp8_block", quantization_config={"weight_block_size": [32, 32]})
    assert torch.equal(quantized, _logits(build_model(at_load, dense[1].items(), torch.device("cpu"),
                                                      torch.float32), ids))
    assert _rel(quantized, _logits(dense[0], ids)) < 0.15  # LOGIT_ERROR's fp8 bound on this random model
    out = llm.generate(["hello"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_gptq_checkpoint_round_trips_through_llm(tmp_path, dense):
    qm = quantize_model(dense[0], "fp8_block", calibration=CALIB, progress=False, weight_block_size=BLOCK,
                        fp8_gptq=True)
    assert qm.quantization_config["minillm_recipe"] == {"gptq": True, "act_order": False}
    rtn = quantize_model(dense[0], "fp8_block", progress=False, weight_block_size=BLOCK)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(qm.state[name + "_scale_inv"], rtn.state[name + "_scale_inv"])  # same tiles, other codes
    assert not torch.equal(qm.state[name].float(), rtn.state[name].float())
    _byte_tokenizer_json(tmp_path)
    save_quantized(qm, tmp_path / "q", source=str(tmp_path))
    llm = LLM(model=tmp_path / "q", max_model_len=64, max_num_seqs=2)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(llm.llm_engine.runner.model, ids), _logits(qm.build(), ids))
    with pytest.raises(ValueError, match="fp8_gptq .a bool. only"):
        quantize_model(dense[0], "fp8_block", calibration=CALIB, fp8_mse_scale=True)
    with pytest.raises(ValueError, match="act_order .* needs fp8_gptq"):
        quantize_model(dense[0], "fp8_block", calibration=CALIB, act_order=True)


def test_bad_block_sizes_are_refused(tmp_path, dense):
    with pytest.raises(ValueError, match=r"block_k=48 does not divide .*in_features=64.*\[16, 32, 64\]"):
        quantize_model(dense[0], "fp8_block", weight_block_size=48)
    with pytest.raises(ValueError, match=r"block_n=64 does not divide .*32 output rows.*\[16, 32\]"):
        quantize_model(dense[0], "fp8_block", weight_block_size=64)
    with pytest.raises(ValueError, match="multiple of 16"):
        quantize_model(dense[0], "fp8_block", weight_block_size=(32, 20))
    with pytest.raises(ValueError, match="multiple of 16"):
        Fp8BlockConfig.from_config({"quant_method": "fp8_block", "weight_block_size": [128]})
    with pytest.raises(ValueError, match="activation_scheme"):
        Fp8BlockConfig.from_config({"quant_method": "fp8_block", "activation_scheme": "static"})
    with pytest.raises(ValueError, match="does not divide"):  # load time, default 64 x 64 tiles
        build_model(dataclasses.replace(CONFIG, quantization="fp8_block"), dense[1].items(), torch.device("cpu"),
                    torch.float32)
    with pytest.raises(ValueError, match="w must be"):
        quantize_fp8_block(torch.randn(64), BLOCK)


def test_cli_quantize_fp8_block(tmp_path, dense, capsys):
    from safetensors.torch import save_file

    from minillm.cli import main
    from minillm.quant.checkpoint import hf_config_dict
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    save_file(dense[1], str(tmp_path / "model.safetensors"))
    _byte_tokenizer_json(tmp_path)
    code = main(["quantize", str(tmp_path), "--method", "fp8_block", "--block-size", "16,32",
                 "--out", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8_block", "activation_scheme": "dynamic", "weight_block_size": [16, 32]}
    assert main(["quantize", str(tmp_path), "--method", "fp8_block", "--block-size", "32", "--gptq", "--act-order",
                 "--calib-samples", "2", "--calib-seq-len", "16", "--out", str(tmp_path / "g")]) == 0
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["minillm_recipe"] == {"gptq": True, "act_order": True}
    assert main(["quantize", str(tmp_path), "--method", "fp8_block", "--block-size", "64",
                 "--out", str(tmp_path / "x")]) == 2
    assert "block_n=64 does not divide" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--method", "fp8", "--block-size", "32", "--out", str(tmp_path / "y")]) == 2
    assert "belongs to --method fp8_block" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--method", "fp8_block", "--block-size", "32", "--mse-scale",
                 "--out", str(tmp_path / "z")]) == 2
    assert "takes --gptq only" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_engine_runs_the_triton_kernels(tmp_path, dense):
    """On CUDA the layers run per_token_group_quant_fp8 and fp8_block_gemm: one layer on the same input gives the
    CPU emulation's output (the same e4m3 codes: the quantiser divides with IEEE rounding, as torch does; only the
    fp32 summation order differs); the whole model's logits stay closer to the emulation's than quantisation is to
    the dense model; LLM(model=DIR) generates in bf16 with CUDA graphs.

    Why not the whole model to 1e-2: on the H200 (2026-12-03) its fp32 logits were 3.6% from the emulation's (with
    Triton's approximate division in the quantiser; not re-measured since). The likely cause, not yet confirmed:
    every layer's input differs in the last bits between the devices (the GPU's attention kernels use TF32 dots),
    and an activation near an e4m3 rounding boundary then takes the neighbouring code, a 6% step for that element;
    on a tiny random model the flips compound. A wrong kernel (scales per tensor, a K-block's scale on its neighbour) is off
    by tens of percent at the layer, which the first check catches."""
    qm = quantize_model(dense[0], "fp8_block", progress=False, weight_block_size=BLOCK)
    layer = qm.build().model.layers[0].mlp.down_proj
    x = torch.randn(5, layer.weight.shape[1], generator=torch.Generator().manual_seed(1))
    cpu_y = fp8_block_linear(x, layer.weight, layer.weight_scale_inv, BLOCK)
    cuda_y = fp8_block_linear(x.cuda(), layer.weight.cuda(), layer.weight_scale_inv.cuda(), BLOCK).cpu()
    assert _rel(cuda_y, cpu_y) < 1e-4
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    cpu = _logits(qm.build(), ids)
    quant_error = _rel(cpu, _logits(dense[0], ids))
    ids = ids.cuda()
    n, length = ids.shape
    model = qm.build("cuda")
    with torch.no_grad(), forward_context(prefill_metadata([length] * n, device=ids.device)):
        cuda = model.compute_logits(model(ids.flatten(), torch.arange(length, device="cuda").repeat(n))).cpu()
    assert _rel(cuda, cpu) < quant_error
    _byte_tokenizer_json(tmp_path)
    save_quantized(qm, tmp_path / "q", source=str(tmp_path))
    llm = LLM(model=tmp_path / "q", max_model_len=64, max_num_seqs=2, dtype="bfloat16")
    out = llm.generate(["hello", "fp8"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]
