"""GPTQ's grid search (rtn.search_qparams, gptq_quantize(clip_search=True)) and the 4-bit recipes
(minillm.quant.recipes): AWQ scales then GPTQ rounding, on one layer and on a tiny random Llama.

Layer data imitates an LLM's: inputs correlated across channels with a few outlier channels tens of times
larger than the rest (what AWQ's scales and GPTQ's Hessian exploit), weights heavy-tailed (Student-t), so
that a min/max grid wastes its levels on a few large weights.
"""
from __future__ import annotations

import pytest
import torch

from minillm.engine.worker import build_model
from minillm.forward_context import forward_context, prefill_metadata
from minillm.quant.awq import search_scales
from minillm.quant.driver import quantize_model
from minillm.quant.gptq import HessianAccumulator, gptq_quantize
from minillm.quant.recipes import quantize_recipe
from minillm.quant.rtn import compute_qparams, dequantize_codes, fake_quantize, quantize_to_codes, search_qparams
from test_quant_methods import CALIB, CONFIG
from test_quant_seam import _checkpoint
from tiny import one_thread  # noqa: F401  (autouse: one thread)

IN, OUT, TOKENS = 128, 48, 2048


def _layer_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(calibration X, held-out X, W): correlated inputs with 4 outlier channels, heavy-tailed weights."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mix = torch.randn(IN, IN, generator=g) / IN ** 0.5 + torch.eye(IN)
    gain = torch.ones(IN)
    gain[torch.randperm(IN, generator=g)[:4]] = 20.0
    x = (torch.randn(2 * TOKENS, IN, generator=g) @ mix) * gain
    w = torch.distributions.StudentT(3.0).sample((OUT, IN)) * 0.05
    return x[:TOKENS], x[TOKENS:], w


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    return acc.H


def _out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor, xq: torch.Tensor | None = None) -> float:
    """Mean squared layer-output error of wq (reading xq, default x) against x w^T."""
    return float(((((x if xq is None else xq) @ wq.T) - x @ w.T) ** 2).mean())


def _grid_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, imp: torch.Tensor) -> torch.Tensor:
    z = None if zero is None else zero[..., None]
    q = dequantize_codes(quantize_to_codes(w, scale[..., None], z, 4), scale[..., None], z)
    return (imp * (w - q).abs().pow(2.4)).sum(dim=-1)


@pytest.mark.parametrize("symmetric", [False, True])
def test_search_qparams_never_worse_than_min_max_and_clips_outliers(symmetric):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 32))
    imp = torch.rand(32) + 0.1
    s, z = search_qparams(w, 4, symmetric, imp)
    s0, z0 = compute_qparams(w, 4, symmetric)
    assert torch.all(_grid_error(w, s, z, imp) <= _grid_error(w, s0, z0, imp) * (1 + 1e-6))
    assert torch.all(s <= s0 * (1 + 1e-6)) and (s < 0.97 * s0).sum() > 8  # heavy tails: ranges were shrunk
    assert (z is None) == symmetric
    with pytest.raises(ValueError, match="max_shrink"):
        search_qparams(w, 4, symmetric, max_shrink=1.0)
    with pytest.raises(ValueError, match="n_grid"):
        search_qparams(w, 4, symmetric, n_grid=0)


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
def test_gptq_clip_search_stays_below_rtn_and_below_plain_gptq(act_order, static_groups):
    x, x_test, w = _layer_data()
    H = _hessian(x)
    rtn = _out_err(x_test, w, fake_quantize(w, 4, 32))
    plain = gptq_quantize(w, H, 4, 32, act_order=act_order, static_groups=static_groups)
    clipped = gptq_quantize(w, H, 4, 32, act_order=act_order, static_groups=static_groups, clip_search=True)
    err_plain, err_clip = _out_err(x_test, w, plain.weight_dq), _out_err(x_test, w, clipped.weight_dq)
    assert err_clip < 0.7 * rtn, f"GPTQ+clip {err_clip:.4g} vs RTN {rtn:.4g}"
    assert err_clip < err_plain, f"GPTQ+clip {err_clip:.4g} vs GPTQ {err_plain:.4g}"
    # the codes, scales and zeros stored are the weight that was measured
    assert torch.allclose(clipped.qweight.dequantize(), clipped.weight_dq, atol=1e-6)


def test_awq_scales_then_gptq_beats_both_on_one_layer():
    """The recipe's two passes on one linear: AWQ's scales s (x -> x / s, W -> W s), then GPTQ on W s with the
    Hessian of x / s. On held-out inputs it beats AWQ (RTN of W s) and GPTQ alone."""
    x, x_test, w = _layer_data(seed=1)
    s, _, _ = search_scales([w], x, 4, 32)
    awq = _out_err(x_test, w, fake_quantize(w * s, 4, 32), xq=x_test / s)
    gptq = _out_err(x_test, w, gptq_quantize(w, _hessian(x), 4, 32, act_order=True, static_groups=True,
                                             clip_search=True).weight_dq)
    both = _out_err(x_test, w, gptq_quantize(w * s, _hessian(x / s), 4, 32, act_order=True, static_groups=True,
                                             clip_search=True).weight_dq, xq=x_test / s)
    rtn = _out_err(x_test, w, fake_quantize(w, 4, 32))
    assert both < min(awq, gptq) < rtn, f"AWQ+GPTQ {both:.4g}, AWQ {awq:.4g}, GPTQ {gptq:.4g}, RTN {rtn:.4g}"


