"""Graded tests of chapter 3: the online-softmax update, causal block skipping and the FlashAttention inner loop.

The kernel exercise is a @triton.jit helper: it cannot be called from Python, so its tests run it through
`launch_flash_attention`, the launcher that sits next to it in the chapter module (learner's or solution's),
under Triton's interpreter on small sizes.
"""
from __future__ import annotations

import math

import pytest
import torch

from minillm.course.checks import assert_close, assert_rejects, assert_tensor, graded_seed, kernel_device, kernel_launcher


def _state(m_rows: int, d: int, seed: int, fresh: bool):
    g = torch.Generator().manual_seed(graded_seed(seed))
    if fresh:
        return torch.full((m_rows,), float("-inf")), torch.zeros(m_rows), torch.zeros(m_rows, d)
    m = torch.randn(m_rows, generator=g)
    return m, torch.rand(m_rows, generator=g) + 0.5, torch.randn(m_rows, d, generator=g)


def _scores(m_rows: int, n: int, seed: int, masked: float = 0.0):
    g = torch.Generator().manual_seed(graded_seed(seed))
    s = torch.randn(m_rows, n, generator=g) * 3
    if masked:
        s[torch.rand(m_rows, n, generator=g) < masked] = float("-inf")
    return s


# ---------------------------------------------------------------------------------- online_softmax_update
@pytest.mark.exercise("ch03.online_softmax_update")
@pytest.mark.points(1)
@pytest.mark.parametrize("m_rows,n,d,fresh", [(1, 1, 1, True), (5, 16, 8, True), (7, 17, 24, False), (16, 3, 5, False)])
def test_online_softmax_update_matches_solution(impl, ref, m_rows, n, d, fresh):
    state = _state(m_rows, d, m_rows * 100 + n, fresh)
    s, v = _scores(m_rows, n, n, masked=0.2), torch.randn(n, d, generator=torch.Generator().manual_seed(graded_seed(d)))
    got = impl(*(t.clone() for t in state), s.clone(), v.clone())
    want = ref(*(t.clone() for t in state), s.clone(), v.clone())
    assert isinstance(got, tuple) and len(got) == 3, f"online_softmax_update must return (m, l, acc), got {type(got)}"
    for name, a, b in zip(("m_new", "l_new", "acc_new"), got, want):
        assert_close(a, b, f"{name} (M={m_rows}, N={n}, D={d}, {'first block' if fresh else 'mid-row'})")


@pytest.mark.exercise("ch03.online_softmax_update")
@pytest.mark.points(1)
@pytest.mark.parametrize("total,block", [(33, 16), (16, 16), (7, 1), (40, 13)])
def test_online_softmax_blocks_give_softmax(impl, total, block):
    g = torch.Generator().manual_seed(graded_seed(total * block))
    s, v = torch.randn(6, total, generator=g) * 4 + 20, torch.randn(total, 10, generator=g)  # big scores: exp overflows without rescaling
    m, l, acc = _state(6, 10, 0, fresh=True)
    for start in range(0, total, block):
        m, l, acc = impl(m, l, acc, s[:, start:start + block].clone(), v[start:start + block].clone())
    assert_close(m, s.max(dim=1).values, f"running max after {total} scores in blocks of {block}")
    want = torch.softmax(s.double(), dim=1) @ v.double()
    assert_close(acc / l[:, None], want.float(), f"acc / l after {total} scores in blocks of {block}", atol=1e-5,
                 rtol=1e-4)


@pytest.mark.exercise("ch03.online_softmax_update")
@pytest.mark.points(2)
def test_online_softmax_masked_rows_and_inputs_untouched(impl):
    m, l, acc = _state(4, 3, 0, fresh=True)
    s = torch.randn(4, 5)
    s[1] = float("-inf")  # row 1 sees no key in this block
    s[3, :4] = float("-inf")
    v = torch.randn(5, 3)
    args = (m, l, acc, s, v)
    copies = tuple(t.clone() for t in args)
    m2, l2, acc2 = impl(*args)
    for name, a, b in zip(("m_i", "l_i", "acc", "scores", "values"), args, copies):
        assert torch.equal(a, b), f"online_softmax_update modified its input {name}"
    assert not torch.isnan(acc2).any() and not torch.isnan(l2).any(), "a fully masked row must not produce nan"
    assert m2[1] == float("-inf") and l2[1] == 0 and bool((acc2[1] == 0).all()), (
        f"a row that saw only -inf must stay m=-inf, l=0, acc=0; got m={m2[1]}, l={l2[1]}, acc={acc2[1].tolist()}")
    assert_close(l2[3:], torch.ones(1), "l of a row with one unmasked score (exp(s - max) = 1)")
    assert_close(acc2[3], v[4], "acc of a row with one unmasked score (its value)")
    low = tuple(t.to(torch.bfloat16) for t in (m, l, acc, s, v))  # results in the inputs' dtypes
    for name, t in zip(("m_new", "l_new", "acc_new"), impl(*low)):
        assert_tensor(t, f"{name} for bf16 inputs", tuple(t.shape), torch.bfloat16)


