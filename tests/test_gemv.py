"""The decode GEMV (kernels/gemv.py) and its dispatch from the dense linears and the LM head (layers/gemv_dispatch.py).

CPU part: Triton's interpreter in fp32 at tiny awkward sizes (N not a multiple of BLOCK_N, K not a multiple of
BLOCK_K, M = 1, 3, 16), both inner products, split-K (including a split with no K tiles left), bias, repeated
calls (the split-K workspace must be left clean), bad input; and that on CPU the layers still call F.linear.
GPU part (@pytest.mark.gpu): bf16 at Llama-3-8B shapes against F.linear and an fp32 reference, the dispatch in
each mode, and a CUDA graph replaying a split-K launch.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import minillm.layers.gemv_dispatch as dispatch_module
from minillm.kernels.gemv import MAX_M, gemv
from minillm.kernels.gemv_config import GemvConfig, code_config, default_config
from minillm.layers.embedding import LMHead
from minillm.layers.linear import Linear, dense_linear, set_gemv_mode

FP32_RTOL = 1e-5  # fp32 accumulation in another order than torch's: a few ulps of the output's magnitude


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rtol * scale + 1e-6, f"max abs error {err:.3g} > {rtol} x max|ref| {scale:.3g}"


CASES = [  # m, n, k, bias, config
    (1, 37, 100, True, GemvConfig(block_n=8, block_k=32)),                       # ragged N and K
    (1, 64, 128, False, GemvConfig(block_n=16, block_k=32, split_k=4)),          # split-K, even
    (3, 40, 128, True, GemvConfig(block_n=16, block_k=32, split_k=3)),           # 4 K tiles over 3 splits
    (2, 24, 96, False, GemvConfig(block_n=8, block_k=64, split_k=2)),            # 2nd split: a partial tile
    (4, 33, 96, True, GemvConfig(block_n=16, block_k=16, split_k=2, use_dot=True)),  # tensor-core path
    (16, 20, 48, False, GemvConfig(block_n=16, block_k=16, use_dot=True)),       # M = MAX_M
    (1, 5, 96, True, GemvConfig(block_n=1, block_k=128)),                         # one row per program
    (2, 7, 64, False, GemvConfig(block_n=2, block_k=64, num_warps=2)),           # the whole K row at once
    (4, 40, 100, True, GemvConfig(block_n=16, block_k=32, reduce_each=True)),    # sums over K every tile
    (3, 40, 128, False, GemvConfig(block_n=16, block_k=32, split_k=2, reduce_each=True)),
    (6, 37, 100, True, GemvConfig(block_n=4, block_k=128, row_passes=True)),     # one pass per row, ragged
    (2, 8, 64, False, GemvConfig(block_n=8, block_k=64, row_passes=True)),       # K exactly one tile
    (1, 20, 64, True, None),                                                     # default_config
    (6, 20, 64, False, None),                                                    # default_config, M > 1
    (2, 20, 576, True, None),                                                    # default_config: row passes
]


@pytest.mark.parametrize("m,n,k,bias,config", CASES)
def test_gemv_matches_f_linear(m, n, k, bias, config):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    ref = F.linear(x, w, b)
    for _ in range(2):  # the second call sees the workspace the first left behind
        y = gemv(x, w, b, config=config)
        assert y.shape == (m, n) and y.dtype == x.dtype
        _close(y, ref, FP32_RTOL)


@pytest.mark.parametrize("m,n,k,bias,config", CASES)
def test_gemv_int8_weights_match_the_dequantized_weight(m, n, k, bias, config):
    """weight_scale: int8 codes converted in registers, each row's sum scaled once (int8 weight-only)."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k + 1)
    x = torch.randn(m, k, generator=gen)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 127 + 1e-3
    b = torch.randn(n, generator=gen) if bias else None
    ref = F.linear(x, q.float() * scale[:, None], b)
    for _ in range(2):
        _close(gemv(x, q, b, config=config, weight_scale=scale), ref, FP32_RTOL)


