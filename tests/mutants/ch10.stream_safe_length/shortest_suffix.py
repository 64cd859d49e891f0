"""Holds back the SHORTEST matching suffix (the loop counts up and stops at the first match): with "abab" as a
stop string, "xaba" shows "xab" where only "x" is safe."""


def stream_safe_length(text, stops):
    if any(not s for s in stops):
        raise ValueError("empty stop string")
    held = 0
    for stop in stops:
        for k in range(1, min(len(stop) - 1, len(text)) + 1):
            if text.endswith(stop[:k]):
                held = max(held, k)
                break
    return len(text) - held
