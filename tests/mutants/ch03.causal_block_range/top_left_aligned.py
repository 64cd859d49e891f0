"""Aligns query row i with key i (top-left): right for a plain prefill, wrong after a cached prefix."""


def causal_block_range(m_start, block_m, q_len, k_len, block_n, causal=True):
    if block_m < 1 or block_n < 1 or k_len < 0 or not 0 <= m_start < q_len:
        raise ValueError("bad arguments")
    if not causal:
        return k_len // block_n * block_n, k_len
    hi = min(k_len, min(m_start + block_m, q_len))
    full_end = min(k_len, m_start + 1) // block_n * block_n
    return full_end, hi