# ------------------------------------------------------------------------------------- causal_block_range
def _brute_force(m_start, block_m, q_len, k_len, block_n, causal):
    rows = range(m_start, min(m_start + block_m, q_len))
    seen = [min(k_len, (k_len - q_len + i + 1) if causal else k_len) for i in rows]  # keys 0..seen-1 per row
    hi = max(0, max(seen))
    full_end = max(0, min(seen)) // block_n * block_n
    return full_end, hi


_GRID = [(q, k, bm, bn, c) for q, k in [(1, 1), (1, 37), (16, 16), (17, 17), (5, 40), (40, 40), (33, 8)]
         for bm, bn in [(16, 16), (8, 32), (32, 8), (3, 5)] for c in (True, False)]


@pytest.mark.exercise("ch03.causal_block_range")
@pytest.mark.points(4)
def test_causal_block_range_matches_solution(impl, ref):
    for q_len, k_len, bm, bn, causal in _GRID:
        for m_start in range(0, q_len, bm):
            got, want = impl(m_start, bm, q_len, k_len, bn, causal), ref(m_start, bm, q_len, k_len, bn, causal)
            assert tuple(got) == tuple(want), (f"causal_block_range(m_start={m_start}, block_m={bm}, q_len={q_len}, "
                                               f"k_len={k_len}, block_n={bn}, causal={causal}): got {got}, expected {want}")


@pytest.mark.exercise("ch03.causal_block_range")
@pytest.mark.points(4)
def test_causal_block_range_covers_exactly_the_needed_keys(impl):
    for q_len, k_len, bm, bn, causal in _GRID:
        for m_start in range(0, q_len, bm):
            full_end, hi = impl(m_start, bm, q_len, k_len, bn, causal)
            want = _brute_force(m_start, bm, q_len, k_len, bn, causal)
            where = f"q rows {m_start}..{min(m_start + bm, q_len) - 1} of {q_len}, k_len={k_len}, block_n={bn}, causal={causal}"
            assert hi == want[1], f"{where}: hi={hi}, but the last row needs keys up to {want[1] - 1} (hi={want[1]})"
            assert full_end == want[0], (f"{where}: full_end={full_end}, expected {want[0]} (whole tiles every row "
                                          "sees, bottom-right aligned)")
            assert full_end % bn == 0 and 0 <= full_end <= hi <= k_len, f"{where}: need 0 <= full_end <= hi <= k_len"


@pytest.mark.exercise("ch03.causal_block_range")
@pytest.mark.points(2)
def test_causal_block_range_rejects_bad_arguments(impl, ref):
    valid = (16, 16, 40, 56, 16, True)  # m_start, block_m, q_len, k_len, block_n: all in range
    invalid = [(-1, 16, 8, 8, 16), (8, 16, 8, 8, 16), (0, 0, 8, 8, 16), (0, 16, 8, 8, 0), (0, 16, 8, -1, 16)]
    assert_rejects(impl, valid, ref(*valid), [args + (True,) for args in invalid], "causal_block_range")


# -------------------------------------------------------------------------------- flash_attention_kernel
def _launcher(fn):
    """`launch_flash_attention` (as shipped, with the kernel that calls `fn`) of the module that defines `fn`."""
    return kernel_launcher(fn, "ch03.flash_attention_kernel", "launch_flash_attention", given=("_flash_fwd_kernel",))


def _attention(q, k, v, causal, scale):
    """fp64 attention (on the CPU) with bottom-right causal alignment; rows without keys give 0 and lse -inf."""
    q, k, v = q.cpu().double(), k.cpu().double(), v.cpu().double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s = q @ k.transpose(-1, -2) * scale
    sq, sk = q.shape[2], k.shape[2]
    if causal:
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return (p @ v).float(), lse.float()


def _qkv(b, h, kvh, sq, sk, d, seed):
    g = torch.Generator().manual_seed(graded_seed(seed))
    q, k, v = (torch.randn(b, h, sq, d, generator=g), torch.randn(b, kvh, sk, d, generator=g),
               torch.randn(b, kvh, sk, d, generator=g))
    return q.to(kernel_device()), k.to(kernel_device()), v.to(kernel_device())


