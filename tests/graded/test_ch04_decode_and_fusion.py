"""Graded tests of chapter 4: the log-sum-exp merge of split-KV partials, and a fused RMSNorm Triton kernel.

The kernel exercise cannot be called from Python: its tests run it through `rms_norm`, the launcher that
sits next to it in the chapter module (learner's or solution's), under Triton's interpreter on small sizes.
"""
from __future__ import annotations

import pytest
import torch

from minillm.course.checks import assert_close, assert_tensor, graded_seed, kernel_device, kernel_launcher


def _partial(q, k, v):
    """Attention of q [T, H, D] over keys k, v [S, H, D] alone: (out [T, H, D], lse [H, T]); no keys -> 0, -inf."""
    s = torch.einsum("thd,shd->hts", q.double(), k.double())
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.full((q.shape[1], q.shape[0]), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("hts,shd->thd", torch.softmax(s, dim=-1), v.double())
    return out.to(q.dtype), lse.float()


def _qkv(t, s, h, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(graded_seed(seed))
    return (torch.randn(t, h, d, generator=g) * scale, torch.randn(s, h, d, generator=g),
            torch.randn(s, h, d, generator=g))


# ---------------------------------------------------------------------------------------------- merge_lse
@pytest.mark.exercise("ch04.merge_lse")
@pytest.mark.points(1)
@pytest.mark.parametrize("t,s,h,d,split", [(1, 2, 1, 1, 1), (3, 17, 2, 8, 16), (5, 33, 3, 24, 5), (2, 40, 4, 16, 39)])
def test_merge_of_two_halves_is_full_attention(impl, t, s, h, d, split):
    q, k, v = _qkv(t, s, h, d, seed=s * 10 + split, scale=3.0)
    out_a, lse_a = _partial(q, k[:split], v[:split])
    out_b, lse_b = _partial(q, k[split:], v[split:])
    out, lse = impl(out_a.clone(), lse_a.clone(), out_b.clone(), lse_b.clone())
    want_out, want_lse = _partial(q, k, v)
    assert_close(out, want_out, f"merged out (T={t}, keys {split} + {s - split})", atol=1e-5, rtol=1e-4)
    assert_close(lse, want_lse, f"merged lse (T={t}, keys {split} + {s - split})", atol=1e-5, rtol=1e-5)


@pytest.mark.exercise("ch04.merge_lse")
@pytest.mark.points(2)
def test_merge_matches_solution_and_is_symmetric(impl, ref):
    q, k, v = _qkv(7, 30, 3, 10, seed=1)
    a, b = _partial(q, k[:11], v[:11]), _partial(q, k[11:], v[11:])
    got = impl(a[0].clone(), a[1].clone(), b[0].clone(), b[1].clone())
    want = ref(a[0].clone(), a[1].clone(), b[0].clone(), b[1].clone())
    swapped = impl(b[0].clone(), b[1].clone(), a[0].clone(), a[1].clone())
    for result in (got, swapped):  # (zip over anything shorter would check nothing)
        assert isinstance(result, (tuple, list)) and len(result) == 2, \
            f"merge_lse must return the pair (out, lse), got {type(result).__name__}: {result!r:.60}"
    for name, x, y, z in zip(("out", "lse"), got, want, swapped):
        assert_close(x, y, f"merge_lse {name}")
        assert_close(z, y, f"merge_lse {name} with the two sides swapped", atol=1e-6, rtol=1e-5)


@pytest.mark.exercise("ch04.merge_lse")
@pytest.mark.points(2)
def test_merge_empty_sides(impl):
    q, k, v = _qkv(4, 9, 2, 8, seed=2)
    out_a, lse_a = _partial(q, k, v)
    out_e, lse_e = torch.zeros_like(out_a), torch.full_like(lse_a, float("-inf"))
    out, lse = impl(out_a.clone(), lse_a.clone(), out_e.clone(), lse_e.clone())
    assert_close(out, out_a, "merge with an empty side B (lse_b = -inf) must return side A", atol=1e-6, rtol=1e-6)
    assert_close(lse, lse_a, "lse of a merge with an empty side B", atol=1e-6, rtol=1e-6)
    out, lse = impl(out_e.clone(), lse_e.clone(), out_e.clone(), lse_e.clone())
    assert not torch.isnan(out).any(), "merging two empty sides must give out = 0, not nan"
    assert_close(out, out_e, "merge of two empty sides: out")
    assert_close(lse, lse_e, "merge of two empty sides: lse")


@pytest.mark.exercise("ch04.merge_lse")
@pytest.mark.points(1)
def test_merge_large_lse_does_not_overflow(impl):
    g = torch.Generator().manual_seed(graded_seed(5))
    out_a, out_b = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    lse_a = torch.full((2, 3), 1000.0)  # exp(1000) is inf in fp32 and fp64
    lse_b = lse_a + torch.log(torch.tensor(3.0))  # side B holds 3x the mass of side A
    out, lse = impl(out_a, lse_a, out_b, lse_b)
    assert_close(lse, lse_a + torch.log(torch.tensor(4.0)), "lse of partials with lse = 1000 (no overflow)", rtol=1e-6)
    assert_close(out, 0.25 * out_a + 0.75 * out_b, "out of partials with lse = 1000 (weights 1/4, 3/4)",
                 atol=2e-4, rtol=2e-4)  # fp32 holds 1000 + log 3 to ~6e-5 only


@pytest.mark.exercise("ch04.merge_lse")
@pytest.mark.points(1)
def test_merge_dtypes(impl):
    q, k, v = _qkv(3, 12, 2, 8, seed=3)
    a, b = _partial(q, k[:5], v[:5]), _partial(q, k[5:], v[5:])
    for dtype in (torch.float32, torch.bfloat16):
        out, lse = impl(a[0].to(dtype), a[1].clone(), b[0].to(dtype), b[1].clone())
        assert_tensor(out, f"out from {dtype} partials", (3, 2, 8), dtype)
        assert_tensor(lse, f"lse from {dtype} partials", (2, 3), torch.float32)
        assert_close(out, _partial(q, k, v)[0].to(dtype), f"merged out in {dtype}")


# ---------------------------------------------------------------------------------------- rms_norm_kernel
def _launcher(fn):
    """`rms_norm` (as shipped) of the module that defines `fn` (the learner's or the solution's)."""
    return kernel_launcher(fn, "ch04.rms_norm_kernel", "rms_norm")


def _on_kernel_device(*tensors):
    """Copies of the CPU-drawn inputs where the kernels run (the GPU when Triton compiles, else the CPU)."""
    return tuple(t.to(kernel_device(), copy=True) for t in tensors)


def _rms_norm(h, w, eps):
    h = h.double()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()).float()


@pytest.mark.exercise("ch04.rms_norm_kernel")
@pytest.mark.points(2)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (4, 64), (2, 3, 100)], ids=str)
def test_rms_norm_kernel_matches_formula(impl, shape):
    g = torch.Generator().manual_seed(graded_seed(sum(shape)))
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    out = _launcher(impl)(*_on_kernel_device(x, w), 1e-6)
    assert_close(out, _rms_norm(x, w, 1e-6), f"rms_norm of x {shape} (hidden {shape[-1]}: padded to a power of two)")