# -- the recipes on a tiny random Llama ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense():
    return build_model(CONFIG, _checkpoint(CONFIG).items(), torch.device("cpu"), torch.float32)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    n, length = ids.shape
    with torch.no_grad(), forward_context(prefill_metadata([length] * n, device=ids.device)):
        hidden = model(ids.flatten(), torch.arange(length, device=ids.device).repeat(n))
    return model.compute_logits(hidden).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("recipe", ["gptq", "awq", "awq+gptq"])
def test_recipes_beat_rtn_on_a_tiny_model(dense, recipe):
    before = [p.clone() for p in dense.parameters()]
    ref = _logits(dense, CALIB)
    rtn = _rel(_logits(quantize_model(dense, "rtn", group_size=32, progress=False).build(), CALIB), ref)
    qm = quantize_recipe(dense, recipe, CALIB, 4, 32, progress=False)
    assert qm.quantization_config["minillm_method"] == recipe and "g_idx" not in str(list(qm.state))
    err = _rel(_logits(qm.build(), CALIB), ref)
    assert 0 < err < rtn, f"{recipe} {err:.4f} vs RTN {rtn:.4f}"
    assert all(torch.equal(a, b) for a, b in zip(before, dense.parameters()))  # the dense model is left as it was


def test_recipe_validates_its_inputs(dense):
    with pytest.raises(ValueError, match="recipe"):
        quantize_recipe(dense, "gptq+awq", CALIB)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_recipe(dense, "gptq", CALIB, group_size=48)
    with pytest.raises(ValueError, match="bits"):
        quantize_recipe(dense, "gptq", CALIB, bits=1)
    with pytest.raises(ValueError, match="calibration ids"):
        quantize_recipe(dense, "awq", CALIB + 1000)
    with pytest.raises(ValueError, match="calibration"):
        quantize_recipe(dense, "awq", CALIB.float())


# -- asymmetric calibration (quant/gptq_asym.py) ---------------------------------------------------------------
def test_asymmetric_target_is_the_least_squares_fit_of_the_unquantized_outputs():
    """W* fits x~ W^T from x (what the quantized walk feeds the layer) in the least-squares sense, streamed over
    batches like GPTQ's Hessian; with x~ = x nothing was quantized before and W* is W."""
    from minillm.quant.gptq_asym import PairedInputAccumulator, asymmetric_target
    g = torch.Generator().manual_seed(3)
    x_fp = torch.randn(600, 24, generator=g) @ torch.randn(24, 24, generator=g)
    x = x_fp + 0.1 * torch.randn(600, 24, generator=g)  # the error that reached the layer
    w = torch.randn(10, 24, generator=g)
    acc, same = PairedInputAccumulator(24), PairedInputAccumulator(24)
    for rows in torch.split(torch.arange(600), [100, 250, 250]):
        acc.add(x[rows], x_fp[rows])
        same.add(x[rows], x[rows])
    fit = torch.linalg.lstsq(x.double(), (x_fp @ w.T).double()).solution.T.float()
    target = asymmetric_target(w, acc.H, acc.D, percdamp=0.0)
    assert torch.allclose(target, fit, atol=1e-4, rtol=1e-4)
    assert (x @ target.T - x_fp @ w.T).norm() < (x @ w.T - x_fp @ w.T).norm()
    assert torch.allclose(asymmetric_target(w, same.H, same.D), w, atol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        acc.add(x[:5], x_fp[:4])


def test_asymmetric_gptq_lands_closer_to_the_unquantized_model(dense):
    """Aimed at the unquantized model's outputs, GPTQ's logits on the calibration text come closer to the dense
    model's than plain (sequential) GPTQ's, which aims each layer at its own quantized inputs."""
    ref = _logits(dense, CALIB)
    plain = quantize_model(dense, "gptq", bits=3, group_size=32, calibration=CALIB, progress=False)
    asym = quantize_model(dense, "gptq", bits=3, group_size=32, calibration=CALIB, asym_calib=True, progress=False)
    assert _rel(_logits(asym.build(), CALIB), ref) < _rel(_logits(plain.build(), CALIB), ref)
    with pytest.raises(ValueError, match="asym_calib is a GPTQ option"):
        quantize_model(dense, "rtn", asym_calib=True, progress=False)


def test_cli_quantizes_with_asymmetric_calibration(tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    from minillm.cli import main
    from minillm.quant.checkpoint import hf_config_dict
    from test_fp8_block import _byte_tokenizer_json
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    save_file(_checkpoint(CONFIG), str(tmp_path / "model.safetensors"))
    _byte_tokenizer_json(tmp_path)
    common = ["quantize", str(tmp_path), "--group-size", "32", "--calib-samples", "2", "--calib-seq-len", "16"]
    assert main(common + ["--method", "gptq", "--asym-calib", "--out", str(tmp_path / "q")]) == 0, \
        capsys.readouterr().err
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    assert main(common + ["--method", "rtn", "--asym-calib", "--out", str(tmp_path / "r")]) == 2
    assert "asym_calib is a GPTQ option" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["gptq", "awq+gptq"])
def test_recipes_on_cuda_beat_rtn(recipe):
    """The recipes where the H200 runs them (Triton attention in the AWQ block search, GPU Cholesky)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dense = build_model(CONFIG, _checkpoint(CONFIG).items(), torch.device("cuda"), torch.float32)
    ids = CALIB.cuda()
    ref = _logits(dense, ids)
    rtn = _rel(_logits(quantize_model(dense, "rtn", group_size=32, progress=False).build("cuda"), ids), ref)
    err = _rel(_logits(quantize_recipe(dense, recipe, ids, 4, 32, progress=False).build("cuda"), ids), ref)
    assert 0 < err < rtn, f"{recipe} {err:.4f} vs RTN {rtn:.4f}"
