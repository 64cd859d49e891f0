"""Starts the next window at the new end (prefix_offset = num_tokens): no tokens of left context, so a
SentencePiece word decoded first in its window loses its leading space."""


def next_text(prefix_text, full_text, prefix_offset, read_offset, num_tokens):
    if not 0 <= prefix_offset <= read_offset <= num_tokens:
        raise ValueError("bad offsets")
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        return full_text[len(prefix_text):], num_tokens, num_tokens
    return "", prefix_offset, read_offset