@pytest.mark.exercise("ch04.rms_norm_kernel")
@pytest.mark.points(1)
@pytest.mark.parametrize("shape", [(1, 16), (5, 33)], ids=str)
def test_rms_norm_kernel_fused_residual(impl, shape):
    g = torch.Generator().manual_seed(graded_seed(shape[1]))
    x, res, w = (torch.randn(*shape, generator=g), torch.randn(*shape, generator=g), torch.randn(shape[1], generator=g))
    xd, wd, rd = _on_kernel_device(x, w, res)
    out, new_res = _launcher(impl)(xd, wd, 1e-5, rd)
    assert_close(new_res, x + res, f"the new residual stream x + residual ({shape})")
    assert_close(out, _rms_norm(x + res, w, 1e-5), f"rms_norm(x + residual) ({shape})")


@pytest.mark.exercise("ch04.rms_norm_kernel")
@pytest.mark.points(2)
def test_rms_norm_kernel_row_strides(impl):
    """x and the residual as row slices of wider tensors: each of X, RES, OUT and RES_OUT steps by its own row
    stride (40 for x, 48 for the residual, 24 for the outputs the launcher allocates)."""
    g = torch.Generator().manual_seed(graded_seed(40))
    wide_x, wide_r, w = torch.randn(3, 40, generator=g), torch.randn(3, 48, generator=g), torch.randn(24, generator=g)
    xd, rd, wd = _on_kernel_device(wide_x, wide_r, w)
    x, res = xd[:, 8:32], rd[:, :24]  # strides (40, 1) and (48, 1): the launcher passes them on
    out = _launcher(impl)(x, wd, 1e-5)
    assert_close(out, _rms_norm(wide_x[:, 8:32], w, 1e-5), "rms_norm of x with row stride 40 (hidden 24)")
    out, new_res = _launcher(impl)(x, wd, 1e-5, res)
    h = wide_x[:, 8:32] + wide_r[:, :24]
    assert_close(new_res, h, "the new residual stream, x and residual with row strides 40 and 48 (outputs: 24)")
    assert_close(out, _rms_norm(h, w, 1e-5), "rms_norm(x + residual), x and residual with row strides 40 and 48")


@pytest.mark.exercise("ch04.rms_norm_kernel")
@pytest.mark.points(3)
def test_rms_norm_kernel_eps_and_solution(impl, ref):
    g = torch.Generator().manual_seed(graded_seed(9))
    x, w = torch.randn(6, 48, generator=g) * 1e-3, torch.rand(48, generator=g) + 0.5  # mean(x^2) ~ eps: eps matters
    got, want = _launcher(impl)(*_on_kernel_device(x, w), 1e-6), _launcher(ref)(*_on_kernel_device(x, w), 1e-6)
    assert_close(got, want, "rms_norm of tiny inputs, eps = 1e-6 (eps inside the square root)")
    assert_close(got, _rms_norm(x, w, 1e-6), "rms_norm of tiny inputs against the formula")
