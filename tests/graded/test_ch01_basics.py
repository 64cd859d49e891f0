"""Graded tests of chapter 1: arithmetic intensity, RMSNorm, RoPE, top-k and top-p filters, sampling penalties.

Each test compares the implementation chosen by MINILLM_IMPL (fixture `impl`) with the solution (`ref`)
on seeded random inputs of awkward sizes, and checks properties that hold whatever the solution says.
Inputs are cloned for every call, so an implementation that writes into its input is caught, not
rewarded. Tolerances come from minillm.course.checks.TOLERANCES.
"""
from __future__ import annotations

import math

import pytest
import torch

from minillm.course.checks import assert_close, assert_equal, assert_scalar_close, assert_tensor
from minillm.course.checks import graded_seed, near_the_top_p_cut

pytestmark = pytest.mark.filterwarnings("ignore")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(graded_seed(seed))


# ---- ch01.arithmetic_intensity ----------------------------------------------------------------------

@pytest.mark.exercise("ch01.arithmetic_intensity")
@pytest.mark.points(1)
@pytest.mark.parametrize("m,n,k,b", [(1, 1, 1, 4), (1, 4096, 4096, 2), (512, 4096, 4096, 2), (7, 3, 5, 0.5)])
def test_arithmetic_intensity_matches_solution(impl, ref, m, n, k, b):
    assert_scalar_close(impl(m, n, k, b), ref(m, n, k, b), f"intensity(m={m}, n={n}, k={k}, bytes={b})")


@pytest.mark.exercise("ch01.arithmetic_intensity")
@pytest.mark.points(1)
def test_arithmetic_intensity_properties(impl):
    for n in (1, 3, 64, 1000):  # square GEMM: 2n^3 FLOPs over 3n^2 elements -> 2n / (3b)
        assert_scalar_close(impl(n, n, n, 2.0), 2 * n / 6, f"square n={n}, 2 bytes")
    half = impl(16, 2048, 576, 1.0)
    assert_scalar_close(half, 2 * impl(16, 2048, 576, 2.0), "halving bytes_per_element doubles the intensity")
    assert impl(1, 4096, 4096, 2) < impl(64, 4096, 4096, 2), "batching rows (larger m) must raise the intensity"


# ---- ch01.rms_norm ----------------------------------------------------------------------------------

@pytest.mark.exercise("ch01.rms_norm")
@pytest.mark.points(1)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 64), (17, 576)])
def test_rms_norm_matches_solution(impl, ref, shape):
    g = gen(sum(shape))
    x = torch.randn(shape, generator=g) * 3 + 1  # a non-zero mean: RMS is not the standard deviation
    w = torch.randn(shape[-1], generator=g)
    x_before = x.clone()
    out = impl(x, w, 1e-5)
    assert_close(out, ref(x.clone(), w.clone(), 1e-5), f"rms_norm{tuple(shape)}")
    assert_equal(x, x_before, "input x after the call (must not be modified)")


@pytest.mark.exercise("ch01.rms_norm")
@pytest.mark.points(2)
def test_rms_norm_bf16(impl, ref):
    g = gen(1)
    x = (torch.randn(5, 96, generator=g) * 4).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(torch.bfloat16)
    assert_close(impl(x, w, 1e-6), ref(x.clone(), w.clone(), 1e-6), "rms_norm bf16 [5, 96]")


@pytest.mark.exercise("ch01.rms_norm")
@pytest.mark.points(2)
def test_rms_norm_eps_matters(impl, ref):
    x = torch.zeros(3, 8)
    x[1] = 1e-3  # mean square 1e-6, far below eps = 1e-2: the output must shrink, not be renormalised to 1
    x[2] = torch.arange(8) - 3.5
    w = torch.ones(8)
    out = impl(x, w, 1e-2)
    assert_tensor(out, "rms_norm output", (3, 8), torch.float32)
    assert bool(torch.isfinite(out).all()), "an all-zero row must give zeros, not nan: did you forget eps?"
    assert_close(out, ref(x.clone(), w, 1e-2), "rms_norm with eps=1e-2 on zero, tiny and ramp rows")


