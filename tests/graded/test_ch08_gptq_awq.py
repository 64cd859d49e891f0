"""Graded tests of chapter 8: GPTQ's column update, AWQ's scale step and the INT4 GEMM's unpack (a Triton helper).

The GPTQ and AWQ answers are also run inside the engine's gptq_quantize / search_scales (through
minillm.hooks.overriding): a correct update must make GPTQ beat round-to-nearest on correlated inputs. The kernel
exercise runs through `launch_int4_gemm`, the launcher next to it in the chapter module, under Triton's
interpreter on small sizes, against a plain-torch dequantization.
"""
from __future__ import annotations


import pytest
import torch

from minillm.course.checks import assert_close, assert_tensor, graded_seed, kernel_device, kernel_launcher
from minillm.hooks import overriding
from minillm.kernels.int4_layout import dequantize_int4, pack_int4_along_k, repack_int4
from minillm.quant.awq import search_scales
from minillm.quant.gptq import HessianAccumulator, gptq_quantize
from minillm.quant.rtn import quantize


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(graded_seed(seed))


# --------------------------------------------------------------------------------------- gptq_column_update
def _block(out_f: int, b: int, seed: int):
    """A block W1 [out, b] and an upper-triangular U1 [b, b] with a positive diagonal, as the Cholesky factor is."""
    g = _gen(seed)
    w1 = torch.randn(out_f, b, generator=g)
    a = torch.randn(b, b, generator=g)
    u1 = torch.linalg.cholesky(a @ a.T + b * torch.eye(b), upper=True)
    return w1, u1


def _round_column(w: torch.Tensor) -> torch.Tensor:
    return torch.round(w * 4) / 4  # any grid will do: a step of 1/4


@pytest.mark.exercise("ch08.gptq_column_update")
@pytest.mark.points(1)
@pytest.mark.parametrize("out_f,b,i", [(1, 1, 0), (5, 7, 0), (6, 33, 17), (3, 16, 15)], ids=str)
def test_gptq_column_update_matches_solution(impl, ref, out_f, b, i):
    w1, u1 = _block(out_f, b, seed=out_f * 100 + b)
    q = _round_column(w1[:, i])
    got_w, want_w = w1.clone(), w1.clone()
    err = impl(got_w, u1.clone(), i, q.clone())
    want_err = ref(want_w, u1.clone(), i, q.clone())
    assert_close(err, want_err, f"err returned for column {i} of a [{out_f}, {b}] block")
    assert_close(got_w, want_w, f"W1 after the update of column {i} (in place) of a [{out_f}, {b}] block")


@pytest.mark.exercise("ch08.gptq_column_update")
@pytest.mark.points(1)
def test_gptq_column_update_touches_only_later_columns(impl):
    w1, u1 = _block(4, 12, seed=5)
    i = 5
    q = _round_column(w1[:, i])
    before = w1.clone()
    err = impl(w1, u1, i, q)
    assert_tensor(err, "err", (4,), torch.float32)
    assert torch.equal(w1[:, :i], before[:, :i]), "columns before i are already quantized: they must not change"
    assert_close(w1[:, i], q, f"column {i} must land exactly on its quantized value q", atol=1e-6, rtol=1e-6)
    assert not torch.allclose(w1[:, i + 1:], before[:, i + 1:]), "the columns after i must absorb the error"


def _correlated_layer(seed: int, out_f: int = 24, in_f: int = 64, n: int = 512):
    g = _gen(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)  # correlated input channels
    x = torch.randn(n, in_f, generator=g) @ mix
    return torch.randn(out_f, in_f, generator=g) * 0.1, x


@pytest.mark.exercise("ch08.gptq_column_update")
@pytest.mark.points(5)
def test_gptq_with_your_update_beats_rtn(impl):
    weight, x = _correlated_layer(7)
    acc = HessianAccumulator(x.shape[1])
    acc.add(x)
    with overriding({"ch08.gptq_column_update": impl}):
        res = gptq_quantize(weight, acc.H, bits=3, group_size=16, block_size=32)
    reference = gptq_quantize(weight, acc.H, bits=3, group_size=16, block_size=32)
    rtn = quantize(weight, bits=3, group_size=16).dequantize()

    def out_err(w):
        return float((x @ (w - weight).T).pow(2).mean())

    ours, theirs, base = out_err(res.weight_dq), out_err(reference.weight_dq), out_err(rtn)
    assert ours < 0.9 * base, (f"GPTQ with your update: output error {ours:.4g}, round-to-nearest {base:.4g}; "
                               "the error feedback should win clearly on correlated inputs")
    assert abs(ours - theirs) <= 1e-3 * theirs, f"output error {ours:.6g}, the solution's {theirs:.6g}"


# ------------------------------------------------------------------------------------------- awq_scale_step
def _awq_inputs(seed: int, n: int = 40, in_f: int = 24):
    g = _gen(seed)
    x = torch.randn(n, in_f, generator=g)
    x[:, [2, 11]] *= 25  # salient channels
    weights = [torch.randn(16, in_f, generator=g) * 0.1, torch.randn(8, in_f, generator=g) * 0.1]
    return x, weights, x.abs().mean(dim=0)


