"""Checks a token's first byte only: "abc" passes where the pattern is "ab", and the output leaves the format."""
import torch


def token_mask(transitions, accepting, state, token_bytes, eos_token_ids):
    mask = torch.zeros(len(token_bytes), dtype=torch.bool)
    for token, data in enumerate(token_bytes):
        mask[token] = len(data) > 0 and transitions[state][data[0]] >= 0
    eos = [t for t in eos_token_ids if 0 <= t < len(token_bytes)]
    mask[eos] = bool(accepting[state])
    return mask
