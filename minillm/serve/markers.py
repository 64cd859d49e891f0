"""Streaming text that may hold a marker (`</think>`, `<tool_call>`): how much of its end to hold back."""
from __future__ import annotations


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker`: text a streaming parser must
    hold back, since the next piece may complete the marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
