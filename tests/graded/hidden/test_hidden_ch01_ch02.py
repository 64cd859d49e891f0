"""Hidden graded tests: left out of a student release, shown after publication on Gradescope.

Bigger and odder inputs than the visible tests, so that an answer tuned to the visible cases still fails.
"""
from __future__ import annotations

import pytest
import torch

from minillm.course.checks import assert_close, assert_equal
from minillm.course.checks import graded_seed, near_the_top_p_cut


@pytest.mark.exercise("ch01.top_k_filter")
@pytest.mark.points(2)
def test_top_k_large_batch_hidden(impl, ref):
    g = torch.Generator().manual_seed(graded_seed(101))
    logits = torch.randn(37, 1001, generator=g)
    top_k = torch.randint(1, 1002, (37,), generator=g)
    top_k[::5] = -1
    assert_close(impl(logits.clone(), top_k.clone()), ref(logits.clone(), top_k.clone()), "top_k_filter [37, 1001]")


@pytest.mark.exercise("ch01.top_p_filter")
@pytest.mark.points(1)
def test_top_p_peaked_rows_hidden(impl, ref):
    g = torch.Generator().manual_seed(graded_seed(102))
    logits = torch.randn(9, 513, generator=g) * 8  # very peaked rows: often one token holds most of the mass
    top_p = torch.rand(9, generator=g).clamp_min(0.02)
    cut = near_the_top_p_cut(logits, top_p)  # fp32 rounding alone decides these: not graded
    assert_close(impl(logits.clone(), top_p.clone()).masked_fill(cut, 0.0),
                 ref(logits.clone(), top_p.clone()).masked_fill(cut, 0.0), "top_p_filter [9, 513]")


@pytest.mark.exercise("ch02.causal_mask")
@pytest.mark.points(1)
def test_causal_mask_long_chunk_hidden(impl, ref):
    assert_equal(impl(64, 127), ref(64, 127), "causal_mask(q_len=64, kv_len=127)")