def test_gemv_fp8_weights_match_the_dequantized_weight():
    """The same path with e4m3 codes (FP8 at decode): the codes widened in registers, each row scaled once."""
    from minillm.quant.fp8 import quantize_fp8
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(3, 96, generator=gen), torch.randn(40, 96, generator=gen), torch.randn(40, generator=gen)
    w8, scale = quantize_fp8(w)
    ref = F.linear(x, w8.float() * scale[:, None], b)
    for config in (None, GemvConfig(block_n=16, block_k=32, split_k=2, use_dot=True), GemvConfig(block_n=8, block_k=32)):
        _close(gemv(x, w8, b, config=config, weight_scale=scale), ref, FP32_RTOL)


def test_gemv_int8_weights_reject_bad_input():
    x, q = torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="weight must be a 2-D \\[N, K\\] tensor of x's dtype"):
        gemv(x, q)  # int8 codes without their scales
    with pytest.raises(ValueError, match="tensor of int8 or float8_e4m3fn \\(weight_scale is given\\)"):
        gemv(x, q.float(), weight_scale=torch.ones(8))
    with pytest.raises(ValueError, match="weight_scale must be a floating \\[N\\] = \\[8\\]"):
        gemv(x, q, weight_scale=torch.ones(7))


def test_gemv_more_splits_than_k_tiles_and_leading_dims():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 64, generator=gen)  # [..., K]: two rows in all
    w = torch.randn(24, 64, generator=gen)
    y = gemv(x, w, config=GemvConfig(block_n=8, block_k=32, split_k=8))  # 2 K tiles: 2 splits are launched
    assert y.shape == (2, 1, 24)
    _close(y, F.linear(x, w), FP32_RTOL)


def test_gemv_strided_x():
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(3, 80, generator=gen)
    x = big[:, 8:72]  # rows 80 apart, K = 64 contiguous
    w = torch.randn(16, 64, generator=gen)
    _close(gemv(x, w, config=GemvConfig(block_n=8, block_k=32)), F.linear(x, w), FP32_RTOL)


