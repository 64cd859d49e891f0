"""Quantized GEMM kernels (chapters 7-8): INT4 weight-only, FP8 and INT8 W8A8, and the per-token quantizers.

CPU part: Triton's interpreter at tiny awkward sizes (M 1, 3, 17; N 64, 96; K 128, 256; groups 32/64/128),
fp32 activations (the interpreter's bf16 tl.dot is wrong), against plain torch: dequantize, then matmul in
fp32. INT8 must match torch's int32 matmul exactly. FP8 GEMMs are checked against fp32 matmuls of the same
e4m3 values (exact products, so only summation order differs).
GPU part (@pytest.mark.gpu): bf16 / fp8 / int8 at Llama-3-8B sizes, against torch references and against
torch._scaled_mm / torch._int_mm.
"""
from __future__ import annotations

import pytest
import torch

from minillm.kernels.fp8_gemm import FP8_MAX, fp8_gemm, per_token_quant_fp8
import minillm.kernels.int4_gemm as int4_module
from minillm.kernels.int4_gemm import int4_gemm
from minillm.kernels.int4_layout import dequantize_int4, repack_int4, sort_act_order
from minillm.kernels.int8_gemm import int8_gemm, per_token_quant_int8
from minillm.kernels.scaled_mm import scaled_mm
from minillm.quant.fp8 import quantize_fp8
from minillm.quant.int8_rtn import quantize_per_channel_int8
from minillm.quant.rtn import QuantizedWeight, pack_int4, quantize

# fp32 accumulation in a different order than torch's matmul: a few ulps of the dot product's magnitude
FP32_RTOL = 1e-5


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """|got - ref| <= rtol * max|ref| (one tolerance for the whole output, as a GEMM's errors scale with it)."""
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rtol * scale + 1e-6, f"max abs error {err:.3g} > {rtol} x max|ref| {scale:.3g}"


# ---------------------------------------------------------------------------------------------- INT4
INT4_CASES = [  # m, n, k, group, symmetric, split_k, config (None: the interpreter default for that M)
    (1, 64, 128, 32, False, 1, None),                          # CUDA-core path, one group per K tile
    (1, 96, 256, 64, False, 4, None),                          # CUDA-core path, split-K over 4 programs
    (1, 64, 256, 32, True, 2, dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64, USE_DOT=False)),  # tile spans 2 groups
    (3, 96, 256, 64, True, 2, None),                           # tl.dot path, symmetric, split-K
    (17, 64, 256, 128, False, 1, None),                        # tl.dot path, scale applied after the dot
    (17, 96, 128, 32, False, 3, None),                         # tl.dot, 4 groups per tile, uneven split
    (3, 64, 576, 64, False, 2, None),                          # SmolLM2's K = 576: a ragged last K tile
]


@pytest.mark.parametrize("m,n,k,group,symmetric,split_k,config", INT4_CASES)
def test_int4_gemm_matches_dequantized_matmul(m, n, k, group, symmetric, split_k, config):
    torch.manual_seed(m * 1000 + n + k + group)
    qw = quantize(torch.randn(n, k), bits=4, group_size=group, symmetric=symmetric)
    packed = repack_int4(qw, torch.float32)
    x = torch.randn(m, k)
    y = int4_gemm(x, *packed.args(), split_k=split_k, config=config)
    _close(y, x @ qw.dequantize().t(), FP32_RTOL)


def test_int4_gemm_bf16_activations():
    """bf16 x and scales (the GPU's dtype): under the interpreter the kernel upcasts the dot operands."""
    torch.manual_seed(4)
    qw = quantize(torch.randn(64, 128), bits=4, group_size=64, symmetric=False)
    packed = repack_int4(qw, torch.bfloat16)
    x = torch.randn(3, 128).to(torch.bfloat16)
    y = int4_gemm(x, *packed.args())
    assert y.dtype == torch.bfloat16
    _close(y, x.float() @ dequantize_int4(*packed.args()).t(), 0.01)  # bf16 output: 2^-8 relative rounding


def test_int4_layout_is_gptq_and_rtn_packing():
    """qweight is rtn.pack_int4 along K, transposed ([K / 8, N]); the reference dequantizes back exactly."""
    torch.manual_seed(1)
    qw = quantize(torch.randn(64, 128), bits=4, group_size=32, symmetric=False)
    packed = repack_int4(qw)
    assert torch.equal(packed.qweight, pack_int4(qw.codes, torch.int32).t())
    assert torch.equal(packed.qzeros, pack_int4(qw.zeros.t(), torch.int32))
    assert packed.scales.shape == (4, 64) and packed.scales.dtype == torch.float16
    assert torch.equal(dequantize_int4(*repack_int4(qw, torch.float32).args()), qw.dequantize())


