"""Numbers the columns from key 0 even when the first first_key keys were left out."""


def sliding_window_mask(q_len, kv_len, window, first_key=0, device=None):
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"bad window {window!r}")
    if q_len < 1 or kv_len < q_len or not 0 <= first_key <= kv_len - q_len:
        raise ValueError("bad lengths")
    pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    keys = torch.arange(0, kv_len - first_key, device=device).unsqueeze(0)
    mask = keys <= pos
    return mask if window is None else mask & (keys > pos - window)
