"""Searches every stop string from the start the LONGEST one needs: a short stop string that ends in the old text
(before the new characters) is reported again."""


def find_stop_string(text, stops, new_text_len):
    if not 0 <= new_text_len <= len(text) or any(not s for s in stops):
        raise ValueError("bad arguments")
    if not stops:
        return -1
    start = max(len(text) - new_text_len - max(len(s) for s in stops) + 1, 0)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1
