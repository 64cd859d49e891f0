"""AutoRound (minillm.quant.autoround): learned rounding beats round-to-nearest on a block's output, its codes
stay on the grid, its checkpoint loads as GPTQ's does, and bad arguments are refused by name.

A tiny random Llama (test_quant_methods.CONFIG: hidden 64, 2 layers) and its calibration ids; group 32.
"""
from __future__ import annotations

import copy

import pytest
import torch

from minillm.engine.worker import build_model
from minillm.quant.autoround import SignRoundWeight, autoround_layer, block_output_error, quantize_autoround
from minillm.quant.driver import LayerRunner, quantize_model
from minillm.quant.recipes import quantize_recipe
from minillm.quant.rtn import fake_quantize
from test_gptq_recipes import _logits, _rel
from test_gptq_recipes import test_recipes_on_cuda_beat_rtn as _recipe_on_cuda_beats_rtn
from test_quant_methods import CALIB, CONFIG
from test_quant_seam import _checkpoint
from tiny import one_thread  # noqa: F401  (autouse: one thread)


@pytest.fixture(scope="module")
def dense():
    return build_model(CONFIG, _checkpoint(CONFIG).items(), torch.device("cpu"), torch.float32)


def _block_setup(dense):
    """A copy of the model, its layer 1, that layer's inputs (layer 0 already walked) and its dense outputs."""
    model = copy.deepcopy(dense)
    with torch.no_grad():
        runner = LayerRunner(model, CALIB, batch_size=2)
        runner.run(model.model.layers[0], advance=True)
        inputs = list(runner.batches)
        layer = model.model.layers[1]
        runner.run(layer, advance=True)
    return layer, inputs, [hidden + residual for _, _, hidden, residual in runner.batches]


def test_block_output_error_below_rtn(dense):
    layer, inputs, targets = _block_setup(dense)
    rtn_layer = copy.deepcopy(layer)
    for lin in (rtn_layer.self_attn.qkv_proj, rtn_layer.self_attn.o_proj, rtn_layer.mlp.gate_up_proj,
                rtn_layer.mlp.down_proj):
        lin.weight.data.copy_(fake_quantize(lin.weight.data, 4, 32, False))
    rtn = block_output_error(rtn_layer, inputs, targets)
    for m in layer.modules():  # the block learns on the torch backend, then gets its own back
        if hasattr(m, "backend"):
            m.backend = "reference"
    flags = [p.requires_grad for p in layer.parameters()]
    qweights, first, best = autoround_layer(layer, inputs, targets, 4, 32, iters=40,
                                            generator=torch.Generator().manual_seed(0))
    assert {m.backend for m in layer.modules() if hasattr(m, "backend")} == {"reference"}
    assert [p.requires_grad for p in layer.parameters()] == flags and all(p.grad is None for p in layer.parameters())
    learned = block_output_error(layer, inputs, targets)
    assert best <= first and len(qweights) == 4
    assert 0 < learned < 0.9 * rtn, f"AutoRound {learned:.4g} vs RTN {rtn:.4g}"
    # the weights written into the layer are the stored grid's
    for lin, qw in qweights.items():
        assert torch.equal(lin.weight.data, qw.dequantize())


@pytest.mark.parametrize("bits", [4, 3])
def test_codes_stay_on_the_grid_at_the_ends_of_every_range(bits):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    r = SignRoundWeight(w, bits, 32)
    with torch.no_grad():
        r.v.copy_(torch.where(torch.rand(r.v.shape) < 0.5, -0.5, 0.5))
        r.alpha.fill_(0.5)
        r.beta.fill_(0.5)
    qw = r.export()
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= (1 << bits) - 1
    assert int(qw.zeros.min()) >= 0 and int(qw.zeros.max()) <= (1 << bits) - 1
    assert torch.allclose(qw.dequantize(), r.fake_quantize().detach(), rtol=1e-3, atol=1e-3)  # fp16 scales
    r.fake_quantize().pow(2).sum().backward()  # a step far outside the ranges is clamped back into them
    r.sign_step(10.0)
    v, alpha = r.v.detach(), r.alpha.detach()
    assert float(v.abs().max()) == 0.5 and 0.5 <= float(alpha.min()) <= float(alpha.max()) <= 1.0


@pytest.mark.parametrize("bits", [4, 3])
def test_checkpoint_loads_as_gptq_and_beats_rtn(dense, bits):
    ref = _logits(dense, CALIB)
    rtn = _rel(_logits(quantize_model(dense, "rtn", bits=bits, group_size=32, progress=False).build(), CALIB), ref)
    before = [p.clone() for p in dense.parameters()]
    qm = quantize_recipe(dense, "autoround", CALIB, bits, 32, iters=30, batch_size=2, progress=False)
    config = qm.quantization_config
    assert config["quant_method"] == "gptq" and config["minillm_method"] == "autoround" and config["bits"] == bits
    assert not any("g_idx" in name for name in qm.state)
    err = _rel(_logits(qm.build(), CALIB), ref)
    assert 0 < err < rtn, f"AutoRound {err:.4f} vs RTN {rtn:.4f}"
    assert all(torch.equal(a, b) for a, b in zip(before, dense.parameters()))  # the dense model is untouched


def test_seeded_runs_are_identical(dense):
    a, b = (quantize_autoround(dense, CALIB, 4, 32, iters=4, batch_size=2, seed=3, progress=False) for _ in "ab")
    assert a.state.keys() == b.state.keys() and all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_bad_arguments_name_the_value_and_range(dense):
    with pytest.raises(ValueError, match=r"bits must be an int in 2\.\.8, got 1"):
        quantize_recipe(dense, "autoround", CALIB, bits=1)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_recipe(dense, "autoround", CALIB, group_size=48)
    with pytest.raises(ValueError, match=r"iters must be an int >= 1, got 0"):
        quantize_recipe(dense, "autoround", CALIB, group_size=32, iters=0)
    with pytest.raises(ValueError, match=r"lr must be a float in \(0, 0\.5\]"):
        quantize_autoround(dense, CALIB, group_size=32, lr=0.0)
    with pytest.raises(ValueError, match="group_size"):
        SignRoundWeight(torch.randn(4, 64), 4, 48)
    layer, inputs, targets = _block_setup(dense)
    with pytest.raises(ValueError, match="one target per batch"):
        autoround_layer(layer, inputs, targets[:1], group_size=32)


@pytest.mark.gpu
def test_autoround_on_cuda_beats_rtn():
    """Where the H200 runs it: the block learns on the torch backend (Triton's kernels have no backward)."""
    _recipe_on_cuda_beats_rtn("autoround")
