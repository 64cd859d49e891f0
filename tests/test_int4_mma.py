"""INT4 decode kernels beside int4_gemm.py's: int4_mma.py (bf16 halves, tensor cores) and int4_gemv.py (wide
CUDA-core GEMV), their tuning (int4_tuning.py) and the per-shape choice among kernels (int4_dispatch.py). CPU: Triton's interpreter at tiny awkward sizes against the
torch reference (x @ dequantize_int4(W)^T in fp32). GPU (@pytest.mark.gpu): bf16 at Llama-3-8B sizes.
"""
from __future__ import annotations

import pytest
import torch
import triton

import minillm  # noqa: F401  (TRITON_INTERPRET=1 before triton runs anything, without CUDA)
from minillm.kernels.int4_gemm import int4_gemm
from minillm.kernels.int4_layout import dequantize_int4, repack_int4
from minillm.kernels.int4_dispatch import candidates
from minillm.kernels.int4_tuning import MAX_SPLIT_K, choose_split_k, mma_applies, split_k_workspace
from minillm.quant.rtn import quantize

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# int4_mma removes the bf16 offset 128 after an fp32 dot: sum x (128 + c) - 128 sum x loses ~4 of fp32's 24 bits
# to the cancellation, so fp32 results agree to ~1e-5 of the output's magnitude rather than a few ulps
MMA_FP32_RTOL = 1e-4


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= rtol * scale + 1e-6, f"max abs error {err:.3g} > {rtol} x max|ref| {scale:.3g}"


def _weights(n: int, k: int, group: int, symmetric: bool, dtype=torch.float32, device="cpu"):
    qw = quantize(torch.randn(n, k, device=device), bits=4, group_size=group, symmetric=symmetric)
    packed = repack_int4(qw, dtype)
    return packed, dequantize_int4(*packed.args())


MMA_CASES = [  # m, n, k, group, symmetric, split_k, block_n
    (1, 64, 256, 128, False, 1, 32),    # one row, two K tiles in one program
    (3, 96, 256, 128, True, 2, 32),     # symmetric (zero point 8), split-K over 2
    (17, 64, 512, 256, False, 3, 64),   # two row tiles, two tiles per group, uneven split
    (2, 40, 384, 128, False, 2, 32),    # N not a multiple of BLOCK_N, 3 K tiles split 2 + 1
]


@pytest.mark.parametrize("m,n,k,group,symmetric,split_k,block_n", MMA_CASES)
def test_int4_mma_matches_dequantized_matmul(m, n, k, group, symmetric, split_k, block_n):
    torch.manual_seed(m * 100 + n + k)
    packed, w = _weights(n, k, group, symmetric)
    x = torch.randn(m, k)
    cfg = dict(MMA=True, BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128)
    y = int4_gemm(x, *packed.args(), split_k=split_k, config=cfg)
    _close(y, x @ w.t(), MMA_FP32_RTOL)
    ws, cnt = split_k_workspace(x.device, m, n)
    assert not ws.any() and not cnt.any(), "the last split must leave the workspace and counters zeroed"


@pytest.mark.parametrize("m,n,k,group,symmetric,split_k,block_n", MMA_CASES)
def test_int4_mma_tile_kernel_matches_dequantized_matmul(m, n, k, group, symmetric, split_k, block_n):
    """The one-dot-per-tile kernel (operand rows 8j + 2i + h, activations gathered to match) computes the same."""
    from minillm.kernels.int4_mma import launch_int4_mma

    torch.manual_seed(m * 100 + n + k + 1)
    packed, w = _weights(n, k, group, symmetric)
    x = torch.randn(m, k)
    qweight, scales, qzeros = packed.args()[:3]
    y = torch.full((m, n), float("nan"))
    ws, cnt = split_k_workspace(x.device, m, n)
    launch_int4_mma(x, qweight, scales, qzeros, group, None, y, ws, cnt,
                    dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=128, SPLIT_K=split_k), tile_dot=True)
    _close(y, x @ w.t(), MMA_FP32_RTOL)
    assert not ws.any() and not cnt.any(), "the last split must leave the workspace and counters zeroed"


