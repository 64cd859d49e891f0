"""Aligns the queries with the first keys (tril without offset): right for prefill, wrong for decode."""


def causal_mask(q_len, kv_len, device=None):
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
