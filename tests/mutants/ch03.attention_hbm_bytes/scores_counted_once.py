"""Counts the naive score matrix as written once and read once: forgets that the softmax writes P and P V reads
it back."""
import math


def attention_hbm_bytes(seq_len, head_dim, bytes_per_element, block_m, flash):
    if min(seq_len, head_dim, block_m) < 1 or bytes_per_element <= 0:
        raise ValueError("bad sizes")
    n, d = seq_len, head_dim
    if not flash:
        return bytes_per_element * (4 * n * d + 2 * n * n)
    return bytes_per_element * (2 * n * d + math.ceil(n / block_m) * 2 * n * d)
