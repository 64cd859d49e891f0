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
