"""Searches only the characters this step added: a stop string whose first characters came in an earlier step
("...ST" then "OP") is never found."""


def find_stop_string(text, stops, new_text_len):
    if not 0 <= new_text_len <= len(text) or any(not s for s in stops):
        raise ValueError("bad arguments")
    start = len(text) - new_text_len
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1
