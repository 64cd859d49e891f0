"""int4_wgmma.py, the INT4 decode GEMM computed as W @ x^T with the unpacked weights as the tensor cores' register
operand. CPU: Triton's interpreter against the torch reference (x @ dequantize_int4(W)^T in fp32) and the launcher's
refusals; GPU (@pytest.mark.gpu): bf16 and fp16 at Llama-3-8B sizes, every dispatcher tile."""
from __future__ import annotations

import pytest
import torch

import minillm  # noqa: F401  (TRITON_INTERPRET=1 before triton runs anything, without CUDA)
from minillm.kernels.int4_tuning import split_k_workspace
from minillm.kernels.int4_wgmma import launch_int4_wgmma
from test_int4_mma import _close, _weights  # the int4 tests' weights and tolerance check

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(x, packed, bias=None, **cfg):
    m, n = x.shape[0], packed.qweight.shape[1]
    y = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    ws, cnt = split_k_workspace(x.device, m, n)
    launch_int4_wgmma(x, packed.qweight, packed.scales, packed.qzeros, packed.group_size, bias, y, ws, cnt,
                      cfg or None)
    assert not ws.any() and not cnt.any(), "the last split must leave the workspace and counters zeroed"
    return y


CASES = [  # m, n, k, group, symmetric, split_k, block_m
    (1, 64, 256, 128, False, 1, 16),   # one row, two K tiles in one program
    (3, 128, 512, 128, True, 2, 16),   # symmetric (zero point 8), split-K over 2, two column tiles
    (17, 64, 512, 256, False, 3, 16),  # two row tiles (rows past M read row M - 1), two tiles a group, uneven split
    (5, 64, 384, 128, False, 1, 32),   # a wider row tile
]


@pytest.mark.parametrize("m,n,k,group,symmetric,split_k,block_m", CASES)
def test_int4_wgmma_matches_dequantized_matmul(m, n, k, group, symmetric, split_k, block_m):
    torch.manual_seed(m * 100 + n + k)
    packed, w = _weights(n, k, group, symmetric)
    x = torch.randn(m, k)
    y = _run(x, packed, BLOCK_M=block_m, BLOCK_N=64, SPLIT_K=split_k)
    # sum x (128 + c) - 128 sum x in fp32: ~4 of fp32's 24 bits go to the cancellation
    _close(y, x @ w.t(), 1e-4)


def test_int4_wgmma_adds_the_bias_once():
    torch.manual_seed(3)
    packed, w = _weights(64, 256, 128, False)
    x = torch.randn(2, 256)
    bias = torch.randn(64)
    _close(_run(x, packed, bias, BLOCK_M=16, BLOCK_N=64, SPLIT_K=2), x @ w.t() + bias, 1e-4)


def test_int4_wgmma_rejects_shapes_it_cannot_run():
    packed, _ = _weights(64, 256, 64, False)
    with pytest.raises(ValueError, match="group"):  # a 128-row K tile would straddle two groups of 64
        _run(torch.randn(1, 256), packed)
    packed, _ = _weights(96, 256, 128, False)
    with pytest.raises(ValueError, match="N \\(96\\)"):  # 96 columns do not divide into 64-column tiles
        _run(torch.randn(1, 256), packed, BLOCK_M=16, BLOCK_N=64, SPLIT_K=1)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_wgmma_gpu_every_tile_matches_torch(m, dtype):
    from minillm.kernels.int4_dispatch import WGMMA_TILES

    torch.manual_seed(60 + m)
    n, k = 4096, 4096
    packed, w = _weights(n, k, 128, False, dtype, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = x.float() @ w.t()
    block_m = max(16, 1 << (m - 1).bit_length())
    for block_n, warps in WGMMA_TILES:
        for split in (1, 8):
            _close(_run(x, packed, BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split, num_warps=warps, num_stages=1),
                   ref, 0.01)