def _check_step(got, want, what: str) -> None:
    if not (isinstance(got, tuple) and len(got) == 3 and isinstance(got[2], (list, tuple))):
        raise AssertionError(f"{what}: expected (s, x / s, [W * s, ...]), got {type(got).__name__}")
    assert_close(got[0], want[0], f"{what}: s")
    assert_close(got[1], want[1], f"{what}: x / s")
    assert len(got[2]) == len(want[2]), f"{what}: {len(got[2])} scaled weights for {len(want[2])} weights"
    for k, (a, b) in enumerate(zip(got[2], want[2])):
        assert_close(a, b, f"{what}: weight {k} * s")


@pytest.mark.exercise("ch08.awq_scale_step")
@pytest.mark.points(1)
@pytest.mark.parametrize("alpha", [0.0, 0.35, 0.9], ids=str)
def test_awq_scale_step_matches_solution(impl, ref, alpha):
    x, weights, s_x = _awq_inputs(11)
    got = impl(x.clone(), [w.clone() for w in weights], s_x.clone(), alpha)
    _check_step(got, ref(x, weights, s_x, alpha), f"alpha {alpha}")


@pytest.mark.exercise("ch08.awq_scale_step")
@pytest.mark.points(3)
def test_awq_scale_step_keeps_the_product_and_centres_the_scales(impl):
    x, weights, s_x = _awq_inputs(12, n=9, in_f=40)
    s, xs, scaled = impl(x.clone(), [w.clone() for w in weights], s_x.clone(), 0.6)
    assert_tensor(s, "s", (40,), torch.float32)
    for k, (w, ws) in enumerate(zip(weights, scaled)):
        assert_close(xs @ ws.T, x @ w.T, f"(x / s) (W * s)^T must equal x W^T (weight {k})", atol=1e-5, rtol=1e-4)
    assert abs(float(s.max() * s.min()) - 1.0) < 1e-5, f"scales must be centred: max(s) * min(s) = 1, got {float(s.max() * s.min()):.6g}"
    assert int(s.argmax()) in (2, 11), (f"alpha 0.6: the largest scale is on channel {int(s.argmax())}; the most "
                                        "active channels (largest s_x) are 2 and 11 and must get it")
    s0 = impl(x.clone(), [w.clone() for w in weights], s_x.clone(), 0.0)[0]
    assert_close(s0, torch.ones(40), "alpha = 0 must give s = 1 everywhere")


@pytest.mark.exercise("ch08.awq_scale_step")
@pytest.mark.points(4)
def test_awq_search_with_your_step(impl):
    x, weights, _ = _awq_inputs(13, n=64, in_f=32)
    with overriding({"ch08.awq_scale_step": impl}):
        s, alpha, errors = search_scales(weights, x, bits=3, group_size=16, n_grid=10)
    want_s, want_alpha, want_errors = search_scales(weights, x, bits=3, group_size=16, n_grid=10)
    assert alpha == want_alpha, f"the search chose alpha {alpha}, the solution's search {want_alpha} (errors {errors})"
    assert_close(torch.tensor(errors), torch.tensor(want_errors), "the block output error of every alpha",
                 atol=1e-7, rtol=1e-4)
    assert_close(s, want_s, "the chosen scales")
    assert min(errors) < errors[0], "scaling the salient channels must beat alpha = 0 (plain RTN) here"


# --------------------------------------------------------------------------------------- int4_unpack_kernel
def _launcher(fn):
    """`launch_int4_gemm` (as shipped, with the GEMM kernel around `fn`) of the module that defines `fn`."""
    return kernel_launcher(fn, "ch08.int4_unpack_kernel", "launch_int4_gemm", given=("_int4_gemm_kernel", "_load_tile"))


def _int4_layer(n: int, k: int, group: int, symmetric: bool, seed: int):
    g = _gen(seed)
    iw = repack_int4(quantize(torch.randn(n, k, generator=g), bits=4, group_size=group, symmetric=symmetric),
                     torch.float32)
    dev = kernel_device()  # the GPU when Triton compiles, else the CPU
    return iw.qweight.to(dev), iw.scales.to(dev), None if iw.qzeros is None else iw.qzeros.to(dev)


@pytest.mark.exercise("ch08.int4_unpack_kernel")
@pytest.mark.points(2)
@pytest.mark.parametrize("m,n,k,group", [(1, 32, 64, 32), (3, 40, 96, 32), (2, 24, 64, -1)], ids=str)
def test_int4_gemm_asymmetric(impl, m, n, k, group):
    qweight, scales, qzeros = _int4_layer(n, k, group, symmetric=False, seed=m * 1000 + n + k)
    x = torch.randn(m, k, generator=_gen(m + n + k))
    y = _launcher(impl)(x.to(kernel_device()), qweight, scales, qzeros, group)
    want = x @ dequantize_int4(qweight, scales, qzeros, group).cpu().T
    assert_close(y, want, f"y = x W^T with 4-bit W [{n}, {k}], group {group}, zero points", atol=1e-4, rtol=1e-4)


