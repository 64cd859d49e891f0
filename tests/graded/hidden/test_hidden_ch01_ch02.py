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


@pytest.mark.exercise("ch01.apply_penalties")
@pytest.mark.points(2)
def test_apply_penalties_long_histories_and_banned_tokens_hidden(impl, ref):
    """33 rows, histories up to 300 tokens over a 1,000-token vocabulary (most tokens repeat), some logits already
    -inf (min_tokens' ban runs first in the engine: a penalty must leave -inf as it is)."""
    g = torch.Generator().manual_seed(graded_seed(103))
    R, V, L = 33, 1000, 300
    logits = torch.randn(R, V, generator=g) * 4
    logits[torch.rand(R, V, generator=g) < 0.01] = float("-inf")
    used = torch.randint(1, L + 1, (R,), generator=g)
    history = torch.randint(0, 60, (R, L), generator=g)
    history[torch.arange(L) >= used[:, None]] = -1
    is_output = torch.arange(L) >= (used.float() * torch.rand(R, generator=g)).long()[:, None]
    presence, frequency = torch.rand(R, generator=g) * 4 - 2, torch.rand(R, generator=g) * 4 - 2
    repetition = torch.rand(R, generator=g) * 3 + 0.1
    args = (history, is_output, presence, frequency, repetition)
    assert_close(impl(logits.clone(), *args), ref(logits.clone(), *args), "apply_penalties [33, 1000], L=300")


@pytest.mark.exercise("ch02.sliding_window_mask")
@pytest.mark.points(1)
def test_sliding_window_mask_long_chunk_hidden(impl, ref):
    assert_equal(impl(64, 300, 40, 197), ref(64, 300, 40, 197), "sliding_window_mask(64, 300, 40, first_key=197)")