@pytest.mark.exercise("ch01.rms_norm")
@pytest.mark.points(2)
def test_rms_norm_properties(impl):
    g = gen(2)
    x = torch.randn(6, 33, generator=g) + 2
    ones = torch.ones(33)
    y = impl(x, ones, 1e-12)
    rms = y.pow(2).mean(-1).sqrt()
    assert_close(rms, torch.ones(6), "root mean square of each output row (weight = 1)")
    assert_close(impl(7.5 * x, ones, 1e-12), y, "rms_norm(7.5 x) vs rms_norm(x): the norm is scale-invariant")
    w = torch.randn(33, generator=g)
    assert_close(impl(x, w, 1e-12), y * w, "rms_norm(x, w) vs rms_norm(x, 1) * w")


# ---- ch01.rope --------------------------------------------------------------------------------------

def rope_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


@pytest.mark.exercise("ch01.rope")
@pytest.mark.points(1)
@pytest.mark.parametrize("T,H,D", [(1, 1, 2), (5, 3, 64), (13, 9, 64), (4, 2, 10)])
def test_rope_matches_solution(impl, ref, T, H, D):
    g = gen(T * 100 + H * 10 + D)
    x = torch.randn(T, H, D, generator=g)
    cos, sin = rope_tables(torch.randint(0, 8192, (T,), generator=g), D)
    x_before = x.clone()
    out = impl(x, cos, sin)
    assert_close(out, ref(x.clone(), cos, sin), f"apply_rotary [T={T}, H={H}, D={D}]")
    assert_equal(x, x_before, "input x after the call (must not be modified)")


@pytest.mark.exercise("ch01.rope")
@pytest.mark.points(2)
def test_rope_bf16(impl, ref):
    g = gen(3)
    x = torch.randn(7, 3, 64, generator=g).to(torch.bfloat16)
    cos, sin = rope_tables(torch.arange(7) * 97, 64)
    assert_close(impl(x, cos, sin), ref(x.clone(), cos, sin), "apply_rotary bf16 [7, 3, 64]")


@pytest.mark.exercise("ch01.rope")
@pytest.mark.points(2)
def test_rope_known_rotations(impl):
    # D = 4: pairs are (channel 0, channel 2) and (channel 1, channel 3), NOT adjacent channels
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    quarter = torch.tensor([[math.pi / 2, math.pi]])  # pair 0 turns 90 degrees, pair 1 turns 180
    out = impl(x, quarter.cos(), quarter.sin())
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin): (1, 3) by 90 deg -> (-3, 1); (2, 4) by 180 deg -> (-2, -4)
    assert_close(out, torch.tensor([[[-3.0, -2.0, 1.0, -4.0]]]), "rotating [1, 2, 3, 4] by (90, 180) degrees")


