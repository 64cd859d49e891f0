"""The NF4 decode GEMV (kernels/nf4_gemv.py) against minillm.quant.nf4's reference (dequantize, then matmul).

CPU part: Triton's interpreter in fp32 at small awkward sizes (N not a multiple of the program's rows, M = 1, 3,
16, the double quantization's rows of 256 crossing a weight row), bias, bad input. GPU part: bf16 at Llama-3-8B
shapes and a model's NF4 layers routed to the kernel at decode.
"""
from __future__ import annotations

import pytest
import torch

from minillm.kernels.nf4_gemv import MAX_M, Nf4Config, nf4_config, nf4_gemv
from minillm.quant.nf4 import NF4_LEVELS, double_quantize, nf4_linear, quantize_nf4
from minillm.quant.rtn import pack_int4


def _nf4(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes, absmax = quantize_nf4(torch.randn(n, k, generator=g) / k ** 0.5)
    return (pack_int4(codes), *double_quantize(absmax), NF4_LEVELS.clone())


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= rtol * ref.float().abs().max().item() + 1e-6, err


@pytest.mark.parametrize("m,n,k,bias", [(1, 37, 128, True), (3, 70, 192, False), (16, 9, 64, True),
                                        (2, 130, 320, False)])
def test_nf4_gemv_matches_the_reference(m, n, k, bias):
    weight = _nf4(n, k, seed=m + n + k)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    ref = nf4_linear(x, *weight, bias=b)
    got = nf4_gemv(x, *weight, bias=b)
    assert got.shape == (m, n) and got.dtype == x.dtype
    _close(got, ref, 1e-5)
    _close(nf4_gemv(x.reshape(1, m, k), *weight, bias=b), ref.reshape(1, m, n), 1e-5)  # leading dims


@pytest.mark.parametrize("config", [Nf4Config(16, 2, 2, 3), Nf4Config(64, 4, 4, 2), Nf4Config(32, 1, 1, 8)])
def test_nf4_gemv_split_k_and_tiles(config):
    """Split-K (the splits' sums meet in gemv's workspace, left zeroed for the next call), steps of 1-4 absmax
    blocks with a partial last one (K = 448: 7 blocks), more splits than steps."""
    m, n, k = 3, 50, 448
    weight = _nf4(n, k, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    ref = nf4_linear(x, *weight)
    for _ in range(2):  # the second call sees the workspace the first one left
        _close(nf4_gemv(x, *weight, config=config), ref, 1e-5)


def test_nf4_launch_rule():
    """The measured rule: 16-row tiles for short rows, K split up to ~6 programs per SM, one row over a short K
    unsplit."""
    assert nf4_config(1, 960, 576, num_sms=132) == Nf4Config(16, 4, 4, 1)  # 3 steps: one row stays unsplit
    assert nf4_config(4, 960, 576, num_sms=132) == Nf4Config(16, 4, 4, 2)
    assert nf4_config(1, 28672, 4096, num_sms=132).split_k == 1  # 896 tiles already fill the GPU
    assert nf4_config(1, 4096, 14336, num_sms=132) == Nf4Config(32, 4, 4, 4)


def test_nf4_gemv_rejects_bad_input():
    weight = _nf4(8, 64, seed=0)
    with pytest.raises(ValueError, match="serves 1..16 rows"):
        nf4_gemv(torch.randn(MAX_M + 1, 64), *weight)
    with pytest.raises(ValueError, match=r"x must be \[..., K\] with K = 64"):
        nf4_gemv(torch.randn(2, 32), *weight)
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[8\]"):
        nf4_gemv(torch.randn(2, 64), *weight, bias=torch.zeros(7))
    with pytest.raises(TypeError, match="x must be a float16/bfloat16/float32"):
        nf4_gemv(torch.zeros(2, 64, dtype=torch.int32), *weight)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (960, 576)])
def test_nf4_gemv_bf16_on_gpu(m, n, k):
    weight = [t.cuda() for t in _nf4(n, k, seed=m)]
    x = torch.randn(m, k, device="cuda")
    ref = nf4_linear(x, *weight)  # fp32 reference on the same device
    _close(nf4_gemv(x.bfloat16(), *weight), ref, 2e-2)


@pytest.mark.gpu
def test_nf4_layer_runs_the_kernel_at_decode_only(monkeypatch):
    import minillm.kernels.nf4_gemv as module
    calls, kernel = [], module.nf4_gemv
    monkeypatch.setattr(module, "nf4_gemv", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    weight = [t.cuda() for t in _nf4(384, 512, seed=5)]
    for rows, runs in ((1, True), (16, True), (17, False)):
        calls.clear()
        x = torch.randn(rows, 512, device="cuda")
        y = nf4_linear(x.bfloat16(), *weight)
        assert bool(calls) == runs
        _close(y, nf4_linear(x, *weight), 2e-2)