def test_int4_per_channel_bias_act_order_and_batch_dims():
    torch.manual_seed(2)
    n, k = 64, 128
    qw = quantize(torch.randn(n, k), bits=4, group_size=-1, symmetric=False)
    bias = torch.randn(n)
    x = torch.randn(2, 3, k)
    y = int4_gemm(x, *repack_int4(qw, torch.float32).args(), bias=bias, split_k=2)
    assert y.shape == (2, 3, n)
    _close(y, x @ qw.dequantize().t() + bias, FP32_RTOL)
    # act-order: a g_idx that scatters each group's columns; repack makes groups contiguous through perm
    qg = quantize(torch.randn(n, k), bits=4, group_size=32, symmetric=False)
    g_idx = torch.randperm(k) // 32
    qa = QuantizedWeight(qg.codes, qg.scales, qg.zeros, 4, 32, False, g_idx=g_idx)
    packed = repack_int4(qa, torch.float32)
    assert packed.perm is not None
    assert torch.equal(dequantize_int4(*packed.args()), qa.dequantize())
    _close(int4_gemm(x[0], *packed.args()), x[0] @ qa.dequantize().t(), FP32_RTOL)
    # the same from a checkpoint's view: qweight rows in the original order, sorted by sort_act_order
    plain = repack_int4(QuantizedWeight(qg.codes, qg.scales, qg.zeros, 4, 32, False), torch.float32)
    qweight, perm = sort_act_order(plain.qweight, g_idx, 32)
    assert torch.equal(perm, packed.perm) and torch.equal(qweight, packed.qweight)
    # split-K leaves its shared workspace zeroed for the next call (and for CUDA-graph replays)
    for ws, counters in int4_module._SPLIT_K_WORKSPACES[str(x.device)]:
        assert not ws.any() and not counters.any()


def test_int4_gemm_rejects_bad_operands():
    qw = repack_int4(quantize(torch.randn(64, 128), bits=4, group_size=32), torch.float32)
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="qweight"):
        int4_gemm(torch.randn(2, 64), *qw.args())
    with pytest.raises(ValueError, match="group_size"):
        int4_gemm(x, qw.qweight, qw.scales, qw.qzeros, 48)
    with pytest.raises(ValueError, match="scales"):
        int4_gemm(x, qw.qweight, qw.scales[:2], qw.qzeros, 32)
    with pytest.raises(TypeError, match="x must be"):
        int4_gemm(x.to(torch.int32), *qw.args())
    with pytest.raises(ValueError, match="split_k"):
        int4_gemm(x, *qw.args(), split_k=0)
    with pytest.raises(ValueError, match="bits"):
        repack_int4(quantize(torch.randn(64, 128), bits=3, group_size=32))


# ---------------------------------------------------------------------------------------------- INT8
@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (3, 96, 256), (17, 64, 256)])
def test_int8_quant_and_gemm_exact(m, n, k):
    torch.manual_seed(m + n + k)
    x, w = torch.randn(m, k) * 3, torch.randn(n, k)
    x_q, x_s = per_token_quant_int8(x)
    assert torch.equal(x_s[:, 0], (x.abs().amax(1) / 127).clamp(min=1e-12))
    assert torch.equal(x_q, torch.round(x * (1.0 / x_s)).clamp(-127, 127).to(torch.int8))  # half to even
    w_q, w_s = quantize_per_channel_int8(w)
    # the integer accumulation, scales of 1: exactly torch's int32 matmul (|sums| < 2^24: exact in fp32 too)
    acc = int8_gemm(x_q, w_q, torch.ones(1), torch.ones(1), out_dtype=torch.float32)
    assert torch.equal(acc, (x_q.int() @ w_q.int().t()).float())
    if m == 17:  # the tensor-descriptor (TMA) kernel: same result, edges zero-filled instead of masked
        tma = scaled_mm(x_q, w_q, torch.ones(1), torch.ones(1), out_dtype=torch.float32, backend="tma")
        assert torch.equal(tma, acc)
    y = int8_gemm(x_q, w_q, x_s, w_s, out_dtype=torch.float32)
    _close(y, (x_q.int() @ w_q.int().t()).float() * x_s * w_s, FP32_RTOL)
    x_q, x_s = per_token_quant_int8(x.to(torch.bfloat16))  # the layer's activations: bf16 in, int8 out
    _close(int8_gemm(x_q, w_q, x_s, w_s, out_dtype=torch.float32), x @ w.t(), 0.03)  # two 8-bit roundings


