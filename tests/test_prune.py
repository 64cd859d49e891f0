"""Pruning (minillm/quant/prune.py): masks with exactly the sparsity asked for, N:M patterns, Wanda against
magnitude on a layer with outlier inputs, whole-model pruning on a tiny Llama, checkpoints and the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from minillm.engine.worker import build_model
from minillm.llm import LLM
from minillm.quant.checkpoint import hf_config_dict
from minillm.quant.prune import (InputNorms, linear_sparsity, magnitude_scores, nm_mask, prune_model,
                                 save_pruned, unstructured_mask, wanda_scores)
from minillm.sampling_params import SamplingParams
from test_quant_methods import CALIB, CONFIG, _byte_tokenizer_json, _logits
from test_quant_seam import _checkpoint
from tiny import one_thread  # noqa: F401  (autouse fixture)


@pytest.mark.parametrize("shape,n,m", [((3, 8), 2, 4), ((1, 4), 2, 4), ((2, 5, 12), 1, 3), ((7, 16), 3, 8),
                                       ((4, 8), 4, 4)])
def test_nm_mask_keeps_the_n_largest_of_every_m(shape, n, m):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    groups, kept = scores.reshape(-1, m), mask.reshape(-1, m)
    assert (kept.sum(-1) == n).all()
    # every kept score is at least every dropped score of its group
    lowest_kept = torch.where(kept, groups, torch.inf).min(-1).values
    highest_dropped = torch.where(kept, -torch.inf, groups).max(-1).values
    assert (lowest_kept >= highest_dropped).all()


def test_nm_mask_is_exact_under_ties_and_validates():
    assert (nm_mask(torch.zeros(2, 8), 2, 4).reshape(-1, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_mask(torch.zeros(2, 6), 2, 4)
    with pytest.raises(ValueError, match="n <= m"):
        nm_mask(torch.zeros(2, 8), 5, 4)
    with pytest.raises(ValueError, match="n must be a positive int"):
        nm_mask(torch.zeros(2, 8), 0, 4)
    with pytest.raises(TypeError, match="floating-point"):
        nm_mask(torch.zeros(2, 8, dtype=torch.int64), 2, 4)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_masks_have_the_exact_sparsity(sparsity):
    scores = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    per_row = unstructured_mask(scores, sparsity, "row")
    k = round(sparsity * 50)
    assert ((~per_row).sum(1) == k).all()
    assert torch.equal(per_row, scores >= scores.sort(1).values[:, k:k + 1])  # the k lowest of each row go
    layer = unstructured_mask(scores, sparsity, "layer")
    assert int((~layer).sum()) == round(sparsity * 300)
    assert int((~unstructured_mask(torch.ones(4, 10), sparsity, "row")).sum()) == 4 * round(sparsity * 10)  # ties
    with pytest.raises(ValueError, match="sparsity must be a fraction in \\[0, 1\\)"):
        unstructured_mask(scores, 1.0)


def test_wanda_beats_magnitude_on_a_layer_with_outlier_inputs():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g) / 128 ** 0.5
    x = torch.randn(512, 128, generator=g)
    x[:, [3, 40, 77, 100]] *= 25.0  # the outlier features LLM activations have
    acc = InputNorms(128)
    acc.add(x[:300])
    acc.add(x[300:])
    assert torch.allclose(acc.norm(), x.norm(dim=0), rtol=1e-5)
    reference = x @ w.T

    def output_error(mask: torch.Tensor) -> float:
        return float((x @ (w * mask).T - reference).norm() / reference.norm())

    for make in (lambda s: unstructured_mask(s, 0.5), lambda s: nm_mask(s, 2, 4)):
        wanda, magnitude = output_error(make(wanda_scores(w, acc.norm()))), output_error(make(magnitude_scores(w)))
        assert wanda < 0.8 * magnitude, (wanda, magnitude)


@pytest.fixture(scope="module")
def dense():
    return build_model(CONFIG, _checkpoint(CONFIG).items(), torch.device("cpu"), torch.float32)


def _linears(model):
    return {n: m.weight for n, m in model.named_modules() if ".layers." in n and hasattr(m, "quant_method")}


@pytest.mark.parametrize("method,kw", [("magnitude", {}), ("wanda", {}), ("magnitude", {"nm": (2, 4)}),
                                       ("wanda", {"nm": (2, 4)}), ("magnitude", {"granularity": "layer"})])
def test_prune_model_prunes_every_linear_exactly(dense, method, kw):
    sparsity = None if "nm" in kw else 0.5
    pruned = prune_model(dense, method, sparsity, CALIB if method == "wanda" else None, progress=False, **kw)
    assert linear_sparsity(pruned) == pytest.approx(0.5) and linear_sparsity(dense) == 0.0  # a copy was pruned
    for name, w in _linears(pruned).items():
        zeros = w == 0
        if "nm" in kw:
            assert (zeros.reshape(-1, 4).sum(-1) == 2).all(), name
        elif kw.get("granularity") != "layer":
            assert (zeros.sum(1) == w.shape[1] // 2).all(), name
    if kw.get("granularity") == "layer":  # each packed shard is its own matrix: q, k, v each lose half
        qkv = pruned.model.layers[0].self_attn.qkv_proj
        for sid in qkv.shard_ids:
            offset, size = qkv.shard_slice(sid)
            assert int((qkv.weight[offset:offset + size] == 0).sum()) == size * CONFIG.hidden_size // 2
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight)


def test_wanda_uses_the_calibration_data(dense):
    wanda = prune_model(dense, "wanda", 0.5, CALIB, progress=False)
    magnitude = prune_model(dense, "magnitude", 0.5, progress=False)
    assert any(not torch.equal(a == 0, b == 0) for a, b in zip(_linears(wanda).values(),
                                                               _linears(magnitude).values()))
    with pytest.raises(ValueError, match="wanda needs calibration token ids"):
        prune_model(dense, "wanda", 0.5, None)
    with pytest.raises(ValueError, match="2:4 sparsity is always 0.5"):
        prune_model(dense, "magnitude", 0.7, nm=(2, 4))
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_model(dense, "sparsegpt", 0.5)


def test_pruned_checkpoint_round_trip_through_llm(tmp_path, dense):
    pruned = prune_model(dense, "magnitude", 0.5, nm=(2, 4), progress=False)
    _byte_tokenizer_json(tmp_path)
    save_pruned(pruned, str(tmp_path / "p"), source=str(tmp_path))
    llm = LLM(model=tmp_path / "p", max_model_len=64, max_num_seqs=2)
    assert linear_sparsity(llm.llm_engine.runner.model) == pytest.approx(0.5)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(llm.llm_engine.runner.model, ids), _logits(pruned, ids))
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_cli_prunes_and_saves(tmp_path, capsys):
    from safetensors.torch import save_file

    from minillm.cli import main
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    save_file(_checkpoint(CONFIG), str(tmp_path / "model.safetensors"))
    _byte_tokenizer_json(tmp_path)
    assert main(["quantize", str(tmp_path), "--method", "prune-2:4", "--prune-scores", "magnitude",
                 "--out", str(tmp_path / "p")]) == 0, capsys.readouterr().err
    assert "50.0% of the decoder's linear weights are zero" in capsys.readouterr().out
    assert (tmp_path / "p" / "model.safetensors").is_file() and (tmp_path / "p" / "tokenizer.json").is_file()
    assert main(["quantize", str(tmp_path), "--method", "prune-wanda", "--sparsity", "0.25", "--calib-samples", "2",
                 "--calib-seq-len", "16", "--out", str(tmp_path / "w")]) == 0, capsys.readouterr().err
    assert "25.0% of the decoder's linear weights are zero" in capsys.readouterr().out
    assert main(["quantize", str(tmp_path), "--method", "prune-2:4", "--sparsity", "0.6",
                 "--out", str(tmp_path / "q")]) == 2
    assert "sparsity 0.5" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pruning_matches_cpu(dense):
    """On CUDA: the same masks as on the CPU (magnitude exactly; Wanda's input norms come from GPU matmuls, so a
    weight whose score ties to rounding may flip), and exactly 2 of every 4 kept."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu_model = build_model(CONFIG, _checkpoint(CONFIG).items(), torch.device("cuda"), torch.float32)
    for method, calibration in (("magnitude", None), ("wanda", CALIB)):
        cpu = _linears(prune_model(dense, method, None, calibration, nm=(2, 4), progress=False))
        gpu = _linears(prune_model(gpu_model, method, None, calibration, nm=(2, 4), progress=False))
        for name, w in gpu.items():
            assert (w.cpu() == 0).reshape(-1, 4).sum(-1).eq(2).all(), name
            agree = float(((w.cpu() == 0) == (cpu[name] == 0)).float().mean())
            assert agree == 1.0 if method == "magnitude" else agree > 0.99, (method, name, agree)