def test_gemv_rejects_bad_input():
    w = torch.randn(16, 32)
    with pytest.raises(ValueError, match="rows of x"):
        gemv(torch.randn(MAX_M + 1, 32), w)
    with pytest.raises(ValueError, match="agree on K"):
        gemv(torch.randn(1, 31), w)
    with pytest.raises(ValueError, match="dtype"):
        gemv(torch.randn(1, 32), w.double())
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        gemv(torch.ones(1, 32, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="bias"):
        gemv(torch.randn(1, 32), w, torch.randn(15))
    with pytest.raises(ValueError, match="contiguous along K"):
        gemv(torch.randn(1, 32), torch.randn(32, 16).t())
    with pytest.raises(ValueError, match="block_n"):
        gemv(torch.randn(1, 32), w, config=GemvConfig(block_n=12))
    with pytest.raises(ValueError, match="split_k"):
        gemv(torch.randn(1, 32), w, config=GemvConfig(split_k=0))
    with pytest.raises(ValueError, match="programmatic dependent launch"):
        gemv(torch.randn(1, 32), w, config=GemvConfig(pdl=True))
    with pytest.raises(ValueError, match="tl.dot"):
        gemv(torch.randn(1, 32), w, config=GemvConfig(block_n=8, use_dot=True))
    with pytest.raises(ValueError, match="all of K = 32 in one tile"):
        gemv(torch.randn(2, 32), w, config=GemvConfig(block_n=4, block_k=16, row_passes=True))
    with pytest.raises(ValueError, match="excludes"):
        gemv(torch.randn(2, 32), w, config=GemvConfig(block_n=4, block_k=32, split_k=2, row_passes=True))


def test_default_config_is_valid_for_any_shape():
    """Every (M, N, K) gets a launch that passes its own check: powers of two, tl.dot's minimum tile."""
    for m in range(1, MAX_M + 1):
        for n, k in [(1, 1), (20, 64), (4096, 4096), (4096, 14336), (6144, 4096), (128256, 4096), (576, 1536)]:
            cfg = default_config(m, n, k, num_sms=132)
            cfg.check(m)
            # M = 2 over rows of <= 2048 weights: one pass per row of x over W's tile; otherwise M >= 2 is tl.dot
            assert cfg.row_passes == (m == 2 and k <= 2048), (m, n, k, cfg)
            assert cfg.use_dot == (m > 1 and not cfg.row_passes), (m, n, k, cfg)
            assert cfg.split_k == 1 or -(-n // cfg.block_n) < 2 * 132, (m, n, k, cfg)
            # one row of at most 2048 weights: read whole in one tile (SmolLM2's K = 576 and 1536)
            assert m > 1 or (cfg.block_k >= k) == (k <= 2048), (m, n, k, cfg)


def test_code_config_is_valid_for_any_shape():
    """8-bit codes: tensor-core tiles (the rule read off the int8 sweep), K split to ~3 programs per SM with at
    least two K tiles a split; SmolLM2-sized matrices keep default_config at M = 1 and take 2-row CUDA-core tiles
    at M = 2..4."""
    for m in range(1, MAX_M + 1):
        for n, k in [(1, 1), (20, 64), (4096, 4096), (4096, 14336), (6144, 4096), (28672, 4096), (576, 1536)]:
            cfg = code_config(m, n, k, num_sms=132)
            cfg.check(m)
            if m == 1 and n * k < 1 << 23:
                assert cfg == default_config(m, n, k, num_sms=132)
                continue
            if m <= 4 and n * k < 1 << 23:  # small matrices, a few rows: CUDA-core tiles of 2 rows
                assert (cfg.block_n, cfg.block_k, cfg.use_dot) == (2, 1024, False)
                continue
            tiles = -(-n // cfg.block_n)
            assert cfg.use_dot and (cfg.split_k == 1 or tiles * cfg.split_k <= 3 * 132), (m, n, k, cfg)
            assert cfg.split_k == 1 or -(-k // cfg.block_k) >= 2 * cfg.split_k, (m, n, k, cfg)
    assert code_config(1, 6144, 4096).split_k == 4 and code_config(1, 28672, 4096).split_k == 1


def test_tuned_configs_are_valid_and_correct_at_smollm2_sizes():
    """Every measured entry passes its own check, and the small ones (SmolLM2's verify-step shapes) give F.linear's
    result under the interpreter (the Llama-3-8B ones are too big to run here;
    test_default_config_is_valid_for_any_shape covers them)."""
    from minillm.kernels.gemv_config import TUNED_CONFIGS, tuned_config

    for (m, n, k), cfg in TUNED_CONFIGS.items():
        cfg.check(m, x_is_cuda=False)
        assert tuned_config(m, n, k, torch.device("cpu")) is cfg
        if n * k <= 1 << 20:
            gen = torch.Generator().manual_seed(n + k + m)
            x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
            _close(gemv(x, w, config=cfg), F.linear(x, w), FP32_RTOL)


def test_cpu_layers_still_call_f_linear(monkeypatch):
    """On CPU the dense Linear and the LM head give exactly F.linear, and never reach the GEMV decision."""
    monkeypatch.setattr(dispatch_module, "_decide_gemv", lambda *a: pytest.fail("GEMV considered on CPU"))
    torch.manual_seed(0)
    layer = Linear(32, 24, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    x = torch.randn(1, 32)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    head = LMHead(50, 32)
    head.weight.data.normal_()
    assert torch.equal(head(x), F.linear(x, head.weight))
    assert torch.equal(dense_linear(x, layer.weight), F.linear(x, layer.weight))


def test_gemv_mode_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="gemv mode must be one of"):
        set_gemv_mode("fast")
    monkeypatch.setattr(dispatch_module, "_gemv_mode", None)
    monkeypatch.setenv("MINILLM_GEMV", "maybe")
    with pytest.raises(ValueError, match="MINILLM_GEMV must be one of"):
        dispatch_module.gemv_mode()
    monkeypatch.setenv("MINILLM_GEMV", "0")
    assert dispatch_module.gemv_mode() == "off"


# ---------------------------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LLAMA3_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n,k", LLAMA3_SHAPES)
def test_gemv_bf16_llama3_shapes(m, n, k):
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = F.linear(x.float(), w.float(), b.float())
    cublas_err = (F.linear(x, w, b).float() - ref).abs().max().item()
    for cfg in (None, GemvConfig(block_n=16, block_k=256, split_k=4, use_dot=True, num_stages=3)):
        for _ in range(2):
            err = (gemv(x, w, b, config=cfg).float() - ref).abs().max().item()
            # bf16 output rounding: the same order of error as cuBLAS's
            assert err <= 2 * cublas_err + 1e-2, f"{cfg}: error {err:.3g}, cuBLAS {cublas_err:.3g}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("split_k", [2, 4, 8])
def test_split_k_gives_the_same_bits_every_run(split_k):
    """The splits' partials meet in split order (kernels/gemv.py: slots, not atomics in arrival order), so a
    repeated call gives the same bits, fp32 and bf16 outputs alike: greedy decoding repeats itself."""
    gen = torch.Generator(device="cuda").manual_seed(split_k)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 14336, device="cuda", dtype=dtype, generator=gen)
        w = torch.randn(4096, 14336, device="cuda", dtype=dtype, generator=gen) * 0.02
        cfg = GemvConfig(block_n=16, block_k=256, split_k=split_k, use_dot=dtype != torch.float32)
        first = gemv(x, w, config=cfg)
        assert all(torch.equal(gemv(x, w, config=cfg), first) for _ in range(30))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["on", "auto", "off"])
def test_dense_linear_modes_on_gpu(mode):
    set_gemv_mode(mode)
    try:
        layer = Linear(4096, 6144, dtype=torch.bfloat16).cuda()
        layer.weight.data.normal_(0, 0.02)
        for m in (1, 4, 8, 64):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), layer.weight.float())
            assert (layer(x).float() - ref).abs().max().item() < 0.05
        decisions = {key[-1]: cfg for key, cfg in dispatch_module._GEMV_DECISIONS.items() if key[2:4] == (6144, 4096)}
        if mode == "on":
            assert all(decisions.get(m) is not None for m in (1, 4, 8))
        if mode == "off":
            assert not decisions
        assert 64 not in decisions  # above GEMV_MAX_M rows: always F.linear
    finally:
        set_gemv_mode("auto")


