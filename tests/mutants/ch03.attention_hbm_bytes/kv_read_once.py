"""Has FlashAttention read K and V once in all, not once per query tile (the outer loop is over query tiles)."""


def attention_hbm_bytes(seq_len, head_dim, bytes_per_element, block_m, flash):
    if min(seq_len, head_dim, block_m) < 1 or bytes_per_element <= 0:
        raise ValueError("bad sizes")
    n, d = seq_len, head_dim
    if not flash:
        return bytes_per_element * (4 * n * d + 4 * n * n)
    return bytes_per_element * 4 * n * d
