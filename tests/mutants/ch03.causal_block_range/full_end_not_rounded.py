"""Lets the unmasked range end mid-tile: the tile that the first row's diagonal cuts would skip its mask."""


def causal_block_range(m_start, block_m, q_len, k_len, block_n, causal=True):
    if block_m < 1 or block_n < 1 or k_len < 0 or not 0 <= m_start < q_len:
        raise ValueError("bad arguments")
    if not causal:
        return k_len, k_len
    offset = k_len - q_len
    hi = min(k_len, offset + min(m_start + block_m, q_len))
    return max(0, min(k_len, offset + m_start + 1)), max(hi, 0)