@pytest.mark.gpu
@needs_cuda
def test_dense_linear_keeps_autograd_on_gpu():
    """A trainable layer (draft heads are trained on the GPU) must keep F.linear: the GEMV has no backward."""
    set_gemv_mode("on")
    try:
        w = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x = torch.randn(1, 128, device="cuda", dtype=torch.bfloat16)
        dense_linear(x, w).float().sum().backward()
        assert w.grad is not None and w.grad.shape == w.shape
    finally:
        set_gemv_mode("auto")


@pytest.mark.gpu
@needs_cuda
def test_gemv_split_k_in_a_cuda_graph():
    """A replayed split-K launch must reset its workspace and counters every time (new inputs each replay)."""
    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(2, 14336, device="cuda", dtype=torch.bfloat16)
    cfg = GemvConfig(block_n=16, block_k=512, split_k=8)
    gemv(x, w, config=cfg)  # compile and size the workspace outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemv(x, w, config=cfg)
    for i in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = F.linear(x.float(), w.float())
        assert (y.float() - ref).abs().max().item() < 0.05, f"replay {i}"


def test_gemv_swiglu_input_equals_silu_and_mul_then_gemv():
    """gemv(swiglu=True) on [gate | up] computes the activation in its loads exactly as silu_and_mul's kernel
    does (fp32, rounded to x's dtype), so it equals the two launches it replaces (interpreter, fp32)."""
    from minillm.kernels.fused import silu_and_mul
    g = torch.Generator().manual_seed(11)
    for m, n, k, cfg in ((1, 24, 64, GemvConfig(block_n=8, block_k=32)),
                         (3, 20, 48, GemvConfig(block_n=8, block_k=32, split_k=2)),  # a ragged K and split-K
                         (5, 12, 48, GemvConfig(block_n=4, block_k=64, row_passes=True))):  # one pass per row
        gate_up = torch.randn(m, 2 * k, generator=g)
        w = torch.randn(n, k, generator=g)
        fused = gemv(gate_up, w, config=cfg, swiglu=True)
        torch.testing.assert_close(fused, gemv(silu_and_mul(gate_up), w, config=cfg), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="gate \\| up"):
        gemv(torch.randn(1, 2 * k + 1), w, swiglu=True)


