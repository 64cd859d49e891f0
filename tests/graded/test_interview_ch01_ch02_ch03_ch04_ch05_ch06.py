"""Graded tests of the interview questions with a numeric answer (minillm/bench/interview.py), chapters 1 to 6.

Each question is one formula. Its tests check the learner's number against the solution's on fresh random
inputs (within a relative tolerance: the same formula written in another order is still right), against a
property that holds whatever the solution says (an independent simulation where there is one), on the number
the chapter asks for, and that a nonsensical input is refused with a ValueError.
"""
from __future__ import annotations

import math
import random

import pytest

from minillm.course.checks import assert_rejects, assert_scalar_close, graded_seed

pytestmark = pytest.mark.filterwarnings("ignore")
RTOL = 1e-6  # a number, not a tensor: any sound order of operations lands far inside this


def rng(seed: int) -> random.Random:
    return random.Random(graded_seed(seed))


# ---- ch01.batch1_decode_tokens_per_s ----------------------------------------------------------------

@pytest.mark.exercise("ch01.batch1_decode_tokens_per_s")
@pytest.mark.points(2)
def test_batch1_decode_matches_solution(impl, ref):
    r = rng(1)
    for _ in range(8):
        args = (r.uniform(1e8, 1e11), r.choice([4, 2, 1, 0.5]), r.uniform(5e10, 8e12))
        assert_scalar_close(impl(*args), ref(*args), f"batch1_decode_tokens_per_s{args}", RTOL)


@pytest.mark.exercise("ch01.batch1_decode_tokens_per_s")
@pytest.mark.points(2)
def test_batch1_decode_properties(impl):
    llama = impl(8.03e9, 2, 4.24e12)  # Llama-3-8B in bf16 on an H200's measured copy bandwidth
    assert_scalar_close(llama, 4.24e12 / 16.06e9, "Llama-3-8B bf16, 4.24 TB/s (tokens/s)", RTOL)
    assert_scalar_close(impl(8.03e9, 0.5, 4.24e12), 4 * llama, "int4 weights read 4x fewer bytes than bf16", RTOL)
    assert_scalar_close(impl(8.03e9, 2, 8.48e12), 2 * llama, "twice the bandwidth, twice the tokens/s", RTOL)


@pytest.mark.exercise("ch01.batch1_decode_tokens_per_s")
@pytest.mark.points(1)
def test_batch1_decode_rejects_bad_input(impl, ref):
    valid = (8.03e9, 2, 4.24e12)
    assert_rejects(impl, valid, ref(*valid), [(0, 2, 1e12), (1e9, -1, 1e12), (1e9, 2, 0)], "batch1_decode_tokens_per_s")


# ---- ch01.critical_batch_size -----------------------------------------------------------------------

@pytest.mark.exercise("ch01.critical_batch_size")
@pytest.mark.points(2)
def test_critical_batch_matches_solution(impl, ref):
    r = rng(2)
    for _ in range(8):
        args = (r.uniform(1e11, 2e15), r.uniform(5e10, 5e12), r.choice([4, 2, 1, 0.5]))
        got = impl(*args)
        assert isinstance(got, int) and not isinstance(got, bool), f"critical_batch_size must return an int, got {got!r}"
        assert got == ref(*args), f"critical_batch_size{args}: got {got}, expected {ref(*args)}"


@pytest.mark.exercise("ch01.critical_batch_size")
@pytest.mark.points(2)
def test_critical_batch_is_the_smallest_that_reaches_the_ridge(impl):
    r = rng(3)
    for _ in range(10):
        peak, bw, b = r.uniform(1e12, 2e15), r.uniform(1e11, 5e12), r.choice([2, 1, 0.5])
        batch, ridge = impl(peak, bw, b), peak / bw
        assert 2 * batch / b >= ridge * (1 - 1e-12), f"batch {batch} is still below the ridge {ridge:.4g} FLOPs/byte"
        assert batch == 1 or 2 * (batch - 1) / b < ridge, f"batch {batch - 1} already reaches the ridge {ridge:.4g}"
    assert impl(4e12, 1e12, 2) == 4, "ridge exactly 4 FLOPs/byte in bf16: batch 4 reaches it (ceil, not +1)"
    assert impl(1e12, 1e12, 1) == 1, "a ridge below one decode token's intensity: batch 1"


@pytest.mark.exercise("ch01.critical_batch_size")
@pytest.mark.points(1)
def test_critical_batch_rejects_bad_input(impl, ref):
    valid = (1e15, 3e12, 2)
    assert_rejects(impl, valid, ref(*valid), [(0, 1e12, 2), (1e15, 0, 2), (1e15, 1e12, 0)], "critical_batch_size")


# ---- ch02.kv_cache_bytes ----------------------------------------------------------------------------

@pytest.mark.exercise("ch02.kv_cache_bytes")
@pytest.mark.points(2)
def test_kv_cache_bytes_matches_solution(impl, ref):
    r = rng(4)
    for _ in range(8):
        args = (r.randint(1, 80), r.randint(1, 64), r.choice([32, 64, 80, 128, 256]), r.choice([4, 2, 1, 0.5]),
                r.randint(0, 10**6))
        assert_scalar_close(impl(*args), ref(*args), f"kv_cache_bytes{args}", RTOL)


