"""Keeps prefix_offset where it was: the text comes out right, but the window grows with every token, so each
step decodes the whole output again (quadratic work over a long answer)."""


def next_text(prefix_text, full_text, prefix_offset, read_offset, num_tokens):
    if not 0 <= prefix_offset <= read_offset <= num_tokens:
        raise ValueError("bad offsets")
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        return full_text[len(prefix_text):], prefix_offset, num_tokens
    return "", prefix_offset, read_offset