def test_int4_mma_bias_and_bf16_activations():
    torch.manual_seed(5)
    packed, w = _weights(48, 256, 128, False, torch.bfloat16)
    x = torch.randn(2, 256).to(torch.bfloat16)
    bias = torch.randn(48).to(torch.bfloat16)
    y = int4_gemm(x, *packed.args(), bias=bias, config=dict(MMA=True, BLOCK_M=16, BLOCK_N=16, BLOCK_K=128))
    assert y.dtype == torch.bfloat16
    # bf16 output: 2^-8 relative rounding (and the interpreter's fp32 -> bf16 cast truncates)
    _close(y, x.float() @ w.t() + bias.float(), 0.01)


def test_int4_mma_rejects_tiles_it_cannot_run():
    packed, _ = _weights(32, 256, 64, False)
    with pytest.raises(ValueError, match="BLOCK_K"):  # a 128-row K tile straddles two groups of 64
        int4_gemm(torch.randn(1, 256), *packed.args(), config=dict(MMA=True, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128))
    packed, _ = _weights(32, 256, 128, False)
    with pytest.raises(ValueError, match="BLOCK_M"):
        int4_gemm(torch.randn(1, 256), *packed.args(), config=dict(MMA=True, BLOCK_M=8, BLOCK_N=32, BLOCK_K=128))