_CASES = [  # (batch, heads, kv heads, seqlen_q, seqlen_k, head_dim, causal)
    (1, 1, 1, 16, 16, 16, True),  # exactly one tile each way
    (1, 2, 1, 17, 17, 16, True),  # one past a tile, GQA 2:1
    (1, 1, 1, 33, 33, 24, False),  # head_dim padded to 32
    (2, 1, 1, 5, 37, 16, True),  # a chunk after a cached prefix (bottom-right)
    (1, 3, 3, 1, 29, 8, True),  # decode-like: one query
]


@pytest.mark.exercise("ch03.flash_attention_kernel")
@pytest.mark.points(2)
@pytest.mark.parametrize("case", _CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}q{c[3]}k{c[4]}d{c[5]}{'c' if c[6] else ''}")
def test_flash_kernel_matches_attention(impl, case):
    b, h, kvh, sq, sk, d, causal = case
    q, k, v = _qkv(b, h, kvh, sq, sk, d, seed=sq * 7 + sk)
    out, lse = _launcher(impl)(q, k, v, causal, None, 16, 16)
    want_out, want_lse = _attention(q, k, v, causal, 1 / math.sqrt(d))
    assert_tensor(out, "out", (b, h, sq, d), torch.float32)
    assert_close(out, want_out, f"attention output ({case})", atol=2e-5, rtol=1e-4)
    assert_close(lse, want_lse, f"log-sum-exp ({case})", atol=2e-5, rtol=1e-4)


@pytest.mark.exercise("ch03.flash_attention_kernel")
@pytest.mark.points(2)
@pytest.mark.parametrize("block_m,block_n", [(16, 32), (32, 16)])
def test_flash_kernel_tile_shapes_and_large_scores(impl, ref, block_m, block_n):
    q, k, v = _qkv(1, 2, 2, 40, 40, 16, seed=block_m)
    # q x 6: scores of +-100, exp overflows fp32 unless the running max is subtracted; q x 20: +-330, and keys
    # opposite to the queries: every scaled score near -50 (the max must be taken of the scaled scores)
    for what, qs, ks in (("large scores", q * 6, k), ("larger scores", q * 20, k),
                         ("scores all near -50", q[:, :, :1] * 3, -q[:, :, :1].expand_as(k) * 3 + 0.01 * k)):
        qs, ks = qs.contiguous(), ks.contiguous()
        got = _launcher(impl)(qs, ks, v, True, None, block_m, block_n)
        want = _launcher(ref)(qs, ks, v, True, None, block_m, block_n)
        for name, a, e in zip(("out", "lse"), got, want):
            assert_close(a, e, f"{name} with BLOCK_M={block_m}, BLOCK_N={block_n}, {what}", atol=2e-5, rtol=1e-4)


@pytest.mark.exercise("ch03.flash_attention_kernel")
@pytest.mark.points(2)
def test_flash_kernel_masks_the_padded_head_dim(impl):
    """head_dim 24 runs in a 32-wide tile: the 8 padded columns must be masked on load. Here K and V are the
    first elements of buffers whose tail is NaN, so a load past head_dim reads NaN into the output."""
    q, k, v = _qkv(1, 1, 1, 33, 33, 24, seed=24)
    padded = []
    for t in (k, v):
        buffer = torch.full((t.numel() + 64,), float("nan"), device=t.device)
        buffer[:t.numel()] = t.reshape(-1)
        padded.append(buffer[:t.numel()].view(t.shape))  # contiguous: the launcher passes it as it is
    out, lse = _launcher(impl)(q, padded[0], padded[1], False, None, 16, 16)
    want_out, want_lse = _attention(q, k, v, False, 1 / math.sqrt(24))
    assert not torch.isnan(out).any(), "head_dim 24 with NaN past the end of K and V: mask the padded columns"
    assert_close(out, want_out, "attention output, head_dim 24 (padded to 32)", atol=2e-5, rtol=1e-4)
    assert_close(lse, want_lse, "log-sum-exp, head_dim 24 (padded to 32)", atol=2e-5, rtol=1e-4)


@pytest.mark.exercise("ch03.flash_attention_kernel")
@pytest.mark.points(4)
def test_flash_kernel_rows_without_keys(impl):
    q, k, v = _qkv(1, 1, 1, 20, 6, 16, seed=3)  # seqlen_k < seqlen_q: the first 14 rows see no key
    out, lse = _launcher(impl)(q, k, v, True, 0.5, 16, 16)
    want_out, want_lse = _attention(q, k, v, True, 0.5)
    assert not torch.isnan(out).any(), "rows that see no key must give 0, not nan"
    assert_close(out, want_out, "output with rows that see no key (0 expected there)", atol=2e-5, rtol=1e-4)
    assert_close(lse, want_lse, "lse with rows that see no key (-inf expected there)", atol=2e-5, rtol=1e-4)