@pytest.mark.exercise("ch02.kv_cache_bytes")
@pytest.mark.points(2)
def test_kv_cache_bytes_properties(impl):
    assert_scalar_close(impl(32, 8, 128, 2, 1), 128 * 1024, "Llama-3-8B, bf16, one token (bytes)", RTOL)
    assert_scalar_close(impl(30, 3, 64, 4, 1), 2 * 30 * 3 * 64 * 4, "SmolLM2-135M, fp32, one token", RTOL)
    assert_scalar_close(impl(32, 8, 128, 2, 8192 * 16), 16 * 8192 * 128 * 1024, "8k tokens x 16 sequences", RTOL)
    assert impl(32, 8, 128, 2, 0) == 0, "no tokens, no cache"


@pytest.mark.exercise("ch02.kv_cache_bytes")
@pytest.mark.points(1)
def test_kv_cache_bytes_rejects_bad_input(impl, ref):
    valid = (32, 8, 128, 2, 1)
    assert_rejects(impl, valid, ref(*valid), [(0, 8, 128, 2, 1), (32, 0, 128, 2, 1), (32, 8, 128, 0, 1), (32, 8, 128, 2, -1)], "kv_cache_bytes")


# ---- ch03.attention_hbm_bytes -----------------------------------------------------------------------

@pytest.mark.exercise("ch03.attention_hbm_bytes")
@pytest.mark.points(2)
def test_attention_hbm_bytes_matches_solution(impl, ref):
    r = rng(5)
    for _ in range(8):
        args = (r.randint(1, 20000), r.choice([40, 64, 128]), r.choice([4, 2]), r.choice([16, 64, 128]),
                r.random() < 0.5)
        assert_scalar_close(impl(*args), ref(*args), f"attention_hbm_bytes{args}", RTOL)


@pytest.mark.exercise("ch03.attention_hbm_bytes")
@pytest.mark.points(2)
def test_attention_hbm_bytes_properties(impl):
    n, d = 4096, 128
    naive, flash = impl(n, d, 2, 128, False), impl(n, d, 2, 128, True)
    assert naive == impl(n, d, 2, 16, False), "the naive kernels have no query tiles: block_m must not matter"
    assert_scalar_close(naive, 2 * (4 * n * d + 4 * n * n), "naive attention, n=4096, d=128, bf16", RTOL)
    assert_scalar_close(flash, 2 * (2 * n * d + 32 * 2 * n * d), "flash, 32 query tiles of 128", RTOL)
    assert_scalar_close(impl(100, 64, 4, 128, True), 4 * 4 * 100 * 64, "one query tile: Q, K, V, O once each", RTOL)
    assert_scalar_close(impl(129, 64, 4, 128, True), 4 * (2 + 2 * 2) * 129 * 64, "129 queries: two tiles", RTOL)


@pytest.mark.exercise("ch03.attention_hbm_bytes")
@pytest.mark.points(1)
def test_attention_hbm_bytes_rejects_bad_input(impl, ref):
    valid = (16, 64, 2, 16, True)
    assert_rejects(impl, valid, ref(*valid), [(0, 64, 2, 16, True), (16, 0, 2, 16, False), (16, 64, 0, 16, True), (16, 64, 2, 0, True)], "attention_hbm_bytes")


# ---- ch04.decode_step_floor_s -----------------------------------------------------------------------

@pytest.mark.exercise("ch04.decode_step_floor_s")
@pytest.mark.points(2)
def test_decode_step_floor_matches_solution(impl, ref):
    r = rng(6)
    for _ in range(8):
        lens = [r.randint(0, 9000) for _ in range(r.randint(1, 70))]
        args = (r.uniform(1e8, 1e11), r.uniform(1e3, 3e5), lens, r.uniform(1e11, 5e12))
        assert_scalar_close(impl(*args), ref(*args), f"decode_step_floor_s(batch of {len(lens)})", RTOL)


@pytest.mark.exercise("ch04.decode_step_floor_s")
@pytest.mark.points(2)
def test_decode_step_floor_properties(impl):
    w, kv, bw = 16.06e9, 131072, 4.24e12  # Llama-3-8B bf16 on an H200
    assert_scalar_close(impl(w, kv, [0], bw), w / bw, "batch 1, empty context: the weights alone", RTOL)
    one = impl(w, kv, [4096], bw)
    assert_scalar_close(impl(w, kv, [4096] * 64, bw) - one, 63 * 4096 * kv / bw,
                        "each extra sequence adds its own KV (weights are read once per step)", RTOL)
    assert_scalar_close(impl(w, kv, [100, 300], bw), impl(w, kv, [200, 200], bw), "only the total context counts",
                        RTOL)