NORM_CASES = [  # m, n, k, residual, config: every inner product, split-K, ragged K, one tile, row passes
    (1, 37, 100, True, GemvConfig(block_n=8, block_k=32)),
    (1, 37, 100, False, GemvConfig(block_n=8, block_k=32)),
    (3, 40, 96, True, GemvConfig(block_n=16, block_k=32, split_k=3)),
    (2, 24, 128, True, GemvConfig(block_n=16, block_k=16, use_dot=True)),
    (4, 40, 100, True, GemvConfig(block_n=16, block_k=32, reduce_each=True)),
    (1, 20, 96, True, GemvConfig(block_n=4, block_k=128)),  # the whole row in one tile (the small-model M = 1 rule)
    (2, 7, 64, True, GemvConfig(block_n=4, block_k=64, row_passes=True)),
]


@pytest.mark.parametrize("m,n,k,has_residual,config", NORM_CASES)
def test_gemv_rms_norm_equals_rms_norm_then_gemv(m, n, k, has_residual, config):
    """gemv_rms_norm normalises x (+ residual) in its loads as fused.rms_norm's kernel does, so (y, new residual)
    match the two launches it replaces (interpreter, fp32: the inverse RMS may differ in its last bit, being
    summed in another order), the new residual is a new tensor written once, and the residual passed in is
    left as it was."""
    from minillm.kernels.fused import rms_norm
    from minillm.kernels.gemv import gemv_rms_norm
    g = torch.Generator().manual_seed(m * 1000 + k)
    x, w, norm_w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(k, generator=g)
    residual = torch.randn(m, k, generator=g) if has_residual else None
    kept = residual.clone() if has_residual else None
    y, h = gemv_rms_norm(x, residual, norm_w, 1e-5, w, config=config)
    ref = rms_norm(x, norm_w, 1e-5, residual)
    x_normed, h_ref = ref if has_residual else (ref, x)
    _close(y, F.linear(x_normed, w), FP32_RTOL)
    assert torch.equal(h, h_ref)
    if has_residual:
        assert torch.equal(residual, kept) and h.data_ptr() != residual.data_ptr()
    else:
        assert h is x or h.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("m,n,k,has_residual,config", NORM_CASES + [(3, 40, 512, True, None), (1, 40, 96, True, None)])
def test_fusions_with_8bit_codes(m, n, k, has_residual, config):
    """The RMSNorm prologue and the SwiGLU loads with int8 codes and per-row scales (a quantized layer's decode
    step): what the dense weight q * s gives, in every launch shape (and code_config's, config None)."""
    from minillm.kernels.fused import rms_norm, silu_and_mul
    from minillm.kernels.gemv import gemv_rms_norm
    g = torch.Generator().manual_seed(m * 1000 + k + 7)
    x, norm_w = torch.randn(m, k, generator=g), torch.randn(k, generator=g)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) / 127 + 1e-3
    w = q.float() * scale[:, None]
    residual = torch.randn(m, k, generator=g) if has_residual else None
    y, h = gemv_rms_norm(x, residual, norm_w, 1e-5, q, config=config, weight_scale=scale)
    ref = rms_norm(x, norm_w, 1e-5, residual)
    x_normed, h_ref = ref if has_residual else (ref, x)
    _close(y, F.linear(x_normed, w), FP32_RTOL)
    assert torch.equal(h, h_ref)
    if not config or not config.row_passes:  # SwiGLU's loads (row passes read a whole row of x: not with 2K)
        gate_up = torch.randn(m, 2 * k, generator=g)
        _close(gemv(gate_up, q, config=config, swiglu=True, weight_scale=scale),
               F.linear(silu_and_mul(gate_up), w), FP32_RTOL)


def test_gemv_rms_norm_rejects_bad_input():
    from minillm.kernels.gemv import gemv_rms_norm
    x, w = torch.randn(1, 32), torch.randn(8, 32)
    with pytest.raises(ValueError, match="norm_weight must have shape \\(32,\\)"):
        gemv_rms_norm(x, None, torch.ones(31), 1e-5, w)
    with pytest.raises(ValueError, match="residual must match x"):
        gemv_rms_norm(x, torch.randn(2, 32), torch.ones(32), 1e-5, w)
    with pytest.raises(ValueError, match="eps must be > 0"):
        gemv_rms_norm(x, None, torch.ones(32), 0.0, w)
    with pytest.raises(ValueError, match="1..16 rows"):
        gemv_rms_norm(torch.randn(17, 32), None, torch.ones(32), 1e-5, w)