# ---------------------------------------------------------------------------------------------- FP8
def test_fp8_per_token_quant():
    """Scales exact; codes equal torch's e4m3 cast except where the interpreter's fp32 -> fp8 cast fails to
    carry a round-up into the next power of two (it yields half the value): a CPU-only fault, see DESIGN 5."""
    torch.manual_seed(3)
    x = torch.randn(17, 256) * 5
    x_q, x_s = per_token_quant_fp8(x)
    assert torch.equal(x_s[:, 0], (x.abs().amax(1) / FP8_MAX).clamp(min=1e-12))
    ref = (x * (1.0 / x_s)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    got = x_q.float()
    bad = got != ref
    if x.is_cuda or not bad.any():
        assert not bad.any()
    else:
        assert torch.equal(got[bad] * 2, ref[bad])
        assert torch.equal(ref[bad].abs().log2().frac(), torch.zeros_like(ref[bad]))  # powers of two
        assert bad.float().mean() < 0.1


@pytest.mark.parametrize("m,n,k,per_channel", [(1, 64, 128, True), (3, 96, 256, False), (17, 64, 256, True)])
def test_fp8_gemm_scales_and_indexing(m, n, k, per_channel):
    torch.manual_seed(m * 7 + n + k)
    x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    x_q, x_s = per_token_quant_fp8(x)
    w_q, w_s = quantize_fp8(w, per_channel=per_channel)
    if not per_channel:
        w_s = w_s[:1]  # one per-tensor scale (quantize_fp8 repeats it on every row): the kernel's scalar path
    ref = (x_q.float() @ w_q.float().t()) * x_s * w_s + bias  # e4m3 products are exact in fp32
    _close(fp8_gemm(x_q, w_q, x_s, w_s, bias, out_dtype=torch.float32), ref, FP32_RTOL)
    _close(scaled_mm(x_q, w_q, x_s, w_s, bias, out_dtype=torch.float32, backend="tma"), ref, FP32_RTOL)
    # the same kernel body on fp32 operands holding the e4m3 values: the fallback where fp8 is unavailable
    _close(scaled_mm(x_q.float(), w_q.float(), x_s, w_s, bias, out_dtype=torch.float32), ref, FP32_RTOL)


def test_w8a8_rejects_bad_operands():
    x_q, x_s = per_token_quant_int8(torch.randn(3, 64))
    w_q, w_s = quantize_per_channel_int8(torch.randn(32, 64))
    with pytest.raises(ValueError, match="same K"):
        int8_gemm(x_q, w_q[:, :32], x_s, w_s)
    with pytest.raises(ValueError, match="w_scale|b_scale"):
        int8_gemm(x_q, w_q, x_s, w_s[:5])
    with pytest.raises(TypeError, match="float8"):
        fp8_gemm(x_q, w_q, x_s, w_s)
    with pytest.raises(TypeError, match="int8"):
        int8_gemm(x_q.float(), w_q.float(), x_s, w_s)
    with pytest.raises(TypeError, match="x must be"):
        per_token_quant_fp8(x_q)
    with pytest.raises(ValueError, match="backend"):
        scaled_mm(x_q, w_q, x_s, w_s, backend="cutlass")


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 64, 300])
@pytest.mark.parametrize("group,symmetric", [(128, False), (64, True)])
def test_int4_gemm_gpu_bf16(m, group, symmetric):
    torch.manual_seed(m)
    n, k = 14336, 4096
    qw = quantize(torch.randn(n, k, device="cuda"), bits=4, group_size=group, symmetric=symmetric)
    packed = repack_int4(qw, torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ dequantize_int4(*packed.args()).t()
    _close(int4_gemm(x, *packed.args()), ref, 0.01)  # bf16 output and bf16-rounded dequantized weights
    _close(int4_gemm(x, *packed.args(), split_k=8), ref, 0.01)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 256])
def test_fp8_gemm_gpu_matches_scaled_mm(m):
    torch.manual_seed(m)
    n, k = 4096, 4096
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_q, w_s = quantize_fp8(torch.randn(n, k, device="cuda"))
    x_q, x_s = per_token_quant_fp8(x)
    ref_q = (x.float() * (1.0 / x_s)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    assert (x_q.float() != ref_q.float()).float().mean() < 1e-3  # same RNE cast; rare ties may differ
    y = fp8_gemm(x_q, w_q, x_s, w_s)
    ref = (x_q.float() @ w_q.float().t()) * x_s * w_s
    _close(y, ref, 0.01)
    for backend in ("tma", "pointer"):
        _close(scaled_mm(x_q, w_q, x_s, w_s, backend=backend), ref, 0.01)
    if m >= 16:  # torch._scaled_mm's row-wise scaling wants M a multiple of 16
        theirs = torch._scaled_mm(x_q, w_q.t(), scale_a=x_s, scale_b=w_s.view(1, -1), out_dtype=torch.bfloat16)
        _close(y, theirs, 0.01)
    # the whole layer against the unquantized activations: two e4m3 roundings (~3% each) of the products
    _close(fp8_gemm(x_q, w_q, x_s, w_s), x.float() @ (w_q.float() * w_s[:, None]).t(), 0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32, 256])
def test_int8_gemm_gpu_matches_int_mm(m):
    torch.manual_seed(m)
    n, k = 4096, 4096
    x_q, x_s = per_token_quant_int8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    w_q, w_s = quantize_per_channel_int8(torch.randn(n, k, device="cuda"))
    one = torch.ones(1, device="cuda")
    acc = int8_gemm(x_q, w_q, one, one, out_dtype=torch.float32)
    exact = (x_q.double() @ w_q.double().t()).long() if m <= 16 else torch._int_mm(x_q, w_q.t()).long()
    assert exact.abs().max() < 2 ** 24  # so that the fp32 output holds the int32 sum exactly
    assert torch.equal(acc.long(), exact)
    for backend in ("tma", "pointer"):
        assert torch.equal(scaled_mm(x_q, w_q, one, one, out_dtype=torch.float32, backend=backend).long(), exact)
    _close(int8_gemm(x_q, w_q, x_s, w_s), exact.float() * x_s * w_s, 0.01)
