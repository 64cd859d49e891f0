"""Holds back at most one character (the last, if it begins a stop string): the second character of a longer
stop prefix is shown."""


def stream_safe_length(text, stops):
    if any(not s for s in stops):
        raise ValueError("empty stop string")
    if text and any(s[0] == text[-1] and len(s) > 1 for s in stops):
        return len(text) - 1
    return len(text)