@pytest.mark.exercise("ch01.rope")
@pytest.mark.points(2)
def test_rope_properties(impl):
    g = gen(4)
    T, H, D = 9, 4, 32
    x = torch.randn(T, H, D, generator=g)
    cos, sin = rope_tables(torch.arange(T), D)
    out = impl(x, cos, sin)
    assert_tensor(out, "apply_rotary output", (T, H, D), torch.float32)
    pair_norm = lambda t: t[..., : D // 2] ** 2 + t[..., D // 2:] ** 2  # noqa: E731
    assert_close(pair_norm(out), pair_norm(x), "|pair|^2 after rotation (a rotation preserves it)")
    assert_close(out[0], x[0], "token at position 0 (angle 0: unchanged)")
    # the point of RoPE: q.k depends on the distance between positions only
    q, k = torch.randn(1, 1, D, generator=g), torch.randn(1, 1, D, generator=g)
    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_tables(torch.tensor([pq]), D)
        ck, sk = rope_tables(torch.tensor([pk]), D)
        return (impl(q, cq, sq) * impl(k, ck, sk)).sum().reshape(1)
    assert_close(score(10, 3), score(107, 100), "q.k at positions (10, 3) vs (107, 100)", atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(10, 3), score(3, 3), atol=1e-4, rtol=1e-4), \
        "q.k is the same at distance 7 as at distance 0: the rotation must turn by position (out == x everywhere?)"


# ---- ch01.top_k_filter ------------------------------------------------------------------------------

@pytest.mark.exercise("ch01.top_k_filter")
@pytest.mark.points(1)
@pytest.mark.parametrize("B,V", [(3, 17), (4, 100), (2, 49152)])
def test_top_k_matches_solution(impl, ref, B, V):
    g = gen(B * 7 + V)
    logits = torch.randn(B, V, generator=g) * 3
    choices = torch.tensor([-1, 1, V, max(1, V // 3), max(1, V - 1)])
    top_k = choices[torch.randint(0, len(choices), (B,), generator=g)]
    before = logits.clone()
    out = impl(logits, top_k.clone())
    assert_close(out, ref(logits.clone(), top_k.clone()), f"top_k_filter [B={B}, V={V}], top_k={top_k.tolist()}")
    assert_equal(logits, before, "input logits after the call (must not be modified)")


@pytest.mark.exercise("ch01.top_k_filter")
@pytest.mark.points(4)
def test_top_k_properties(impl):
    g = gen(5)
    B, V = 6, 257
    logits = torch.randn(B, V, generator=g)
    top_k = torch.tensor([1, 2, 31, 256, 257, -1])
    out = impl(logits.clone(), top_k)
    assert_tensor(out, "top_k_filter output", (B, V), torch.float32)
    for row, k in enumerate(top_k.tolist()):
        kept = torch.isfinite(out[row])
        want = V if k == -1 else k
        assert int(kept.sum()) == want, f"row {row} (top_k={k}): kept {int(kept.sum())} tokens, expected {want}"
        assert torch.equal(out[row][kept], logits[row][kept]), f"row {row}: kept logits must keep their values"
        assert bool((out[row][~kept] == float("-inf")).all()), f"row {row}: removed logits must be -inf"
        if not kept.all():
            assert logits[row][kept].min() > logits[row][~kept].max(), f"row {row}: a removed logit beats a kept one"
    # a one-word vocabulary is left as it is (checked here, not on its own: returning the input would pass it)
    one = torch.randn(2, 1, generator=g)
    assert_close(impl(one.clone(), torch.tensor([1, -1])), one, "top_k_filter of a one-word vocabulary")


@pytest.mark.exercise("ch01.top_k_filter")
@pytest.mark.points(1)
def test_top_k_ties(impl):
    """Exactly k survive, ties broken by position (the lowest index first), as the docstring says."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0], [3, 1, 2, 2, 2, 0]])
    out = impl(logits.clone(), torch.tensor([2, 1, 2]))
    kept = torch.isfinite(out).tolist()
    want = [[False, True, True, False, False, False], [True, False, False, False, False, False],
            [True, False, True, False, False, False]]
    for row in range(3):
        assert kept[row] == want[row], (f"logits {logits[row].tolist()}, k={[2, 1, 2][row]}: kept {kept[row]}, "
                                        f"expected {want[row]} (exactly k; among ties the lowest index first)")


# ---- ch01.top_p_filter ------------------------------------------------------------------------------

@pytest.mark.exercise("ch01.top_p_filter")
@pytest.mark.points(1)
@pytest.mark.parametrize("B,V", [(3, 17), (5, 100), (2, 49152)])
def test_top_p_matches_solution(impl, ref, B, V):
    g = gen(B * 11 + V)
    logits = torch.randn(B, V, generator=g) * 2.5
    top_p = torch.tensor([0.05, 0.5, 0.9, 0.999, 1.0])[torch.randint(0, 5, (B,), generator=g)]
    before = logits.clone()
    out, want = impl(logits, top_p.clone()), ref(logits.clone(), top_p.clone())
    assert_tensor(out, "top_p_filter output", (B, V), torch.float32)
    # a token whose mass before it lies within fp32 summation error of top_p may fall either side of the cut,
    # depending only on the order of the sums (softmax then sort, or sort then softmax): not graded
    at_the_cut = near_the_top_p_cut(logits, top_p)
    assert_close(out.masked_fill(at_the_cut, 0.0), want.masked_fill(at_the_cut, 0.0),
                 f"top_p_filter [B={B}, V={V}], top_p={top_p.tolist()}")
    assert_equal(logits, before, "input logits after the call (must not be modified)")



@pytest.mark.exercise("ch01.top_p_filter")
@pytest.mark.points(3)
def test_top_p_known_example(impl):
    # probabilities 0.5, 0.3, 0.15, 0.05 at shuffled positions; thresholds kept clear of float boundaries
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().repeat(4, 1)
    out = impl(logits.clone(), torch.tensor([0.01, 0.75, 0.85, 1.0]))
    expect = [[False, True, False, False],  # the most likely token is always kept
              [False, True, False, True],  # 0.5 + 0.3 = 0.8 reaches 0.75: the crossing token (0.3) is kept
              [True, True, False, True],  # 0.95 reaches 0.85
              [True, True, True, True]]  # top_p = 1 keeps everything
    for row, p in enumerate([0.01, 0.75, 0.85, 1.0]):
        kept = torch.isfinite(out[row]).tolist()
        assert kept == expect[row], f"top_p={p} on probs {probs.tolist()}: kept {kept}, expected {expect[row]}"
    even = impl(torch.zeros(1, 4), torch.tensor([0.5]))  # 0.25 each, sums exact in fp32: the mass before token 2
    assert torch.isfinite(even).tolist() == [[True, True, False, False]], \
        f"top_p=0.5 on 4 equal tokens: kept {torch.isfinite(even).tolist()}; the third's mass before it (0.5) " \
        f"is not below top_p, so only two are kept"
    wide = torch.randn(2, 49152, generator=gen(49)) * 2.5  # fp32 cumulative sums reach 1.0 before the tail
    assert bool(torch.isfinite(impl(wide.clone(), torch.tensor([1.0, 1.0]))).all()), \
        "top_p=1 on 49,152 tokens (logits x 2.5): every token must be kept (1 keeps all with non-zero probability)"


@pytest.mark.exercise("ch01.top_p_filter")
@pytest.mark.points(3)
def test_top_p_properties(impl):
    g = gen(6)
    B, V = 8, 301
    logits = torch.randn(B, V, generator=g) * 2
    logits[:, :40] = float("-inf")  # a top-k filter ran first: those tokens have probability 0 already
    top_p = torch.rand(B, generator=g) * 0.9 + 0.05
    out = impl(logits.clone(), top_p)
    assert_tensor(out, "top_p_filter output", (B, V), torch.float32)
    probs = torch.softmax(logits, dim=-1)
    for row in range(B):
        kept = torch.isfinite(out[row])
        p = float(top_p[row])
        assert not kept[:40].any(), f"row {row}: a token that was already -inf came back"
        assert bool(kept[probs[row].argmax()]), f"row {row}: the most likely token must be kept"
        assert torch.equal(out[row][kept], logits[row][kept]), f"row {row}: kept logits must keep their values"
        mass = float(probs[row][kept].sum())
        smallest = float(probs[row][kept].min())
        assert mass >= p - 1e-6, f"row {row} (top_p={p:.3f}): kept mass {mass:.4f} does not reach top_p"
        assert mass - smallest < p + 1e-6, \
            f"row {row} (top_p={p:.3f}): kept mass {mass:.4f} reaches top_p even without its least likely token"
    # a one-word vocabulary is left as it is (checked here, not on its own: returning the input would pass it)
    one = torch.randn(2, 1, generator=g)
    assert_close(impl(one.clone(), torch.tensor([0.05, 1.0])), one, "top_p_filter of a one-word vocabulary")


# ---- ch01.apply_penalties ---------------------------------------------------------------------------

def _penalty_inputs(g: torch.Generator, R: int, V: int, L: int):
    """Random logits and histories: each row holds a prompt and an output (at least one token) of random lengths,
    then -1 padding (marked "output" too: padding must count for nothing whatever is_output says)."""
    logits = torch.randn(R, V, generator=g) * 3
    used = torch.randint(1, L + 1, (R,), generator=g)
    prompt = (used.float() * torch.rand(R, generator=g)).long()  # < used: every row has a generated token
    history = torch.randint(0, min(V, 12), (R, L), generator=g)  # a small range: tokens repeat, token 0 appears
    pos = torch.arange(L)
    history[pos >= used[:, None]] = -1
    is_output = pos >= prompt[:, None]
    presence = torch.rand(R, generator=g) * 4 - 2
    frequency = torch.rand(R, generator=g) * 4 - 2
    repetition = torch.rand(R, generator=g) * 1.5 + 0.5
    return logits, history, is_output, presence, frequency, repetition


@pytest.mark.exercise("ch01.apply_penalties")
@pytest.mark.points(1)
@pytest.mark.parametrize("R,V,L", [(1, 5, 2), (3, 17, 9), (4, 300, 40), (2, 49152, 64)])
def test_apply_penalties_matches_solution(impl, ref, R, V, L):
    inputs = _penalty_inputs(gen(R * 13 + V + L), R, V, L)
    before = [t.clone() for t in inputs]
    out = impl(*[t.clone() for t in inputs])
    assert_tensor(out, "apply_penalties output", (R, V), torch.float32)
    assert_close(out, ref(*[t.clone() for t in inputs]), f"apply_penalties [R={R}, V={V}, L={L}]")
    out = impl(*inputs)
    for name, t, b in zip(("logits", "history", "is_output"), inputs, before):
        assert_equal(t, b, f"input {name} after the call (must not be modified)")


@pytest.mark.exercise("ch01.apply_penalties")
@pytest.mark.points(3)
def test_apply_penalties_worked_example(impl):
    """Worked by hand, one rule per row: prompt vs output, a negative logit, padding, token 0."""
    logits = torch.tensor([[1.0, 4.0, -2.0, 3.0, -1.0, 0.5],
                           [0.3, -0.7, 1.1, 2.2, -3.3, 0.0],
                           [3.0, 1.0, -1.5, 0.0, 2.0, -6.0],
                           [0.0, 0.0, 0.0, 0.0, -2.0, 5.0]])
    history = torch.tensor([[1, 1, 2, 2, 3, -1], [-1] * 6, [0, -1, -1, -1, -1, -1], [4, 4, 5, -1, -1, -1]])
    is_output = torch.tensor([[False, False, True, True, True, True], [True] * 6, [True] * 6,
                              [False, False, True, True, True, True]])
    presence, frequency = torch.tensor([0.5, 2.0, 1.0, 0.0]), torch.tensor([0.25, 2.0, 0.5, 1.0])
    repetition = torch.tensor([2.0, 3.0, 1.5, 1.25])
    want = torch.tensor([[1.0, 2.0, -5.0, 0.75, -1.0, 0.5],  # 1: prompt only, /2; 2: -2*2 - 0.25*2 - 0.5; 3: 1.5 - 0.75
                         [0.3, -0.7, 1.1, 2.2, -3.3, 0.0],  # nothing but padding: unchanged
                         [0.5, 1.0, -1.5, 0.0, 2.0, -6.0],  # token 0 generated once: 3/1.5 - 0.5 - 1 (padding is no 0)
                         [0.0, 0.0, 0.0, 0.0, -2.5, 3.0]])  # 4 in the prompt: *1.25 and no frequency; 5: 5/1.25 - 1
    got = impl(logits.clone(), history, is_output, presence, frequency, repetition)
    for row, why in enumerate(("prompt vs output tokens, a negative logit", "a row of padding only",
                               "token 0 and -1 padding", "frequency counts generated tokens only")):
        assert_close(got[row], want[row], f"row {row} ({why})")


@pytest.mark.exercise("ch01.apply_penalties")
@pytest.mark.points(1)
def test_apply_penalties_properties(impl):
    g = gen(77)
    logits, history, is_output, *_ = _penalty_inputs(g, 5, 40, 20)
    R = logits.shape[0]
    zeros, ones = torch.zeros(R), torch.ones(R)
    assert_equal(impl(logits.clone(), history, is_output, zeros, zeros, ones), logits,
                 "penalties 0, 0 and 1 must leave the logits as they are")
    out = impl(logits.clone(), history, is_output, ones * 3.0, zeros, ones)
    generated = torch.zeros(R, 40, dtype=torch.bool)
    for r in range(R):
        for token, gen_ in zip(history[r].tolist(), is_output[r].tolist()):
            if token >= 0 and gen_:
                generated[r, token] = True
    assert_close(out[generated], logits[generated] - 3.0, "presence 3: every generated token's logit minus 3")
    assert_equal(out[~generated], logits[~generated], "presence 3: the other tokens unchanged")

