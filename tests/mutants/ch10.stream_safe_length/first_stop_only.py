"""Holds back a prefix of the first stop string only: the beginning of any other one is shown, then taken back."""


def stream_safe_length(text, stops):
    if any(not s for s in stops):
        raise ValueError("empty stop string")
    if not stops:
        return len(text)
    stop = stops[0]
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return len(text) - k
    return len(text)
