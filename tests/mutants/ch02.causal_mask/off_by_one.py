"""Strict inequality: a query cannot see its own key."""


def causal_mask(q_len, kv_len, device=None):
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    cols = torch.arange(kv_len, device=device).unsqueeze(0)
    return cols < rows + (kv_len - q_len)