@pytest.mark.exercise("ch04.decode_step_floor_s")
@pytest.mark.points(1)
def test_decode_step_floor_rejects_bad_input(impl, ref):
    valid = (1e9, 1e3, [5, 7], 1e12)
    assert_rejects(impl, valid, ref(*valid), [(1e9, 1e3, [], 1e12), (1e9, 1e3, [5, -1], 1e12), (1e9, 1e3, [5], 0), (-1, 1e3, [5], 1e12),
                                                  (1e9, -1, [5], 1e12)], "decode_step_floor_s")


# ---- ch05.num_kv_blocks_needed ----------------------------------------------------------------------

def _blocks_by_simulation(seq_lens, block_size, prefix):
    """Name every block by what it holds: the prefix's full blocks are the same for all, the rest each its own."""
    full = prefix // block_size
    names = set()
    for s, n in enumerate(seq_lens):
        for j in range(math.ceil(n / block_size)):
            names.add(("prefix", j) if j < full else (s, j))
    return len(names)


@pytest.mark.exercise("ch05.num_kv_blocks_needed")
@pytest.mark.points(2)
def test_num_kv_blocks_matches_solution(impl, ref):
    r = rng(7)
    for _ in range(10):
        prefix = r.choice([0, 1, 15, 16, 17, 48, r.randint(0, 100)])
        lens = [prefix + r.randint(0, 80) for _ in range(r.randint(1, 9))]
        bs = r.choice([1, 4, 16, 7])
        assert impl(lens, bs, prefix) == ref(lens, bs, prefix), \
            f"num_kv_blocks_needed({lens}, {bs}, {prefix}): got {impl(lens, bs, prefix)}, expected {ref(lens, bs, prefix)}"


@pytest.mark.exercise("ch05.num_kv_blocks_needed")
@pytest.mark.points(2)
def test_num_kv_blocks_by_simulation(impl):
    r = rng(8)
    cases = [([16], 16, 16), ([17, 33], 16, 16), ([20, 20, 20], 16, 20), ([5, 5], 16, 5), ([64, 64], 16, 0)]
    cases += [([r.randint(30, 90) for _ in range(4)], 16, 30) for _ in range(4)]
    for lens, bs, prefix in cases:
        want = _blocks_by_simulation(lens, bs, prefix)
        got = impl(lens, bs, prefix)
        assert got == want, f"seq_lens {lens}, block {bs}, shared prefix {prefix}: got {got} blocks, expected {want}"
    assert impl([87, 412, 23], 16) == 6 + 26 + 2, "no shared prefix: the plain paged count"


@pytest.mark.exercise("ch05.num_kv_blocks_needed")
@pytest.mark.points(1)
def test_num_kv_blocks_rejects_bad_input(impl, ref):
    valid = ([40, 21], 16, 16)
    assert_rejects(impl, valid, ref(*valid), [([10], 0, 0), ([], 16, 0), ([10, -1], 16, 0), ([10, 5], 16, 8), ([10], 16, -1)], "num_kv_blocks_needed")


# ---- ch06.batching_steps ----------------------------------------------------------------------------

def _simulate(output_lens, max_batch, continuous):
    """Tick by tick: who runs this step, one token each, who leaves, who joins."""
    waiting, running, steps = list(output_lens), [], 0
    while waiting or running:
        if continuous or not running:
            while waiting and len(running) < max_batch:
                running.append(waiting.pop(0))
        running = [n - 1 for n in running]
        steps += 1
        running = [n for n in running if n > 0]
    return steps


@pytest.mark.exercise("ch06.batching_steps")
@pytest.mark.points(2)
def test_batching_steps_by_simulation(impl):
    r = rng(9)
    cases = [([4, 1, 1, 1, 1], 2), ([24, 4, 10, 18, 6, 22, 8, 14], 4), ([5], 1), ([3, 3, 3], 8)]
    cases += [([r.randint(1, 30) for _ in range(r.randint(1, 12))], r.randint(1, 5)) for _ in range(6)]
    for lens, b in cases:
        for continuous in (False, True):
            got, want = impl(lens, b, continuous), _simulate(lens, b, continuous)
            assert got == want, f"{'continuous' if continuous else 'static'}, lens {lens}, batch {b}: got {got}, expected {want}"


@pytest.mark.exercise("ch06.batching_steps")
@pytest.mark.points(2)
def test_batching_steps_matches_solution(impl, ref):
    r = rng(10)
    for _ in range(6):
        lens, b = [r.randint(1, 40) for _ in range(r.randint(1, 20))], r.randint(1, 6)
        for continuous in (False, True):
            assert impl(lens, b, continuous) == ref(lens, b, continuous), \
                f"batching_steps({lens}, {b}, {continuous}): got {impl(lens, b, continuous)}, expected {ref(lens, b, continuous)}"


@pytest.mark.exercise("ch06.batching_steps")
@pytest.mark.points(1)
def test_batching_steps_rejects_bad_input(impl, ref):
    valid = ([3, 5, 2], 2, True)
    assert_rejects(impl, valid, ref(*valid), [([3, 0], 2, True), ([3], 0, False), ([-2], 1, True)], "batching_steps")
