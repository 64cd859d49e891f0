"""Sliding-window attention (Mistral 7B v0.1, Qwen2's upper layers when `use_sliding_window` is set).

A layer with window W lets the token at position p attend to the W keys p - W + 1 .. p (itself included) instead
of every earlier key: Hugging Face's mask keeps key j for query i when i - W < j <= i. Information still travels
further than W, one window per layer (a stack of L layers sees L x W tokens back), while attention's cost per
token stops growing with the context: at most W keys are read, however long the sequence.

Chapter 2 builds the mask (exercise ch02.sliding_window_mask, below); chapter 5 asks what a window changes in a
paged engine. Where minillm applies it: every attention path takes the window. The Triton kernels skip the key
tiles before the first query's window and mask the tiles its lower edge cuts through (kernels/paged_prefill.py,
kernels/paged_attention.py); the torch path (minillm/layers/attention.py, decode_attention.py) gathers each
sequence's keys from its first query's window on and masks the band with this module's function. When every
layer slides, the engine gives back the KV blocks that slid out of the window (minillm/engine/block_window.py), so
memory stays at about the window too. What is not done: token-tree speculation is refused beside a window (a tree
node's window would be counted from its depth, not its slot).
"""
from __future__ import annotations

import torch  # torch only: no Triton at import (minillm.layers imports this module)


def check_window(window: int | None) -> None:
    """ValueError unless `window` is None (full attention) or a positive int."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None (full attention) or an int >= 1, got {window!r}")


def first_visible_key(seq_len: int, q_len: int, window: int | None) -> int:
    """The first key any of the last q_len queries of a seq_len-token sequence sees: the first query sits at
    position seq_len - q_len, and its window starts window - 1 keys before it (0 without a window)."""
    return 0 if window is None else max(0, seq_len - q_len - window + 1)


# >>> exercise ch02.sliding_window_mask
def sliding_window_mask(q_len: int, kv_len: int, window: int | None, first_key: int = 0,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask [q_len, kv_len - first_key], True where query i may attend to key first_key + j.

    The queries are the last q_len of kv_len tokens (bottom-right alignment, as chapter 2's causal_mask): query i
    is at position kv_len - q_len + i and sees the keys pos - window < key <= pos, its last `window` keys, itself
    included (window None: every key <= pos, the causal mask). first_key: the keys before it were left out of the
    call (they are outside every query's window), so column j is key first_key + j.
    Raises ValueError unless window is None or an int >= 1, 1 <= q_len <= kv_len and
    0 <= first_key <= kv_len - q_len. Build it with broadcasting, no Python loops.
    """
    # >>> solution
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None (full attention) or an int >= 1, got {window!r}")
    if q_len < 1 or kv_len < q_len or not 0 <= first_key <= kv_len - q_len:
        raise ValueError(f"need 1 <= q_len <= kv_len and 0 <= first_key <= kv_len - q_len, got q_len={q_len}, "
                         f"kv_len={kv_len}, first_key={first_key}")
    pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)  # [q_len, 1]
    keys = torch.arange(first_key, kv_len, device=device).unsqueeze(0)  # [1, kv_len - first_key]
    mask = keys <= pos
    return mask if window is None else mask & (keys > pos - window)
    # <<< solution
# <<< exercise
