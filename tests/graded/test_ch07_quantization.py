"""Graded tests of chapter 7: RTN per group, FP8 with saturation, SmoothQuant's factor, GGUF Q4_1 and Q4_K blocks.

Inputs are fresh random tensors of awkward sizes (one group, one row, odd widths, 2 and 3 bits) from the release's
seed; answers are compared with the solution and checked against properties that hold for any correct answer.
The GGUF tests also use the `gguf` package's decoder as an oracle (the learner's code may not call it).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from minillm.course.checks import (assert_close, assert_equal, assert_rejects, assert_scalar_close,
                                   assert_tensor, graded_seed)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(graded_seed(seed))


def _weight(out_f: int, in_f: int, seed: int, outliers: bool = True) -> torch.Tensor:
    g = _gen(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    if outliers:  # a few large weights, as real layers have: per-group scales exist for them
        idx = torch.randint(0, out_f * in_f, (max(1, out_f * in_f // 50),), generator=g)
        w.view(-1)[idx] *= 20
    return w


# ------------------------------------------------------------------------------------------- quantize_per_group
QUANT_CASES = [(1, 8, 8, 4, False), (3, 96, 32, 4, False), (5, 33, -1, 8, True), (7, 160, 32, 3, True),
               (2, 64, 64, 2, False), (4, 40, 8, 4, False)]


def _check_grid(got, want, what: str) -> None:
    if not (isinstance(got, tuple) and len(got) == 3):
        raise AssertionError(f"{what}: expected a tuple (codes, scales, zeros), got {type(got).__name__}")
    assert_equal(got[0], want[0], f"{what}: codes")
    assert_close(got[1], want[1], f"{what}: scales")
    if want[2] is None:
        assert got[2] is None, f"{what}: the symmetric grid has no zero points (return None), got a tensor"
    else:
        assert_equal(got[2], want[2], f"{what}: zeros")


@pytest.mark.exercise("ch07.quantize_per_group")
@pytest.mark.points(1)
@pytest.mark.parametrize("out_f,in_f,group,bits,sym", QUANT_CASES, ids=str)
def test_quantize_per_group_matches_solution(impl, ref, out_f, in_f, group, bits, sym):
    w = _weight(out_f, in_f, seed=out_f * 1000 + in_f)
    what = f"W [{out_f}, {in_f}], {bits} bits, group {group}, {'symmetric' if sym else 'asymmetric'}"
    _check_grid(impl(w.clone(), bits, group, sym), ref(w.clone(), bits, group, sym), what)


@pytest.mark.exercise("ch07.quantize_per_group")
@pytest.mark.points(3)
def test_quantize_per_group_round_trip_and_ranges(impl, ref):
    w = _weight(6, 48, seed=11)
    w[0] = w[0].abs() + 0.01  # a row of all-positive groups and one of all-negative ones: the asymmetric range
    w[1] = -w[1].abs() - 0.01  # still includes 0 (lo = min(min w, 0)), so no weight is clipped
    for bits in (3, 4, 8):
        for sym in (False, True):
            codes, scales, zeros = impl(w.clone(), bits, 16, sym)
            what = f"{bits} bits, group 16, {'symmetric' if sym else 'asymmetric'}"
            assert_tensor(codes, f"{what}: codes", (6, 48), torch.int8 if sym else torch.uint8)
            assert_tensor(scales, f"{what}: scales", (6, 3), torch.float32)
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)
            c = codes.long()
            assert int(c.min()) >= lo and int(c.max()) <= hi, f"{what}: codes span [{int(c.min())}, {int(c.max())}], outside [{lo}, {hi}]"
            z = 0 if zeros is None else zeros.long().repeat_interleave(16, dim=1)
            w_hat = (c - z).float() * scales.repeat_interleave(16, dim=1)
            slack = scales.repeat_interleave(16, dim=1) * (0.5 + 1e-4)  # no weight clipped: within half a step
            bad = (w_hat - w).abs() > slack
            assert not bad.any(), (f"{what}: {int(bad.sum())} weights dequantize more than half a step away, "
                                   f"first at {tuple(bad.nonzero()[0].tolist())}")
    for sym in (False, True):  # an all-zero group: exact zeros, no nan
        what = f"W = zeros(2, 8), 4 bits, group 8, {'symmetric' if sym else 'asymmetric'}"
        codes, scales, zeros = impl(torch.zeros(2, 8), 4, 8, sym)
        assert torch.isfinite(scales).all() and (scales > 0).all(), \
            f"{what}: scales {scales.tolist()}; need a positive finite scale (clamp to tiny)"
        own_zero = torch.zeros(2, 8, dtype=torch.long) if sym else zeros.long().expand(2, 8)
        assert torch.equal(codes.long(), own_zero), \
            f"{what}: codes {codes[0].tolist()}; each code must be its group's zero point"
    # rounding as the docstring says: s = 1 puts w / s on exact halves (torch.round sends them to even); on the
    # second rows w / s and w * (1 / s) round to different codes
    sym_rows = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 7.0, 3.5, 0.0],
                             [0.1, 0.06428571790456772, -0.06428571790456772, 0.0, 0.0, 0.0, 0.0, 0.0]])
    asym_rows = torch.tensor([[-2.5, 12.5, 0.5, 1.5, 3.5, -0.5, 4.5, 0.0],  # s = 1, z = round(2.5) = 2
                              [-0.05, 0.1, 0.07500000298023224, 0.0, 0.0, 0.0, 0.0, 0.0]])  # s = fp32 0.15 / 15
    for rows, sym in ((sym_rows, True), (asym_rows, False)):
        _check_grid(impl(rows.clone(), 4, 8, sym), ref(rows, 4, 8, sym),
                    f"W = {rows.tolist()}, 4 bits, group 8, {'symmetric' if sym else 'asymmetric'} (round with "
                    f"torch.round: halves to even; divide w / s)")


@pytest.mark.exercise("ch07.quantize_per_group")
@pytest.mark.points(3)
def test_an_outlier_only_coarsens_its_own_group(impl):
    w = _weight(3, 64, seed=12, outliers=False)
    base = impl(w.clone(), 4, 16, False)
    spiked = w.clone()
    spiked[1, 5] = 3.0  # row 1, group 0
    codes, scales, zeros = impl(spiked, 4, 16, False)
    assert_tensor(scales, "scales", (3, 4), torch.float32)
    changed = (scales != base[1]).nonzero().tolist()
    assert changed == [[1, 0]], (f"an outlier at W[1, 5] (row 1, group 0 of 16 columns) changed the scales of "
                                 f"(row, group) {changed}; only [1, 0] may change")


@pytest.mark.exercise("ch07.quantize_per_group")
@pytest.mark.points(3)
def test_smaller_groups_quantize_better(impl):
    w = _weight(8, 128, seed=13)
    errs = {}
    for group in (-1, 64, 16):
        codes, scales, zeros = impl(w.clone(), 4, group, False)
        g = 128 if group == -1 else group
        w_hat = (codes.float() - zeros.float().repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)
        errs[group] = float((w_hat - w).pow(2).mean())
    assert errs[16] < errs[64] < errs[-1], f"mean squared error per group size should fall with the group: {errs}"


# ----------------------------------------------------------------------------------------- dequantize_per_group
def _random_grid(out_f: int, in_f: int, group: int, sym: bool, seed: int):
    g = _gen(seed)
    n_groups = 1 if group == -1 else in_f // group
    if sym:
        codes = torch.randint(-8, 8, (out_f, in_f), generator=g).to(torch.int8)
        zeros = None
    else:
        codes = torch.randint(0, 16, (out_f, in_f), generator=g).to(torch.uint8)
        zeros = torch.randint(0, 16, (out_f, n_groups), generator=g).to(torch.int32)
    scales = torch.rand(out_f, n_groups, generator=g) + 0.01
    return codes, scales, zeros


@pytest.mark.exercise("ch07.dequantize_per_group")
@pytest.mark.points(1)
@pytest.mark.parametrize("out_f,in_f,group,sym", [(1, 8, 8, False), (5, 96, 32, False), (3, 33, -1, True)], ids=str)
def test_dequantize_per_group_matches_solution(impl, ref, out_f, in_f, group, sym):
    codes, scales, zeros = _random_grid(out_f, in_f, group, sym, seed=out_f * 100 + in_f)
    args = (codes, scales, zeros, group)
    assert_close(impl(*[a.clone() if a is not None else None for a in args[:3]], group), ref(*args),
                 f"dequantize [{out_f}, {in_f}], group {group}")


@pytest.mark.exercise("ch07.dequantize_per_group")
@pytest.mark.points(2)
def test_dequantize_per_group_column_j_uses_group_j_div_g(impl):
    codes, scales, zeros = _random_grid(4, 48, 16, False, seed=21)
    got = impl(codes.clone(), scales.clone(), zeros.clone(), 16)
    want = torch.empty(4, 48)
    for r in range(4):
        for j in range(48):  # the definition, one weight at a time
            want[r, j] = (float(codes[r, j]) - float(zeros[r, j // 16])) * float(scales[r, j // 16])
    assert_close(got, want, "dequantize: W[r, j] = (codes[r, j] - zeros[r, j // 16]) * scales[r, j // 16]")


# ------------------------------------------------------------------------------------------------- fp8_scale
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _check_fp8(got, want, dtype, what: str) -> None:
    if not (isinstance(got, tuple) and len(got) == 2):
        raise AssertionError(f"{what}: expected a tuple (x8, scale), got {type(got).__name__}")
    assert_tensor(got[0], f"{what}: x8", tuple(want[0].shape), dtype)
    assert_equal(got[0].float(), want[0].float(), f"{what}: x8 (as fp32)")
    assert_close(got[1], want[1], f"{what}: scale")


@pytest.mark.exercise("ch07.fp8_scale")
@pytest.mark.points(1)
@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (3, 4, 17)], ids=str)
def test_fp8_dynamic_scale_matches_solution(impl, ref, shape):
    x = torch.randn(*shape, generator=_gen(sum(shape))) * 30
    amax = x.abs().amax(dim=-1, keepdim=True)
    _check_fp8(impl(x.clone(), amax.clone(), E4M3), ref(x, amax, E4M3), E4M3, f"e4m3, x {shape}, amax per row")


@pytest.mark.exercise("ch07.fp8_scale")
@pytest.mark.points(2)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3fn", "e5m2"])
def test_fp8_static_scale_saturates(impl, dtype):
    fp8_max = torch.finfo(dtype).max
    x = torch.randn(6, 40, generator=_gen(31)) * 10
    x[2, 3], x[4, 0] = 500.0, -1e4  # far beyond the calibrated range
    amax = torch.full((6, 1), 5.0)  # a static (calibrated) range smaller than this batch's values
    x8, scale = impl(x.clone(), amax, dtype)
    v = x8.float()
    assert torch.isfinite(v).all(), (f"{dtype}: values beyond amax became inf/nan: saturate them to +-{fp8_max:g} "
                                     "before the cast")
    assert float(v[2, 3]) == fp8_max and float(v[4, 0]) == -fp8_max, \
        f"{dtype}: x / scale beyond the range must become +-{fp8_max:g}, got {float(v[2, 3])}, {float(v[4, 0])}"
    assert_close(scale, amax / fp8_max, f"{dtype}: scale = amax / {fp8_max:g}")


@pytest.mark.exercise("ch07.fp8_scale")
@pytest.mark.points(1)
@pytest.mark.parametrize("shape", [(2, 9), (7, 64)], ids=str)
def test_fp8_e5m2_matches_solution(impl, ref, shape):
    x = torch.randn(*shape, generator=_gen(40 + shape[1])) * 1e3
    amax = x.abs().amax().reshape(1, 1)  # one scale for the whole tensor
    _check_fp8(impl(x.clone(), amax.clone(), E5M2), ref(x, amax, E5M2), E5M2, f"e5m2, x {shape}, per-tensor amax")


@pytest.mark.exercise("ch07.fp8_scale")
@pytest.mark.points(1)
def test_fp8_zero_range_gives_zeros_not_nan(impl):
    x = torch.randn(3, 8, generator=_gen(50))
    x[1] = 0.0
    x8, scale = impl(x.clone(), x.abs().amax(dim=-1, keepdim=True), E4M3)
    assert float(scale[1, 0]) > 0, f"amax = 0 must give a positive scale (clamp to float32's tiny), got {float(scale[1, 0])}"
    assert torch.equal(x8[1].float(), torch.zeros(8)), f"an all-zero row must give x8 = 0, got {x8[1].float().tolist()}"
    assert_close(x8.float() * scale, x, "x8 * scale ~ x (e4m3: 3 mantissa bits)", atol=0.0, rtol=0.0625)


# ----------------------------------------------------------------------------------------- smoothquant_scale
def _smooth_inputs(seed: int):
    g = _gen(seed)
    act = torch.rand(24, generator=g) * 2
    act[[3, 17]] = torch.tensor([60.0, 35.0])  # outlier channels
    act[9] = 0.0  # a channel never active
    weights = [torch.randn(16, 24, generator=g) * 0.1, torch.randn(8, 24, generator=g) * 0.1]
    weights[1][:, 5] *= 30  # only the second weight has a large column 5
    weights[0][:, 9] = 0.0
    weights[1][:, 9] = 0.0
    weights[0][2, 12] = 3e5  # a huge weight column: at alpha 0, 1 / max|W_j| falls below the result's clamp
    return act, weights


@pytest.mark.exercise("ch07.smoothquant_scale")
@pytest.mark.points(1)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85], ids=str)
def test_smoothquant_scale_matches_solution(impl, ref, alpha):
    act, weights = _smooth_inputs(60)
    got = impl(act.clone(), [w.clone() for w in weights], alpha)
    assert_close(got, ref(act, weights, alpha), f"smoothing factors, alpha {alpha}, weights [16, 24] and [8, 24]",
                 atol=1e-8, rtol=1e-5)  # relative: factors near the 1e-5 clamp are compared too


@pytest.mark.exercise("ch07.smoothquant_scale")
@pytest.mark.points(2)
def test_smoothquant_balances_activations_and_weights(impl):
    """At alpha = 0.5 the smoothed ranges meet: max|X_j / s_j| = max|W_j * s_j| = sqrt(max|X_j| max|W_j|)."""
    act, weights = _smooth_inputs(61)
    s = impl(act.clone(), [w.clone() for w in weights], 0.5)
    assert_tensor(s, "s", (24,), torch.float32)
    live = act > 0
    w_max = torch.cat(weights).abs().amax(dim=0)
    assert_close((act / s)[live], (w_max * s)[live], "max|X_j| / s_j against max|W_j| s_j at alpha 0.5 "
                 "(max over EVERY weight's rows)", atol=1e-6, rtol=1e-5)
    assert torch.isfinite(s).all() and (s > 0).all(), f"a dead channel must still get a finite s > 0, got {s[~live]}"
    s1 = impl(act.clone(), [w.clone() for w in weights], 1.0)
    assert_close(s1[live], act[live], "alpha = 1 moves everything: s = max|X_j|", atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ GGUF blocks
def _gguf_oracle(raw: torch.Tensor, qtype: QT) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(raw.numpy(), qtype).astype(np.float32)).reshape(-1)


def _random_blocks(n_blocks: int, block_bytes: int, fp16_fields: int, seed: int) -> torch.Tensor:
    """Random bytes with finite fp16 fields at the head of each block (any other byte pattern is a valid block)."""
    g = _gen(seed)
    raw = torch.randint(0, 256, (n_blocks, block_bytes), generator=g, dtype=torch.uint8)
    heads = (torch.randn(n_blocks, fp16_fields, generator=g) * 0.01).to(torch.float16)
    raw[:, :2 * fp16_fields] = heads.view(torch.uint8).reshape(n_blocks, -1)
    return raw.reshape(-1)


@pytest.mark.exercise("ch07.dequant_q4_1")
@pytest.mark.points(2)
@pytest.mark.parametrize("shape", [(1, 32), (3, 224)], ids=str)
def test_q4_1_matches_gguf_on_quantized_weights(impl, shape):
    w = torch.randn(*shape, generator=_gen(70 + shape[1])).numpy()
    raw = torch.from_numpy(gguf_quantize(w, QT.Q4_1).reshape(-1).copy())
    got = impl(raw.clone())
    assert_close(got, _gguf_oracle(raw, QT.Q4_1), f"Q4_1 of a {shape} weight, against the gguf package",
                 atol=1e-6, rtol=1e-6)


@pytest.mark.exercise("ch07.dequant_q4_1")
@pytest.mark.points(1)
@pytest.mark.parametrize("n_blocks", [1, 2, 13])
def test_q4_1_matches_solution_on_random_blocks(impl, ref, n_blocks):
    raw = _random_blocks(n_blocks, 20, 2, seed=80 + n_blocks)
    assert_close(impl(raw.clone()), ref(raw.clone()), f"Q4_1, {n_blocks} random blocks", atol=1e-6, rtol=1e-6)


@pytest.mark.exercise("ch07.dequant_q4_1")
@pytest.mark.points(3)
def test_q4_1_nibble_order(impl):
    block = torch.zeros(20, dtype=torch.uint8)
    block[0:2] = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)  # d = 1
    block[2:4] = torch.tensor([0.5], dtype=torch.float16).view(torch.uint8)  # m = 0.5
    block[4] = 0x93  # byte 0: element 0 in the low nibble (3), element 16 in the high one (9)
    block[5] = 0x0C  # byte 1: element 1 = 12, element 17 = 0
    got = impl(block.clone())
    want = torch.full((32,), 0.5)
    want[0], want[16], want[1] = 3.5, 9.5, 12.5
    assert_close(got, want, "Q4_1 block with d = 1, m = 0.5, bytes 0x93 0x0C (low nibble = element j, high = j + 16)")


@pytest.mark.exercise("ch07.dequant_q4_k")
@pytest.mark.points(3)
@pytest.mark.parametrize("n_blocks", [1, 3])
def test_q4_k_matches_gguf_on_random_blocks(impl, n_blocks):
    raw = _random_blocks(n_blocks, 144, 2, seed=90 + n_blocks)
    assert_close(impl(raw.clone()), _gguf_oracle(raw, QT.Q4_K), f"Q4_K, {n_blocks} random super-blocks, against "
                 "the gguf package", atol=1e-6, rtol=1e-6)


@pytest.mark.exercise("ch07.dequant_q4_k")
@pytest.mark.points(2)
def test_q4_k_matches_solution(impl, ref):
    raw = _random_blocks(5, 144, 2, seed=95)
    assert_close(impl(raw.clone()), ref(raw.clone()), "Q4_K, 5 random super-blocks", atol=1e-6, rtol=1e-6)


def _q4_k_block(scales: list[int], mins: list[int], nibble: int) -> torch.Tensor:
    """One super-block with d = 1, dmin = 1, the given 6-bit scales and mins, and every code = nibble."""
    b = [0] * 12
    for s in range(8):
        if s < 4:
            b[s] |= scales[s]
            b[s + 4] |= mins[s]
        else:
            b[s + 4] |= (scales[s] & 0xF) | ((mins[s] & 0xF) << 4)
            b[s - 4] |= (scales[s] >> 4) << 6
            b[s] |= (mins[s] >> 4) << 6
    head = torch.tensor([1.0, 1.0], dtype=torch.float16).view(torch.uint8)
    return torch.cat([head, torch.tensor(b, dtype=torch.uint8), torch.full((128,), nibble | nibble << 4,
                                                                            dtype=torch.uint8)])


@pytest.mark.exercise("ch07.dequant_q4_k")
@pytest.mark.points(5)
def test_q4_k_six_bit_scales_of_sub_blocks_4_to_7(impl):
    scales = [1, 2, 3, 4, 33, 50, 63, 17]  # sub-blocks 4-7 need their top two bits from bytes 0-3
    mins = [0, 5, 0, 7, 40, 1, 62, 20]
    got = impl(_q4_k_block(scales, mins, 2).clone())
    want = torch.tensor([2.0 * sc - mn for sc, mn in zip(scales, mins)]).repeat_interleave(32)
    assert_close(got, want, "Q4_K with d = dmin = 1, codes 2: sub-block s gives 2 * scale[s] - min[s]")


@pytest.mark.exercise("ch07.dequant_q4_k")
@pytest.mark.points(2)
def test_q4_k_sub_block_order(impl):
    block = _q4_k_block([1, 2, 3, 4, 5, 6, 7, 8], [0] * 8, 0)
    block[16 + 32:16 + 64] = 0x5A  # chunk 1 (bytes 32-63): sub-block 2 gets 10 (low nibbles), sub-block 3 gets 5
    got = impl(block.clone()).reshape(8, 32)
    want = torch.zeros(8, 32)
    want[2], want[3] = 3.0 * 10, 4.0 * 5
    assert_close(got, want, "Q4_K: chunk c of 32 bytes holds sub-block 2c (low nibbles) and 2c + 1 (high nibbles)")


# ---- ch07.quantized_weight_bytes ---------------------------------------------------------------------

@pytest.mark.exercise("ch07.quantized_weight_bytes")
@pytest.mark.points(2)
def test_quantized_weight_bytes_matches_solution(impl, ref):
    g = _gen(701)
    cases = [(70.6e9, 4, 128, 16, 4), (8.03e9, 8, 4096, 16, 0), (1.0, 4, 1, 16, 4), (135e6, 3, 64, 16, 4)]
    for _ in range(10):
        n, bits, group, scale, zero = (float(torch.randint(1, 10**6, (1,), generator=g)) * 1e3,
                                       int(torch.randint(1, 9, (1,), generator=g)),
                                       int(2 ** torch.randint(0, 9, (1,), generator=g)),
                                       int(torch.tensor([8, 16, 32])[torch.randint(0, 3, (1,), generator=g)]),
                                       int(torch.tensor([0, 4, 8])[torch.randint(0, 3, (1,), generator=g)]))
        cases.append((n, bits, group, scale, zero))
    for args in cases:
        assert_scalar_close(impl(*args), ref(*args), f"quantized_weight_bytes{args!r}", rtol=1e-9)


@pytest.mark.exercise("ch07.quantized_weight_bytes")
@pytest.mark.points(2)
def test_quantized_weight_bytes_counts_what_a_layer_stores(impl):
    """Count the storage of real per-group layouts: a [out, in] layer keeps out x in codes of `bits` bits, and per
    group one scale and (asymmetric) one zero point; the function, given the layer's parameter count, must say
    the same bytes."""
    for out_f, in_f, bits, group, zero_bits in [(576, 576, 4, 64, 4), (1536, 576, 3, 64, 4), (4096, 14336, 4, 128, 0),
                                               (64, 96, 8, 32, 8), (7, 12, 2, 4, 2)]:
        codes = torch.empty(out_f, in_f)
        scales = torch.empty(out_f, in_f // group)
        zeros = torch.empty(out_f, in_f // group) if zero_bits else torch.empty(0)
        stored_bits = codes.numel() * bits + scales.numel() * 16 + zeros.numel() * zero_bits
        got = impl(float(out_f * in_f), bits, group, 16, zero_bits)
        assert_scalar_close(got, stored_bits / 8, f"a [{out_f}, {in_f}] layer in {bits}-bit g{group} with "
                                                  f"{zero_bits}-bit zeros: quantized_weight_bytes", rtol=1e-9)


@pytest.mark.exercise("ch07.quantized_weight_bytes")
@pytest.mark.points(1)
def test_quantized_weight_bytes_rejects_bad_input(impl, ref):
    valid = (70.6e9, 4, 128, 16, 4)
    assert_rejects(impl, valid, ref(*valid), [(0.0, 4, 128, 16, 4), (1e9, 0, 128, 16, 4), (1e9, 4, 0, 16, 4),
                                              (1e9, 4, 128, -16, 4), (1e9, 4, 128, 16, -1), (1e9, 4.5, 128, 16, 4)],
                   "quantized_weight_bytes")
