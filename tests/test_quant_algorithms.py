"""Quantization algorithms on small random layers (chapters 7-8): RTN grids and packing, GPTQ, AWQ, calibration text.

The activations have a few outlier channels, as real LLM activations do (that is what GPTQ's Hessian and
AWQ's salience see); errors are relative layer-output errors ||X W^T - X Q^T|| / ||X W^T||.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minillm.quant import rtn
from minillm.quant.awq import (awq_quantize, fold_scales_into_linear, fold_scales_into_rmsnorm,
                               search_scales)
from minillm.quant.calibration import (calibration_texts, split_texts, stdlib_docstrings,
                                       tokenize_to_sequences)
from minillm.quant.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_layers
from tests.tiny import ByteTokenizer, one_thread  # noqa: F401  (autouse fixture)

OUT, IN, TOKENS = 256, 512, 1024


def _layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [256, 512] and calibration inputs X [1024, 512]: correlated features plus 8 outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=gen) * 0.02
    X = torch.randn(TOKENS, 32, generator=gen) @ torch.randn(32, IN, generator=gen) * 0.5
    X += torch.randn(TOKENS, IN, generator=gen)
    X[:, torch.randperm(IN, generator=gen)[:8]] *= 25
    return W, X


def _out_err(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor, Xq: torch.Tensor | None = None) -> float:
    ref = X @ W.T
    return float((ref - (X if Xq is None else Xq) @ Q.T).norm() / ref.norm())


def _hessian(X: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(X.shape[1])
    for chunk in X.split(300):  # streamed in uneven chunks
        acc.add(chunk)
    return acc.H


# ---- RTN ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_within_half_a_step(bits, group_size, symmetric):
    W, _ = _layer()
    W[3, 7] = 0.5  # an outlier weight
    qw = rtn.quantize(W, bits, group_size, symmetric)
    g = IN if group_size == -1 else group_size
    assert qw.scales.shape == (OUT, IN // g) and qw.codes.shape == W.shape
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if symmetric else (0, (1 << bits) - 1)
    assert int(qw.codes.min()) >= lo and int(qw.codes.max()) <= hi
    step = qw.scales.repeat_interleave(g, dim=1)
    err = (W - qw.dequantize()).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-12).all()), f"max err/step {float((err / step).max()):.4f}"
    assert torch.equal(qw.dequantize(), rtn.dequantize(qw.codes, qw.scales, qw.zeros, group_size))


def test_groups_localise_an_outlier():
    W, _ = _layer()
    W[:, 0] = 1.0  # one huge column: per channel, every row's scale stretches over it
    per_channel = (W - rtn.fake_quantize(W, 4, -1)).abs()[:, 128:].mean()
    per_group = (W - rtn.fake_quantize(W, 4, 128)).abs()[:, 128:].mean()  # groups without the outlier
    assert per_group < 0.2 * per_channel


def test_rtn_rejects_bad_arguments():
    W = torch.randn(8, 96)
    for bits in (1, 9, 4.0, True):
        with pytest.raises(ValueError, match="bits"):
            rtn.quantize(W, bits, 32)
    for g in (0, -2, 64):  # 64 does not divide 96
        with pytest.raises(ValueError, match="group_size"):
            rtn.quantize(W, 4, g)
    with pytest.raises(ValueError, match="2-D"):
        rtn.quantize(torch.randn(96), 4, 32)
    with pytest.raises(TypeError, match="floating"):
        rtn.quantize(torch.ones(8, 96, dtype=torch.int32), 4, 32)


def test_pack_int4_layout_and_round_trip():
    assert rtn.pack_int4(torch.tensor([1, 2])).tolist() == [0x21]  # element 0 in the low nibble
    assert rtn.pack_int4(torch.arange(8), torch.int32).tolist() == [0x76543210]
    assert rtn.pack_int4(torch.full((8,), 15), torch.int32).tolist() == [-1]  # bit 31 wraps into the sign
    codes = torch.randint(0, 16, (64, 256), dtype=torch.uint8)
    for dtype, per_word in ((torch.uint8, 2), (torch.int32, 8)):
        packed = rtn.pack_int4(codes, dtype)
        assert packed.dtype == dtype and packed.shape == (64, 256 // per_word)
        assert torch.equal(rtn.unpack_int4(packed), codes)
    sym = rtn.quantize(torch.randn(16, 64), 4, 32, symmetric=True)
    unsigned = rtn.unpack_int4(rtn.pack_int4(sym.unsigned_codes())).to(torch.int32)
    assert torch.equal(unsigned - 8, sym.codes.to(torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        rtn.pack_int4(torch.tensor([16, 0]))
    with pytest.raises(ValueError, match="multiple of 8"):
        rtn.pack_int4(torch.zeros(12, dtype=torch.uint8), torch.int32)


# ---- GPTQ --------------------------------------------------------------------------------------------------

def test_hessian_accumulator_streams_the_mean():
    _, X = _layer()
    torch.testing.assert_close(_hessian(X), 2 * X.double().T @ X.double() / X.shape[0])


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 128), (4, -1)])
def test_gptq_beats_rtn_on_layer_output(bits, group_size):
    W, X = _layer()
    res = gptq_quantize(W, _hessian(X), bits=bits, group_size=group_size)
    gptq_err = _out_err(X, W, res.weight_dq)
    rtn_err = _out_err(X, W, rtn.fake_quantize(W, bits, group_size))
    assert gptq_err < 0.6 * rtn_err, f"GPTQ {gptq_err:.4f} vs RTN {rtn_err:.4f}"
    torch.testing.assert_close(res.qweight.dequantize(), res.weight_dq, rtol=0, atol=0)


def test_gptq_with_identity_hessian_is_rtn():
    # no correlation between inputs: Hinv is diagonal, no error is fed forward, GPTQ reduces to RTN
    W, _ = _layer()
    res = gptq_quantize(W, torch.eye(IN), bits=4, group_size=128)
    assert torch.equal(res.qweight.codes, rtn.quantize(W, 4, 128).codes)


@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_act_order_returns_original_column_order(static_groups):
    W, X = _layer()
    res = gptq_quantize(W, _hessian(X), bits=4, group_size=128, act_order=True, static_groups=static_groups)
    assert res.perm is not None and not torch.equal(res.perm, torch.arange(IN))
    qw = res.qweight
    if static_groups:
        assert qw.g_idx is None  # groups stay contiguous runs of the original columns
    else:
        assert torch.equal(torch.bincount(qw.g_idx.long()), torch.full((IN // 128,), 128))
        assert torch.equal(qw.g_idx[res.perm[:128]].long(), torch.zeros(128, dtype=torch.long))
    torch.testing.assert_close(qw.dequantize(), res.weight_dq, rtol=0, atol=0)
    # a column order mix-up would put weights under the wrong inputs: the error would be O(1)
    assert _out_err(X, W, res.weight_dq) < 0.6 * _out_err(X, W, rtn.fake_quantize(W, 4, 128))


def test_gptq_dead_input_channel_and_bad_arguments():
    W, X = _layer()
    X[:, 5] = 0.0
    res = gptq_quantize(W, _hessian(X), bits=4, group_size=128)
    assert bool(torch.isfinite(res.weight_dq).all()) and bool((res.weight_dq[:, 5] == 0).all())
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(W, torch.eye(IN - 1))
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize(W, torch.eye(IN), group_size=128, block_size=96)
    with pytest.raises(ValueError, match="percdamp"):
        gptq_quantize(W, torch.eye(IN), percdamp=-0.1)


def test_gptq_quantize_layers_matches_one_by_one():
    W, X = _layer()
    H = _hessian(X)
    weights = {"q_proj": W[:64], "k_proj": W[64:96]}  # two linears reading the same input share H
    out = gptq_quantize_layers(weights, {"q_proj": H, "k_proj": H}, progress=False, bits=3, group_size=64)
    for name, w in weights.items():
        assert torch.equal(out[name].weight_dq, gptq_quantize(w, H, bits=3, group_size=64).weight_dq)
    with pytest.raises(ValueError, match="no Hessian"):
        gptq_quantize_layers(weights, {"q_proj": H}, progress=False)


@pytest.mark.gpu
def test_algorithms_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    W, X = _layer()
    H = _hessian(X)
    for kwargs in ({}, {"act_order": True}):
        cpu = gptq_quantize(W, H, bits=4, group_size=128, **kwargs).qweight.codes
        gpu = gptq_quantize(W.cuda(), H.cuda(), bits=4, group_size=128, **kwargs).qweight.codes.cpu()
        assert (cpu == gpu).float().mean() > 0.999  # matmul order may flip a rare rounding tie
    res_cpu, res_gpu = awq_quantize([W], X, 4, 128), awq_quantize([W.cuda()], X.cuda(), 4, 128)
    assert res_cpu.alpha == res_gpu.alpha
    torch.testing.assert_close(res_gpu.scales.cpu(), res_cpu.scales, rtol=1e-5, atol=1e-6)


# ---- AWQ ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 128)])
def test_awq_beats_rtn_with_outlier_channels(bits, group_size):
    W1, X = _layer(0)
    W2, _ = _layer(1)  # two linears sharing one input, as gate/up do
    res = awq_quantize([W1, W2], X, bits, group_size)
    assert res.scales.shape == (IN,) and 0 < res.alpha < 1
    for W, qw in zip((W1, W2), res.qweights):
        awq_err = _out_err(X, W, qw.dequantize(), Xq=X / res.scales)
        rtn_err = _out_err(X, W, rtn.fake_quantize(W, bits, group_size))
        assert awq_err < 0.8 * rtn_err, f"AWQ {awq_err:.4f} vs RTN {rtn_err:.4f}"
    # alpha = 0 means s = 1: the first grid point is plain RTN, and the search picked something better
    assert min(res.grid_errors) < res.grid_errors[0]


def test_awq_scale_fold_into_rmsnorm_is_exact():
    W, X = _layer()
    s, _, _ = search_scales([W], X, 4, 128)
    norm_w = torch.rand(IN) + 0.5
    ref = F.rms_norm(X, (IN,), norm_w, eps=1e-6) @ W.T
    folded = F.rms_norm(X, (IN,), fold_scales_into_rmsnorm(norm_w, s), eps=1e-6) @ (W * s).T
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)


def test_awq_scale_fold_into_previous_linear_is_exact():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 96, generator=gen)
    gate, up, down = (torch.randn(*shape, generator=gen) * 0.1 for shape in ((128, 96), (128, 96), (96, 128)))
    hidden = F.silu(x @ gate.T) * (x @ up.T)
    s, _, _ = search_scales([down], hidden, 4, 64)
    up_f, _ = fold_scales_into_linear(up, s)
    torch.testing.assert_close((F.silu(x @ gate.T) * (x @ up_f.T)) @ (down * s).T, hidden @ down.T,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out_features"):
        fold_scales_into_linear(up, s[:-1])


# ---- calibration text --------------------------------------------------------------------------------------

def test_calibration_text_is_deterministic_and_disjoint():
    docs = stdlib_docstrings()
    assert docs == stdlib_docstrings() and docs == sorted(set(docs)) and len(docs) > 300
    calib, held = calibration_texts("calibration"), calibration_texts("held_out")
    assert calib and held and not set(calib) & set(held) and sorted(calib + held) == docs
    assert (calib, held) == split_texts(docs)
    tok = ByteTokenizer()
    ids = tokenize_to_sequences(calib, tok, n_samples=8, seq_len=256)
    assert ids.shape == (8, 256) and ids.dtype == torch.int64
    assert torch.equal(ids, tokenize_to_sequences(calib, tok, n_samples=8, seq_len=256))
    assert bytes(ids[0].tolist()).decode("utf-8", "replace").startswith(calib[0][:50])
    with pytest.raises(ValueError, match="fewer than"):
        tokenize_to_sequences(held[:2], tok, n_samples=1000, seq_len=1000)
    with pytest.raises(ValueError, match="side effects"):
        stdlib_docstrings(["json", "antigravity"])
