"""Graded tests of chapter 3's Triton puzzles: masked 2-D tiles, a row softmax, a tiled matmul.

The exercises are @triton.jit kernels; the tests run them through the launcher beside them in the chapter
module (the learner's or the solution's), or launch them directly where a test needs strided or oversized
buffers. Outputs live inside a larger buffer filled with a sentinel: a store that escapes its mask lands
there and is caught, without touching memory that is not ours. Sizes are tiny: the interpreter is slow.
"""
from __future__ import annotations


import pytest
import torch
import triton

from minillm.course.checks import assert_close, graded_seed, kernel_device, kernel_launcher

pytestmark = pytest.mark.filterwarnings("ignore")
SENTINEL = 12345.0
DEV = kernel_device()  # inputs are drawn on the CPU, then moved where the kernels run


def _launcher(fn, exercise_id: str, name: str):
    """The launcher `name` (as shipped) of the module that defines the kernel `fn` (the learner's or the solution's)."""
    return kernel_launcher(fn, exercise_id, name)


def _kernel(fn):
    return getattr(fn, "__wrapped__", fn)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(graded_seed(seed))


def _padded(rows: int, cols: int, pad: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a [rows, cols] view at the top-left of a sentinel-filled [rows + pad, cols + pad] buffer."""
    buf = torch.full((rows + pad, cols + pad), SENTINEL, device=DEV)
    return buf, buf[:rows, :cols]


def _untouched(buf: torch.Tensor, rows: int, cols: int, what: str) -> None:
    outside = buf.clone()
    outside[:rows, :cols] = SENTINEL
    bad = (outside != SENTINEL).nonzero()
    assert bad.numel() == 0, (f"{what}: wrote outside the [{rows}, {cols}] output, first at {tuple(bad[0].tolist())}"
                              " (a store without its mask)")


# ---- ch03.outer_add_kernel --------------------------------------------------------------------------

@pytest.mark.exercise("ch03.outer_add_kernel")
@pytest.mark.points(1)
@pytest.mark.parametrize("rows,cols", [(1, 1), (16, 16), (17, 33)], ids=str)
def test_outer_add_matches_formula(impl, rows, cols):
    g = gen(rows * 100 + cols)
    x, y = torch.randn(rows, generator=g), torch.randn(cols, generator=g)
    out = _launcher(impl, "ch03.outer_add_kernel", "outer_add")(x.to(DEV, copy=True), y.to(DEV, copy=True))
    assert_close(out, x[:, None] + y[None, :], f"outer_add of {rows} rows and {cols} columns (tiles of 16 x 16)")


@pytest.mark.exercise("ch03.outer_add_kernel")
@pytest.mark.points(2)
def test_outer_add_masks_and_strides(impl):
    g = gen(1)
    rows, cols = 19, 13
    x, y = torch.randn(rows, generator=g), torch.randn(cols, generator=g)
    buf, _ = _padded(cols, rows)  # OUT is the transpose of a [cols, rows] view: stride_om = 1, stride_on = row pitch
    out = buf[:cols, :rows].T
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 8))
    _kernel(impl)[grid](x.to(DEV), y.to(DEV), out, rows, cols, out.stride(0), out.stride(1), BLOCK_M=16, BLOCK_N=8)
    assert_close(out.contiguous(), x[:, None] + y[None, :], "outer_add into a transposed (strided) output")
    _untouched(buf, cols, rows, "outer_add with tiles of 16 x 8")


# ---- ch03.softmax_kernel ----------------------------------------------------------------------------

@pytest.mark.exercise("ch03.softmax_kernel")
@pytest.mark.points(1)
@pytest.mark.parametrize("rows,cols,scale", [(1, 1, 1.0), (3, 16, 1.0), (4, 17, 3.0), (2, 100, 60.0)], ids=str)
def test_softmax_matches_torch(impl, rows, cols, scale):
    x = torch.randn(rows, cols, generator=gen(rows + cols)) * scale  # scale 60: exp(score) overflows unless shifted
    out = _launcher(impl, "ch03.softmax_kernel", "softmax")(x.to(DEV, copy=True))
    assert_close(out, torch.softmax(x.double(), dim=-1).float(), f"softmax of [{rows}, {cols}] x {scale:g}")


@pytest.mark.exercise("ch03.softmax_kernel")
@pytest.mark.points(1)
def test_softmax_strided_rows_and_padding(impl, ref):
    rows, cols = 5, 23  # BLOCK 32: 9 padded lanes that must count for nothing and never be stored
    x_buf = (torch.randn(rows, 40, generator=gen(2)) * 5).to(DEV)  # row pitch 40: stride_x is not n_cols
    x = x_buf[:, :cols]
    buf, out = _padded(rows, cols)
    _kernel(impl)[(rows,)](x, out, x.stride(0), out.stride(0), cols, BLOCK=32)
    assert_close(out.clone(), torch.softmax(x.double(), -1).float(), "softmax of rows 40 apart, 23 columns")
    _untouched(buf, rows, cols, "softmax")
    assert_close(out.sum(-1), torch.ones(rows), "each row of a softmax sums to 1")


# ---- ch03.matmul_kernel -----------------------------------------------------------------------------

@pytest.mark.exercise("ch03.matmul_kernel")
@pytest.mark.points(1)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (16, 16, 16), (17, 33, 20), (40, 45, 24)], ids=str)
def test_matmul_matches_torch(impl, m, k, n):
    g = gen(m * 10000 + k * 100 + n)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    out = _launcher(impl, "ch03.matmul_kernel", "matmul")(a.to(DEV, copy=True), b.to(DEV, copy=True))
    assert_close(out, (a.double() @ b.double()).float(), f"matmul [{m}, {k}] @ [{k}, {n}] (blocks of 16)",
                 atol=1e-4, rtol=1e-4)  # a K-long fp32 sum in another order: room for a few roundings


@pytest.mark.exercise("ch03.matmul_kernel")
@pytest.mark.points(4)
def test_matmul_strided_operands(impl):
    g = gen(3)
    m, k, n = 20, 37, 18
    a = torch.randn(k, m, generator=g).to(DEV).T  # column-major A: stride_am = 1
    b = torch.randn(n, k, generator=g).to(DEV).T  # column-major B
    buf, c = _padded(m, n)
    grid = (triton.cdiv(m, 16), triton.cdiv(n, 16))
    _kernel(impl)[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                        c.stride(1), BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    assert_close(c.clone(), (a.double() @ b.double()).float(), "matmul of transposed (strided) A and B",
                 atol=1e-4, rtol=1e-4)
    _untouched(buf, m, n, "matmul")


@pytest.mark.exercise("ch03.matmul_kernel")
@pytest.mark.points(1)
@pytest.mark.parametrize("block_k", [16, 32], ids=lambda b: f"BLOCK_K={b}")
def test_matmul_k_tail_matches_solution(impl, ref, block_k):
    g = gen(4 + block_k)
    a, b = torch.randn(9, 50, generator=g), torch.randn(50, 30, generator=g)  # 50 = 3 x 16 + 2: a K tail
    a, b = a.to(DEV), b.to(DEV)
    got = _launcher(impl, "ch03.matmul_kernel", "matmul")(a.clone(), b.clone(), 16, 16, block_k)
    want = _launcher(ref, "ch03.matmul_kernel", "matmul")(a.clone(), b.clone(), 16, 16, block_k)
    assert_close(got, want, f"matmul with K = 50, BLOCK_K = {block_k}", atol=1e-4, rtol=1e-4)