@pytest.mark.exercise("ch08.int4_unpack_kernel")
@pytest.mark.points(4)
def test_int4_gemm_symmetric_tensor_core_path(impl):
    qweight, scales, _ = _int4_layer(32, 128, 64, symmetric=True, seed=21)
    x = torch.randn(17, 128, generator=_gen(22))  # 17 rows: two row tiles of 16, the second almost empty
    y = _launcher(impl)(x.to(kernel_device()), qweight, scales, None, 64, use_dot=True)
    want = x @ dequantize_int4(qweight, scales, None, 64).cpu().T
    assert_close(y, want, "symmetric 4-bit (zero point 8), tl.dot path, 17 rows", atol=1e-4, rtol=1e-4)


@pytest.mark.exercise("ch08.int4_unpack_kernel")
@pytest.mark.points(5)
def test_int4_unpack_is_exact_for_every_nibble(impl):
    """One-hot rows of x read single columns of W: every code of every nibble position comes back exactly."""
    n, k = 32, 64
    codes = torch.randint(0, 16, (n, k), generator=_gen(23), dtype=torch.int32)
    zeros = torch.randint(0, 16, (1, n), generator=_gen(24), dtype=torch.int32)
    qzeros = pack_int4_along_k(zeros).t().contiguous()  # [1, n // 8]
    scales = torch.ones(1, n)
    y = _launcher(impl)(*(t.to(kernel_device()) for t in (torch.eye(k), pack_int4_along_k(codes), scales, qzeros)), -1,
                        use_dot=True)
    want = (codes - zeros.t()).float().t()  # row j of y is column j of W: codes[:, j] - zero
    assert_close(y, want, "y = I_K @ W^T: W[n, 8j + i] = code - zero, exactly (nibble i of word j holds column 8j + i)",
                 atol=0.0, rtol=0.0)


# --------------------------------------------------------------------------------------------- two_four_mask
@pytest.mark.exercise("ch08.two_four_mask")
@pytest.mark.points(1)
@pytest.mark.parametrize("shape,n,m", [((1, 4), 2, 4), ((3, 8), 2, 4), ((5, 12), 2, 4), ((2, 16), 4, 8),
                                       ((4, 6), 1, 3)], ids=str)
def test_nm_mask_matches_solution(impl, ref, shape, n, m):
    scores = torch.rand(*shape, generator=_gen(shape[0] * 100 + shape[1] + n))
    got = impl(scores.clone(), n, m)
    assert_tensor(got, f"{n}:{m} mask of scores {shape}", shape, torch.bool)
    want = ref(scores, n, m)
    bad = (got != want).nonzero()
    assert not len(bad), f"{n}:{m} mask of scores {shape}: {len(bad)} entries differ, first at {tuple(bad[0].tolist())}"


@pytest.mark.exercise("ch08.two_four_mask")
@pytest.mark.points(3)
def test_nm_mask_keeps_the_n_best_of_every_group(impl):
    signed = torch.randn(3, 5, 24, generator=_gen(31))  # 3-D: groups run along the last dim only; scores, not sizes
    ties = torch.randint(0, 3, (3, 5, 24), generator=_gen(33)).float()  # many equal scores: any n of them, but n
    for scores, what in ((signed, "signed scores"), (ties, "scores with ties")):
        mask = impl(scores.clone(), 2, 4)
        assert_tensor(mask, f"2:4 mask of {what} [3, 5, 24]", (3, 5, 24), torch.bool)
        kept = mask.reshape(3, 5, 6, 4).sum(-1)
        assert (kept == 2).all(), (f"{what}: every group of 4 must keep exactly 2, got counts "
                                   f"{sorted(set(kept.flatten().tolist()))}")
        g = scores.reshape(3, 5, 6, 4)
        km = mask.reshape(3, 5, 6, 4)
        lowest_kept = torch.where(km, g, torch.full_like(g, float("inf"))).amin(-1)
        highest_dropped = torch.where(km, torch.full_like(g, float("-inf")), g).amax(-1)
        assert (lowest_kept >= highest_dropped).all(), \
            f"{what}: a dropped score is larger than a kept one in the same group (rank by score, not |score|)"


@pytest.mark.exercise("ch08.two_four_mask")
@pytest.mark.points(2)
def test_nm_mask_prunes_half_of_a_layer(impl):
    weight = torch.randn(16, 64, generator=_gen(32))
    mask = impl(weight.abs(), 2, 4)
    pruned = weight * mask
    assert float(mask.float().mean()) == 0.5, f"2:4 keeps half the weights, got {float(mask.float().mean()):.3f}"
    best = weight.abs().reshape(16, 16, 4).sort(-1, descending=True).values[..., :2].sum()
    assert abs(float(pruned.abs().sum()) - float(best)) < 1e-5 * float(best), "the mask must keep the largest magnitudes"
