"""int4_dequant.py: the INT4 weight dequantised to W^T in a scratch buffer, then cuBLAS (prefill-sized M).
CPU: Triton's interpreter at tiny awkward sizes against the torch reference; GPU (@pytest.mark.gpu): bf16 at a
Llama-3-8B size, through the dispatcher's "dequant" launch.
"""
from __future__ import annotations

import pytest
import torch

import minillm  # noqa: F401  (TRITON_INTERPRET=1 before triton runs anything, without CUDA)
from minillm.kernels.int4_dequant import dequantize_int4_into, int4_dequant_matmul
from minillm.kernels.int4_layout import dequantize_int4, repack_int4
from minillm.quant.rtn import quantize


def _weights(n: int, k: int, group: int, symmetric: bool, dtype=torch.float32, device="cpu"):
    qw = quantize(torch.randn(n, k, device=device), bits=4, group_size=group, symmetric=symmetric)
    packed = repack_int4(qw, dtype)
    return packed, dequantize_int4(*packed.args())


@pytest.mark.parametrize("n,k,group,symmetric,n0,cols", [
    (64, 256, 128, False, 0, 64),   # the whole weight
    (72, 384, 64, True, 8, 40),     # symmetric (zero point 8), a column slice not a multiple of the tile
    (40, 256, 256, False, 24, 16),  # one group over K, the last columns
])
def test_dequantize_into_writes_exact_transposed_columns(n, k, group, symmetric, n0, cols):
    torch.manual_seed(n + k + n0)
    packed, w = _weights(n, k, group, symmetric)
    wt = torch.full((k, cols), float("nan"))
    dequantize_int4_into(wt, packed.qweight, packed.scales, packed.qzeros, group, n0)
    # (code - zero) is exact through the 2^23 magic number, then one fp32 multiply: bit-equal to the reference
    assert torch.equal(wt, w[n0:n0 + cols].t())


@pytest.mark.parametrize("m,chunks,with_bias", [(3, 1, False), (5, 3, True), (1, 9, False)])
def test_dequant_matmul_matches_reference_in_slices(m, chunks, with_bias):
    torch.manual_seed(m * 10 + chunks)
    n, k, group = 72, 256, 128
    packed, w = _weights(n, k, group, False)
    x = torch.randn(m, k)
    bias = torch.randn(n) if with_bias else None
    y = torch.full((m, n), float("nan"))
    int4_dequant_matmul(x, packed.qweight, packed.scales, packed.qzeros, group, bias, y, chunks)
    ref = x @ w.t() + (bias if with_bias else 0)
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_dequant_rejects_bad_arguments():
    packed, _ = _weights(64, 256, 128, False)
    args = (packed.qweight, packed.scales, packed.qzeros, 128)
    with pytest.raises(ValueError, match="chunks"):
        int4_dequant_matmul(torch.randn(2, 256), *args, None, torch.empty(2, 64), 0)
    with pytest.raises(ValueError, match="wt must be"):
        dequantize_int4_into(torch.empty(256, 32), *args, n0=40)  # columns 40..72 of 64
    with pytest.raises(ValueError, match="wt must be"):
        dequantize_int4_into(torch.empty(128, 64), *args)  # K rows missing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,chunks", [(64, 1), (300, 4)])
def test_dequant_matmul_gpu_bf16(m, chunks):
    from minillm.kernels.int4_dispatch import Launch, run_launch
    from minillm.kernels.int4_tuning import split_k_workspace

    torch.manual_seed(m)
    n, k, group = 6144, 4096, 128
    packed, w = _weights(n, k, group, False, torch.bfloat16, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    ws, cnt = split_k_workspace(x.device, m, n)
    run_launch(Launch("dequant", 0, 0, 0, 0, 0, chunks), x, packed.qweight, packed.scales, packed.qzeros, group,
               bias, y, ws, cnt)
    ref = x.float() @ w.t() + bias.float()
    assert (y.float() - ref).abs().max().item() <= 0.01 * ref.abs().max().item()
