"""AWQ with block-output search (minillm.quant.awq_block): the salience of weights, the alpha search, and the
fold into a decoder layer (exact without clipping), on a tiny random Llama."""
from __future__ import annotations

import copy

import pytest
import torch

from minillm.engine.worker import build_model
from minillm.forward_context import forward_context
from minillm.quant.awq_block import awq_scale_layer, search_block_scales, weight_salience
from minillm.quant.driver import LayerRunner
from minillm.quant.rtn import fake_quantize
from test_quant_methods import CALIB, CONFIG
from test_quant_seam import _checkpoint
from tiny import one_thread  # noqa: F401  (autouse: one thread)


def test_weight_salience_is_the_mean_of_group_normalised_magnitudes():
    w = torch.tensor([[1.0, -2.0, 0.5, 0.25], [4.0, 1.0, -1.0, 2.0]])
    expected = torch.tensor([(0.5 + 1.0) / 2, (1.0 + 0.25) / 2, (1.0 + 0.5) / 2, (0.5 + 1.0) / 2])
    assert torch.allclose(weight_salience(w, 2), expected, atol=1e-5)
    assert torch.allclose(weight_salience(w, -1), torch.tensor([0.75, 0.625, 0.25, 0.3125]), atol=1e-5)


@pytest.mark.parametrize("duo_scaling", [True, False])
def test_search_block_scales_protects_outlier_channels(duo_scaling):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :2] *= 30.0  # two salient input channels
    w = torch.randn(32, 64, generator=g) * 0.1
    ref = x @ w.T
    s, alpha, errors = search_block_scales(w, x.abs().mean(dim=0), lambda wc: float(((x @ wc.T - ref) ** 2).sum()),
                                           4, 16, n_grid=10, duo_scaling=duo_scaling)
    assert len(errors) == 10 and alpha > 0 and min(errors) == errors[int(round(alpha * 10))] < errors[0]
    assert s[:2].min() > s[2:].max()  # the salient channels got the largest scales
    rtn = float(((x @ fake_quantize(w, 4, 16).T - ref) ** 2).sum())
    assert min(errors) < rtn
    with pytest.raises(ValueError, match="x_mean"):
        search_block_scales(w, torch.ones(63), lambda wc: 0.0, 4, 16)


@pytest.fixture(scope="module")
def model():
    return build_model(CONFIG, _checkpoint(CONFIG).items(), torch.device("cpu"), torch.float32)


def _layer_outputs(layer, batches) -> list[torch.Tensor]:
    outs = []
    for positions, meta, hidden, residual in batches:
        with torch.no_grad(), forward_context(meta):
            outs.append(torch.cat(layer(positions, hidden, residual), dim=-1))
    return outs


@pytest.mark.parametrize("clip", [False, True])
def test_awq_scale_layer_folds_scales_into_the_layer(model, clip):
    runner = LayerRunner(model, CALIB, batch_size=2)
    layer = copy.deepcopy(model.model.layers[0])
    before = _layer_outputs(layer, runner.batches)
    alphas = awq_scale_layer(layer, runner.batches, bits=4, group_size=32, n_grid=5, clip=clip)
    assert set(alphas) == {"qkv_proj", "gate_up_proj", "down_proj"}
    after = _layer_outputs(layer, runner.batches)
    orig = model.model.layers[0]
    assert not torch.equal(layer.input_layernorm.weight, orig.input_layernorm.weight) or alphas["qkv_proj"] == 0
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(after, before))
    if clip:  # clipping changes the function a little (that is its trade)
        assert err < 0.2
    else:     # the fold alone is exact up to fp32 rounding
        assert err < 1e-4
    with pytest.raises(ValueError, match="max_tokens"):
        awq_scale_layer(layer, runner.batches, bits=4, group_size=32, max_tokens=0)


def test_awq_scale_layer_searches_on_the_first_batches_only(model):
    """max_tokens keeps whole batches from the start: with 1 token it searches on the first batch alone."""
    runner = LayerRunner(model, CALIB, batch_size=2)
    one, first = copy.deepcopy(model.model.layers[0]), copy.deepcopy(model.model.layers[0])
    awq_scale_layer(one, runner.batches, bits=4, group_size=32, n_grid=5, max_tokens=1)
    awq_scale_layer(first, runner.batches[:1], bits=4, group_size=32, n_grid=5)
    assert all(torch.equal(a, b) for a, b in zip(one.parameters(), first.parameters()))