def _run_gemv(x, packed, bias, block_n, block_k, split, prefetch, packed_math, block_m=1):
    from minillm.kernels.int4_gemv import gemv_fits, int4_gemv_kernel

    m, k = x.shape
    n = packed.qweight.shape[1]
    assert gemv_fits(n, k, packed.group_size, block_n, block_k, split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    ws, cnt = split_k_workspace(x.device, m, n)
    qw, s = packed.qweight, packed.scales
    qz = packed.qzeros if packed.qzeros is not None else qw
    int4_gemv_kernel[(triton.cdiv(m, block_m) * (n // block_n), split)](
        x, qw, s, qz, bias if bias is not None else s, y, ws, cnt, m, n, k, x.stride(0), qw.stride(0), s.stride(0),
        qz.stride(0), y.stride(0), 0x000F000F, GROUP_SIZE=packed.group_size, HAS_ZEROS=packed.qzeros is not None,
        HAS_BIAS=bias is not None, PACKED=packed_math, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
        PREFETCH=prefetch, BLOCK_M=block_m, **({} if not packed_math else dict(num_warps=1, num_stages=1)))
    assert not ws.any() and not cnt.any(), "the last split must leave the workspace and counters zeroed"
    return y


def test_int4_gemv_packed_fp16_arithmetic_matches_reference():
    from minillm.kernels.int4_gemv import gemv_fits

    torch.manual_seed(7)
    m, n, k, group = 2, 96, 384, 64
    # split 3: two K tiles of 64 per program, with and without the next tile's prefetch; split 6: one tile each
    for symmetric, split, bias, prefetch, block_k in ((False, 3, None, True, 64), (True, 1, torch.randn(n), False, 32),
                                                      (False, 6, None, True, 64), (False, 2, None, False, 64)):
        packed, w = _weights(n, k, group, symmetric)
        x = torch.randn(m, k) * 4
        y = _run_gemv(x, packed, bias, 32, block_k, split, prefetch, packed_math=False)
        ref = x @ w.t() + (bias if bias is not None else 0)
        # fp16 weights (c - zero) / 16, fp16 activations, fp16 sums of up to 32 products: ~1e-3 of max|y|
        _close(y, ref, 3e-3)
    assert not gemv_fits(96, 384, 64, 64, 64, 1)  # 96 columns are not whole tiles of 64: never offered
    assert not gemv_fits(96, 384, 64, 32, 64, 4)  # 6 K tiles do not split 4 ways
    assert not gemv_fits(96, 384, 64, 32, 128, 1)  # a 128-row K tile straddles two groups of 64


def test_int4_gemv_several_rows_per_program():
    """BLOCK_M rows in one program (each word unpacked once for all of them): M = 2..8 in power-of-two blocks,
    rows past M padded by re-reading the last row and never stored, split-K with the workspace left clean; fp32
    activations (one load each) through the kernel, fp16 and bf16 (loaded as words) through run_launch."""
    import minillm.kernels.int4_dispatch as dispatch

    torch.manual_seed(5)
    n, k, group = 64, 256, 64
    for symmetric in (False, True):
        packed, w = _weights(n, k, group, symmetric)
        for m, block_m, split, prefetch in ((2, 2, 2, True), (3, 4, 1, False), (5, 8, 4, True), (8, 8, 2, False)):
            x = torch.randn(m, k) * 3
            y = _run_gemv(x, packed, None, 32, 64, split, prefetch, packed_math=False, block_m=block_m)
            _close(y, x @ w.t(), 3e-3)
    for dtype in (torch.float16, torch.bfloat16):
        packed, w = _weights(n, k, group, False, dtype)
        for m, block_m in ((3, 4), (6, 8)):
            x = (torch.randn(m, k) * 2).to(dtype)
            y = torch.zeros(m, n, dtype=torch.float32)
            ws, cnt = split_k_workspace(x.device, m, n)
            dispatch.run_launch(dispatch.Launch("gemv", block_m, 32, 32, 1, 1, 2, True), x, packed.qweight,
                                packed.scales, packed.qzeros, group, None, y, ws, cnt)
            _close(y, x.float() @ w.float().t(), 3e-3)
            assert not ws.any() and not cnt.any()


@pytest.mark.parametrize("dtype, word", [(torch.float16, 8), (torch.bfloat16, 4)])
def test_int4_gemv_16_bit_activations_by_words(monkeypatch, dtype, word):
    """16-bit activations are loaded as words (fp16: two 64-bit loads per word row, the pairs permuted out of
    them; bf16: two 32-bit loads per pair of pairs, widened by a shift or a mask): the same numbers as the
    reference through run_launch, also for rows that start off a word boundary (a view one element in: the
    launcher copies them to aligned rows first, which the kernel's first argument shows)."""
    import minillm.kernels.int4_dispatch as dispatch

    seen = []  # (address, row stride in bytes) modulo the word size, per GEMV launch
    kernel = dispatch.int4_gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(x, *args, **kwargs):
                seen.append((x.data_ptr() % word, x.stride(0) * x.element_size() % word))
                return kernel[grid](x, *args, **kwargs)
            return launch
    monkeypatch.setattr(dispatch, "int4_gemv_kernel", Spy())
    torch.manual_seed(11)
    m, n, k, group = 2, 64, 256, 64
    packed, w = _weights(n, k, group, False, dtype)
    base = (torch.randn(m, k + 1) * 2).to(dtype)
    for x in (base[:, :k].contiguous(), base[:, 1:]):  # aligned rows; rows at 2-byte offsets (stride k + 1)
        ref = x.float() @ w.float().t()
        for split, prefetch in ((2, True), (4, False)):
            y = torch.empty(m, n, dtype=torch.float32)  # (the interpreter rounds fp32 -> bf16 stores wrongly)
            ws, cnt = split_k_workspace(x.device, m, n)
            dispatch.run_launch(dispatch.Launch("gemv", 1, 32, 64, 1, 1, split, prefetch), x, packed.qweight,
                                packed.scales, packed.qzeros, group, None, y, ws, cnt)
            _close(y, ref, 3e-3)
    assert seen == [(0, 0)] * 4


def test_int4_gemv_tma_kernel_matches_reference():
    """The TMA twin of the GEMV (a host tensor descriptor of qweight, tl.range-pipelined loads) through the
    dispatcher's run_launch: the interpreter emulates the descriptor loads."""
    import minillm.kernels.int4_dispatch as dispatch

    torch.manual_seed(9)
    m, n, k, group = 2, 96, 384, 64
    for symmetric, split, stages in ((False, 3, 2), (True, 6, 3)):
        packed, w = _weights(n, k, group, symmetric)
        x = torch.randn(m, k) * 4
        y = torch.empty(m, n)
        ws, cnt = split_k_workspace(x.device, m, n)
        bias = torch.randn(n)
        dispatch.run_launch(dispatch.Launch("gemv_tma", 1, 32, 64, 1, stages, split), x, packed.qweight, packed.scales,
                            packed.qzeros, group, bias, y, ws, cnt)
        _close(y, x @ w.t() + bias, 3e-3)
        assert not ws.any() and not cnt.any()
    assert not dispatch.tma_available()  # the interpreter: never a candidate here


def test_mma_applies_only_where_its_codes_fit():
    bf = torch.empty(1, 8, dtype=torch.bfloat16)
    assert mma_applies(bf, 128, 1) and mma_applies(bf, 256, 64)
    assert not mma_applies(bf, 64, 1), "a 128-row K tile must lie inside one group"
    assert not mma_applies(bf, 128, 65), "large M goes to the large-tile kernel"
    assert not mma_applies(bf.float(), 128, 1), "fp32 activations: no bf16 halves"


def test_dispatch_candidates_cover_the_kernels_with_sane_splits():
    sms = 132
    for m, n, k in ((1, 14336, 4096), (2, 4096, 14336), (3, 14336, 4096), (4, 4096, 4096), (5, 4096, 4096),
                    (16, 6144, 4096), (32, 4096, 4096),
                    (64, 28672, 4096), (1, 64, 256)):
        cands = candidates(m, n, k, 128, torch.bfloat16, sms)
        assert cands[0].kernel == "dot", "the reference for the output check comes first"
        kinds = {c.kernel for c in cands}
        expected = {"fma", "gemv", "dot", "mma"} if m <= 2 else {"gemv", "dot", "mma"} if m <= 4 else {"dot", "mma"}
        expected |= {"mma_tile"} if "mma" in expected else set()
        expected |= ({"dequant"} if m >= 16 else set()) | ({"wgmma"} if m == 32 else set())
        assert kinds == expected, (m, kinds)
        for c in cands:
            if c.kernel == "dequant":  # split_k counts column slices of the bf16 weight (1 and L2-sized)
                assert 1 <= c.split_k <= n // 8, c
                continue
            tiles = triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n)
            assert 1 <= c.split_k <= min(MAX_SPLIT_K, triton.cdiv(k, c.block_k)), c
            assert c.split_k == 1 or sms // 2 <= tiles * c.split_k <= 16 * sms, (m, n, k, c)
            assert c.kernel in ("fma", "gemv") or c.block_m == max(16, triton.next_power_of_2(m))
            assert c.kernel != "mma_tile" or c.block_n == 16 * c.num_warps, c  # the register-operand tiles
            # a GEMV program holds one row, or from M = 2 all of them (M rounded up to a power of two)
            assert c.kernel != "gemv" or c.block_m in (1, triton.next_power_of_2(m)), c
        assert (m <= 2) == any(c.kernel == "gemv" and c.block_m == 1 for c in cands), m
        assert (3 <= m <= 4) == any(c.kernel == "gemv" and c.block_m > 1 for c in cands), m
    big = candidates(4096, 14336, 4096, 128, torch.bfloat16, sms)  # prefill: large tiles unsplit, and dequant
    assert big[0].kernel == "dot" and {c.kernel for c in big} == {"dot", "dequant"}
    assert all(c.split_k == 1 and c.block_m <= 128 for c in big if c.kernel == "dot")
    assert sorted(c.split_k for c in big if c.kernel == "dequant") == [1, 5]  # 117 MB of bf16 in <= 24 MB slices
    # fp32 activations or groups of 64: no bf16-halves kernel, and no CUDA-core tile straddling two groups
    assert not {"mma", "mma_tile"} & {c.kernel for c in candidates(1, 4096, 4096, 128, torch.float32, sms)}
    assert all(c.kernel not in ("mma", "mma_tile") and (c.kernel not in ("fma", "gemv") or 64 % c.block_k == 0)
               for c in candidates(1, 4096, 4096, 64, torch.bfloat16, sms))


def test_dispatch_tune_drops_wrong_launches_and_keeps_the_fastest(monkeypatch):
    """_tune on the interpreter (timings faked): a launch whose output disagrees with the reference, or whose
    graph-timing fails, is dropped even when it would be the fastest, and the fastest correct one wins."""
    import minillm.kernels.int4_dispatch as dispatch

    torch.manual_seed(11)
    m, n, k = 1, 64, 256
    packed, w = _weights(n, k, 128, False)
    x = torch.randn(m, k)
    y = torch.empty(m, n)
    ws, cnt = split_k_workspace(x.device, m, n)
    ref_launch = dispatch.Launch("dot", 16, 32, 128, 4, 3, 1)
    mma = dispatch.Launch("mma", 16, 32, 128, 4, 3, 2)
    fma = dispatch.Launch("fma", 1, 32, 64, 4, 3, 2)
    gemv = dispatch.Launch("gemv", 1, 32, 64, 4, 1, 2)
    broken = dispatch.Launch("fma", 1, 64, 128, 4, 3, 1)
    uncapturable = dispatch.Launch("fma", 1, 16, 64, 1, 3, 2)  # right answer, but its graph capture fails
    fake_us = {ref_launch: 3.0, mma: 2.0, gemv: 1.8, fma: 1.5, broken: 0.5, uncapturable: 0.4}
    real_run = dispatch.run_launch

    def run(lc, *args):
        real_run(lc, *args)
        if lc == broken:
            args[6].add_(1.0)  # y: a wrong answer

    current = {}

    def fake_time(fn):
        fn()
        if current["lc"] == uncapturable:
            raise RuntimeError("operation not permitted when stream is capturing")
        return fake_us[current["lc"]]

    def tracking_run(lc, *args):
        current["lc"] = lc
        run(lc, *args)

    monkeypatch.setattr(dispatch, "run_launch", tracking_run)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(dispatch, "cold_graph_timer", lambda: fake_time)
    args = (x, packed.qweight, packed.scales, packed.qzeros, 128, None, y, ws, cnt)
    assert dispatch._tune([ref_launch, broken, mma, gemv, uncapturable, fma], args) == fma
    real_run(fma, *args)
    _close(y, x @ w.t(), MMA_FP32_RTOL)


def test_choose_split_k_bounds():
    assert choose_split_k(1, 14336, 4096, 1, 128, 128, 132) > 1
    assert choose_split_k(128, 14336, 4096, 16, 128, 128, 132) == 1
    for n in (64, 4096, 14336):
        assert 1 <= choose_split_k(1, n, 4096, 1, 128, 128, 132) <= MAX_SPLIT_K


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 5, 16, 33])
def test_int4_gemm_gpu_mma_path_bf16(m):
    torch.manual_seed(m)
    packed, w = _weights(6144, 4096, 128, False, torch.bfloat16, "cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ w.t()
    _close(int4_gemm(x, *packed.args()), ref, 0.01)  # the dispatcher's pick
    _close(int4_gemm(x, *packed.args()), ref, 0.01)  # the same pick, tuned already
    _close(int4_gemm(x, *packed.args(), config=dict(MMA=True, BLOCK_M=16 if m <= 16 else 64, BLOCK_N=128,
                                                     BLOCK_K=128, num_warps=4)), ref, 0.01)
    _close(int4_gemm(x, *packed.args(), split_k=8, config=dict(MMA=True, BLOCK_M=16 if m <= 16 else 64,
                                                                BLOCK_N=256, BLOCK_K=128, num_warps=8)), ref, 0.01)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 16, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_mma_tile_kernel_gpu_matches_torch(m, dtype):
    """The one-dot-per-tile kernel at a Llama-3-8B size, each of its tiles, split and unsplit, bf16 and fp16."""
    from minillm.kernels.int4_dispatch import MMA_TILE_TILES
    from minillm.kernels.int4_mma import launch_int4_mma

    torch.manual_seed(m)
    packed, w = _weights(6144, 4096, 128, False, dtype, "cuda")
    x = torch.randn(m, 4096, device="cuda", dtype=dtype)
    ref = x.float() @ w.t()
    qweight, scales, qzeros = packed.args()[:3]
    for bn, warps in MMA_TILE_TILES:
        for split in (1, 8):
            y = torch.full((m, 6144), float("nan"), device="cuda", dtype=dtype)
            ws, cnt = split_k_workspace(x.device, m, 6144)
            launch_int4_mma(x, qweight, scales, qzeros, 128, None, y, ws, cnt,
                            dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=bn, BLOCK_K=128, SPLIT_K=split,
                                 num_warps=warps, num_stages=1), tile_dot=True)
            _close(y, ref, 0.01)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_gemv_gpu_packed_asm_matches_torch(m, dtype):
    """The PTX path (lop3 / fma.rn.f16x2 / cvt.rn.f16x2.f32 or prmt / add.f16x2, PACKED=True on a GPU) against
    torch, with and without the prefetch, at BLOCK_K 64 and 32, for bf16 and fp16 activations."""
    torch.manual_seed(40 + m)
    n, k, group = 4096, 4096, 128
    packed, w = _weights(n, k, group, False, dtype, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = x.float() @ w.t()
    for block_n, block_k, split, prefetch in ((256, 64, 8, True), (128, 64, 16, False), (128, 32, 4, True)):
        _close(_run_gemv(x, packed, None, block_n, block_k, split, prefetch, packed_math=True), ref, 0.01)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_gemv_gpu_several_rows_match_torch(m, dtype):
    """The PTX path with BLOCK_M rows per program: the dispatcher's tile for M = 3..4 at BLOCK_M = 2, 4 and 8."""
    import minillm.kernels.int4_dispatch as dispatch

    torch.manual_seed(50 + m)
    n, k, group = 4096, 4096, 128
    packed, w = _weights(n, k, group, False, dtype, "cuda")
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    ref = x.float() @ w.t()
    block_m = triton.next_power_of_2(m)
    for block_n, block_k, warps, prefetch in dispatch.GEMV_ROW_TILES[4]:
        y = torch.empty(m, n, device="cuda", dtype=dtype)
        ws, cnt = split_k_workspace(x.device, m, n)
        dispatch.run_launch(dispatch.Launch("gemv", block_m, block_n, block_k, warps, 1, 8, prefetch), x,
                            packed.qweight, packed.scales, packed.qzeros, group, None, y, ws, cnt)
        _close(y, ref, 0.01)
        assert not ws.any() and not cnt.any()


@gpu
@pytest.mark.gpu
def test_int4_gemv_tma_on_hopper_matches_torch():
    import minillm.kernels.int4_dispatch as dispatch

    if not dispatch.tma_available():
        pytest.skip("needs a GPU with TMA (sm_90+)")
    torch.manual_seed(43)
    n, k, group = 4096, 4096, 128
    packed, w = _weights(n, k, group, False, torch.bfloat16, "cuda")
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for block_n, block_k, warps, stages in dispatch.GEMV_TMA_TILES:
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        ws, cnt = split_k_workspace(x.device, 1, n)
        dispatch.run_launch(dispatch.Launch("gemv_tma", 1, block_n, block_k, warps, stages, 8), x, packed.qweight,
                            packed.scales, packed.qzeros, group, None, y, ws, cnt)
        _close(y, x.float() @ w.t(), 0.01)


def test_gemv_tiles_compile_for_hopper_with_few_registers_and_instructions():
    """The INT4 GEMV's tiles compiled for sm_90 on this machine (Triton's bundled ptxas, no GPU): at most 168
    registers per thread (12 warps per SM) and 3.5 SASS instructions per weight in the K loop (4.2 for the TMA
    twin, whose loads must be TMA's); with fp16 activations at least 0.1 fewer per weight than with bf16. The
    H200 showed the kernel latency-bound when it took 254 registers and 6.5 instructions (RESULTS.md, fourteenth
    session). The one-dot tensor-core kernel's tiles keep the unpacked weights out of shared memory (in the K loop
    one buffer, the activations', and one conversion, the packed words'), at most 4.5 instructions per weight."""
    import json
    import os
    import subprocess
    import sys

    from minillm.course.registry import repo_root

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tools):
        pytest.skip("this Triton wheel has no NVIDIA tools")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, os.path.join(repo_root(), "benchmarks", "sass_count.py"), "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len([row for row in rows if row["kernel"] == "gemv"]) >= 6
    assert len([row for row in rows if row["kernel"] == "mma_tile"]) >= 2
    by_tile = {row["tile"]: row for row in rows}
    for name, row in by_tile.items():  # fp16 activations (two 64-bit loads a row, a permute a pair) cost less
        if name.endswith("_fp16"):
            bf16 = by_tile[name[:-len("_fp16")]]
            assert row["per_weight"] <= bf16["per_weight"] - 0.1, (row, bf16)
    for row in rows:
        assert not row["spills"], row
        if row["kernel"] == "mma_tile":  # the one-dot kernel: the unpacked weights stay in the operand's registers
            assert row["local_allocs"] == 1 and row["loop_converts"] == 1, row
            assert row["registers"] <= 128 and row["per_weight"] <= 4.5, row
            continue
        if row["rows"] > 1:  # several activation rows: more live registers, fewer instructions per weight and row
            assert row["registers"] <= 232 and row["per_weight_row"] <= 2.8, row
            continue
        assert row["registers"] <= 168, row
        if row["kernel"] == "gemv":
            assert row["per_weight"] <= 3.5 and not row["tma_loads"], row
        else:  # the TMA twin: its words come by TMA (UTMALDG) through shared memory (LDS), ~0.7 more per weight
            assert row["tma_loads"] and row["per_weight"] <= 4.2, row