def test_rms_norm_fusion_not_offered_on_cpu():
    from minillm.layers.norm import RMSNorm
    layer = Linear(16, 8)
    assert not layer.fuses_rms_norm(torch.randn(1, 16))
    with pytest.raises(ValueError, match="forward_rms_norm needs"):
        layer.forward_rms_norm(torch.randn(1, 16), None, RMSNorm(16))


def test_swiglu_fusion_not_offered_on_cpu():
    layer = Linear(16, 8)
    assert not layer.fuses_swiglu(torch.randn(1, 32))
    with pytest.raises(ValueError, match="swiglu=True needs"):
        layer(torch.randn(1, 32), swiglu=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 4])
def test_gemv_swiglu_bf16_down_proj_shape(m):
    """Llama-3-8B's down projection (14336 -> 4096) fed [gate | up]: silu_and_mul, then the GEMV, to the last bit
    but for rare one-ulp flips (the H200 at M = 4: the compiler may order the fp32 activation's instructions
    differently in the two kernels, and a one-ulp change can cross a bf16 rounding boundary of x)."""
    from minillm.kernels.fused import silu_and_mul
    gen = torch.Generator(device="cuda").manual_seed(m)
    gate_up = torch.randn(m, 2 * 14336, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    cfg = default_config(m, 4096, 14336)
    fused, two = gemv(gate_up, w, config=cfg, swiglu=True), gemv(silu_and_mul(gate_up), w, config=cfg)
    assert (fused == two).float().mean() > 0.99
    torch.testing.assert_close(fused, two, rtol=1.6e-2, atol=1e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fused_wins", [True, False])
def test_swiglu_fusion_follows_its_own_timing(monkeypatch, fused_wins):
    """In "auto" mode the down projection takes SwiGLU into its GEMV only where _decide_swiglu timed the fused
    loads faster than the activation's launch plus the same GEMV (at 6 rows on the H200 they were not), once per
    shape; "on" fuses wherever the GEMV runs; set_gemv_mode forgets the decisions."""
    calls = []
    monkeypatch.setattr(dispatch_module, "_decide_swiglu", lambda *a: calls.append(1) or fused_wins)
    set_gemv_mode("on")  # the plain GEMV is chosen for certain, so only the SwiGLU decision is under test
    try:
        layer = Linear(1536, 576, dtype=torch.bfloat16).cuda()
        gate_up = torch.randn(6, 2 * 1536, device="cuda", dtype=torch.bfloat16)
        assert layer.fuses_swiglu(gate_up) and not calls  # "on": no timing
        dispatch_module._gemv_mode = "auto"  # auto, keeping the plain decision made above
        monkeypatch.setattr(dispatch_module, "_decide_gemv", lambda x2, w, mode: default_config(6, 576, 1536))
        assert layer.fuses_swiglu(gate_up) is fused_wins and layer.fuses_swiglu(gate_up) is fused_wins
        assert len(calls) == 1  # timed once per shape
        set_gemv_mode("auto")
        assert not dispatch_module._SWIGLU_DECISIONS
    finally:
        set_gemv_mode("auto")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m,n,k", [(1, 6144, 4096), (1, 960, 576), (2, 3072, 576), (6, 960, 576), (8, 28672, 4096)])
def test_gemv_rms_norm_bf16_on_gpu(m, n, k):
    """The norm-fused GEMV at Llama-3-8B's and SmolLM2's decode shapes, bf16, with the launch the engine would
    pick (PDL on where the GPU has it): the new residual bit for bit, y within bf16 rounding of the two launches
    (a last-bit change of the inverse RMS can move a normalised x across a bf16 rounding boundary)."""
    from minillm.kernels.fused import rms_norm
    from minillm.kernels.gemv import gemv_rms_norm
    from minillm.kernels.gemv_config import tuned_config
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    x, residual = (torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    norm_w = 1 + 0.1 * torch.randn(k, device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = tuned_config(m, n, k, x.device)
    y, h = gemv_rms_norm(x, residual, norm_w, 1e-5, w, config=cfg)
    x_normed, h_ref = rms_norm(x, norm_w, 1e-5, residual)
    assert torch.equal(h, h_ref)
    two = gemv(x_normed, w, config=cfg)
    assert (y == two).float().mean() > 0.98
    torch.testing.assert_close(y, two, rtol=1.6e-2, atol=1e-2)
