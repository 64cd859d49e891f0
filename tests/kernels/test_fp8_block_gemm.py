"""Block-wise FP8 GEMM and per-token-group quantizer (minillm.kernels.fp8_block_gemm, chapter 8).

CPU part: Triton's interpreter at tiny awkward sizes (M 1, 5, 17; N not a multiple of the tile; group 16/32/64,
BLOCK_N spanning two weight blocks, BLOCK_K smaller than group_k), operands quantized with torch (the
interpreter's fp32 -> fp8 cast rounds wrongly), against the torch emulation in minillm.quant.fp8_block:
dequantize both operands, one fp32 matmul. Block scales that span orders of magnitude make a kernel that
scales per tensor, or indexes the wrong block, fail by far more than the tolerance (checked below).
GPU part (@pytest.mark.gpu): fp8 tensor cores at Llama-3-8B sizes against the same emulation.
"""
from __future__ import annotations

import pytest
import torch

from minillm.kernels.fp8_block_gemm import FP8_MAX, fp8_block_gemm, per_token_group_quant_fp8
from minillm.quant.fp8_block import dequantize_fp8_block, quantize_fp8_block, quantize_fp8_per_token_group

FP32_RTOL = 1e-5  # exact e4m3 products; only the fp32 summation order differs


def _rel_max(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def _operands(m: int, n: int, k: int, block: tuple[int, int], seed: int, device: str = "cpu"):
    """x, w with magnitudes that change by 100x from block to block (rows of x and tiles of w alike), quantized
    with torch; returns (x8, x_scale, w8, w_scale, emulation [M, N] fp32)."""
    g = torch.Generator().manual_seed(seed)
    kb = k // block[1]
    x = torch.randn(m, k, generator=g)
    x *= 10.0 ** torch.randint(-1, 2, (m, kb), generator=g).repeat_interleave(block[1], 1)
    w = torch.randn(n, k, generator=g)
    w *= 10.0 ** torch.randint(-1, 2, (n // block[0], kb), generator=g).repeat_interleave(block[0], 0) \
        .repeat_interleave(block[1], 1)
    x, w = x.to(device), w.to(device)
    x8, x_scale = quantize_fp8_per_token_group(x, block[1])
    w8, w_scale = quantize_fp8_block(w, block)
    xd = (x8.float().reshape(m, kb, -1) * x_scale[..., None]).reshape(m, k)
    return x8, x_scale, w8, w_scale, xd @ dequantize_fp8_block(w8, w_scale).T


CASES = [  # m, n, k, block (group_n, group_k), config (None: the interpreter default)
    (1, 64, 128, (32, 32), None),
    (5, 96, 192, (32, 64), None),                                             # BLOCK_K 32 < group_k 64
    (17, 48, 64, (16, 16), dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)),
    (3, 128, 128, (32, 32), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)),
]


@pytest.mark.parametrize("m,n,k,block,config", CASES)
def test_fp8_block_gemm_matches_emulation(m, n, k, block, config):
    x8, x_scale, w8, w_scale, ref = _operands(m, n, k, block, seed=m * 100 + n + k)
    bias = torch.randn(n)
    for a, b in ((x8, w8), (x8.float(), w8.float())):  # e4m3 tensors, and fp32 ones holding the same values
        got = fp8_block_gemm(a, b, x_scale, w_scale, block, bias, out_dtype=torch.float32, config=config)
        assert _rel_max(got, ref + bias) < FP32_RTOL
    # the checks above can fail: one scale per tensor (the mean of the block scales) is far off
    per_tensor = (x8.float() @ w8.float().T) * x_scale.mean() * w_scale.mean()
    assert _rel_max(per_tensor, ref) > 1000 * FP32_RTOL
    # and so is per-token x per-channel scaling that ignores K-blocks (the first block's scales everywhere)
    first_block = (x8.float() @ w8.float().T) * x_scale[:, :1] * w_scale[:, 0].repeat_interleave(block[0])[None]
    assert _rel_max(first_block, ref) > 1000 * FP32_RTOL


def test_per_token_group_quant_fp8():
    """Scales exact; codes equal torch's e4m3 cast except where the interpreter's fp32 -> fp8 cast fails to
    carry a round-up into the next power of two (it yields half the value): a CPU-only fault, see DESIGN 5."""
    torch.manual_seed(3)
    x = torch.randn(7, 192) * 5
    x[:, 70] = 300.0  # an outlier channel: only its own group's scale should grow
    q, scale = per_token_group_quant_fp8(x, 64)
    ref_q, ref_scale = quantize_fp8_per_token_group(x, 64)
    assert torch.equal(scale, ref_scale)
    assert (scale[:, 1] > 10 * scale[:, 0]).all() and (scale[:, 1] > 10 * scale[:, 2]).all()
    got, ref = q.float(), ref_q.float()
    bad = got != ref
    if x.is_cuda or not bad.any():
        assert not bad.any()
    else:
        assert torch.equal(got[bad] * 2, ref[bad])
        assert torch.equal(ref[bad].abs().log2().frac(), torch.zeros_like(ref[bad]))
        assert bad.float().mean() < 0.1
    assert torch.equal(per_token_group_quant_fp8(torch.zeros(2, 64), 32)[0].float(), torch.zeros(2, 64))


def test_fp8_block_gemm_rejects_bad_input():
    x8, x_scale, w8, w_scale, _ = _operands(2, 64, 128, (32, 32), seed=0)
    with pytest.raises(ValueError, match="same K"):
        fp8_block_gemm(x8, w8[:, :64], x_scale, w_scale, (32, 32))
    with pytest.raises(ValueError, match="b_scale"):
        fp8_block_gemm(x8, w8, x_scale, w_scale[:1], (32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_block_gemm(x8, w8, x_scale, w_scale, (32, 24))
    with pytest.raises(ValueError, match="group_k=96 must divide K=128"):
        fp8_block_gemm(x8, w8, x_scale, w_scale, (32, 96))
    with pytest.raises(TypeError, match="a and b"):
        fp8_block_gemm(x8.to(torch.int8), w8.to(torch.int8), x_scale, w_scale, (32, 32))
    with pytest.raises(ValueError, match="group must be a positive int dividing K=100"):
        per_token_group_quant_fp8(torch.randn(2, 100), 64)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128, 300])
@pytest.mark.parametrize("block", [(128, 128), (64, 64), (32, 32)])
def test_fp8_block_gemm_gpu(m, block):
    n, k = 4096, 4096
    x8, x_scale, w8, w_scale, ref = _operands(m, n, k, block, seed=m, device="cuda")
    got = fp8_block_gemm(x8, w8, x_scale, w_scale, block, out_dtype=torch.float32)
    assert _rel_max(got, ref) < 1e-3  # the tensor cores' fp8 accumulator within a K-block (about 14 bits)
    # the Triton quantizer: scales exact, codes the same round-to-nearest-even cast as torch's
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 3
    q, scale = per_token_group_quant_fp8(x, block[1])
    ref_q, ref_scale = quantize_fp8_per_token_group(x, block[1])
    assert torch.allclose(scale, ref_scale, rtol=1e-6, atol=0)
    assert (q.float() != ref_q.float()).float().mean() < 1e-3
    assert float(q.float().abs().max()) <= FP8_MAX
    # bf16 output, the engine's dtype
    got16 = fp8_block_gemm(x8, w8, x_scale, w_scale, block, out_dtype=torch.bfloat16)
    assert _rel_max(got16, ref) < 1e-2
