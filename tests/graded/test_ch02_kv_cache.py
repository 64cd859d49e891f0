"""Graded tests of chapter 2: the bottom-right aligned causal mask of prefill, chunked prefill and decode."""
from __future__ import annotations

import pytest
import torch

from minillm.course.checks import assert_equal, assert_rejects, assert_tensor


@pytest.mark.exercise("ch02.causal_mask")
@pytest.mark.points(1)
@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (1, 17), (5, 5), (3, 10), (16, 16), (17, 33)])
def test_causal_mask_matches_solution(impl, ref, q_len, kv_len):
    assert_equal(impl(q_len, kv_len), ref(q_len, kv_len), f"causal_mask(q_len={q_len}, kv_len={kv_len})")


@pytest.mark.exercise("ch02.causal_mask")
@pytest.mark.points(2)
def test_causal_mask_properties(impl, ref):
    for q_len, kv_len in [(1, 9), (4, 4), (6, 13), (31, 32)]:
        mask = impl(q_len, kv_len)
        assert_tensor(mask, f"causal_mask({q_len}, {kv_len})", (q_len, kv_len), torch.bool)
        offset = kv_len - q_len  # query i is the token at position offset + i
        for i in range(q_len):
            row = mask[i].tolist()
            want = offset + i + 1
            assert row == [True] * want + [False] * (kv_len - want), (
                f"causal_mask({q_len}, {kv_len}) row {i}: query at position {offset + i} must see keys "
                f"0..{offset + i} ({want} Trues then Falses), got {sum(row)} Trues: {row[:8]}...")
    assert_rejects(impl, (3, 5), ref(3, 5), [(5, 3)], "causal_mask")  # more queries than keys: invalid


@pytest.mark.exercise("ch02.causal_mask")
@pytest.mark.points(1)
def test_causal_mask_device_argument(impl):
    for device in (None, "cpu", torch.device("cpu")):
        mask = impl(2, 3, device=device)
        assert_tensor(mask, f"causal_mask(2, 3, device={device!r})", (2, 3), torch.bool)
        assert mask.device.type == "cpu", f"device={device!r}: mask is on {mask.device}"


@pytest.mark.exercise("ch02.sliding_window_mask")
@pytest.mark.points(1)
@pytest.mark.parametrize("q_len,kv_len,window,first_key", [(6, 6, 3, 0), (1, 40, 8, 32), (5, 30, 4, 21),
                                                           (7, 19, 100, 0), (4, 9, None, 0)])
def test_sliding_window_mask_matches_solution(impl, ref, q_len, kv_len, window, first_key):
    args = f"sliding_window_mask({q_len}, {kv_len}, window={window}, first_key={first_key})"
    assert_equal(impl(q_len, kv_len, window, first_key), ref(q_len, kv_len, window, first_key), args)


@pytest.mark.exercise("ch02.sliding_window_mask")
@pytest.mark.points(3)
def test_sliding_window_mask_is_the_band(impl, ref):
    for q_len, kv_len, window in [(1, 12, 5), (6, 6, 2), (4, 20, 7), (9, 11, 3)]:
        mask = impl(q_len, kv_len, window)
        assert_tensor(mask, f"sliding_window_mask({q_len}, {kv_len}, {window})", (q_len, kv_len), torch.bool)
        for i in range(q_len):
            pos = kv_len - q_len + i
            want = [pos - window < key <= pos for key in range(kv_len)]
            assert mask[i].tolist() == want, (
                f"sliding_window_mask({q_len}, {kv_len}, window={window}) row {i}: the query at position {pos} "
                f"sees keys {max(0, pos - window + 1)}..{pos} (its last {window}), got {mask[i].int().tolist()}")
    # window 0, first_key past the first query's window start, more queries than keys
    assert_rejects(impl, (3, 5, 2, 0), ref(3, 5, 2, 0), [(3, 5, 0, 0), (3, 5, 2, 3), (5, 3, 2, 0)],
                   "sliding_window_mask")


@pytest.mark.exercise("ch02.sliding_window_mask")
@pytest.mark.points(1)
def test_sliding_window_mask_device_argument(impl):
    mask = impl(2, 6, 3, 1, device="cpu")
    assert_tensor(mask, "sliding_window_mask(2, 6, 3, 1, device='cpu')", (2, 5), torch.bool)
