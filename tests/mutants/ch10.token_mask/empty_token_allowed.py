"""Asks only whether a token's walk survives, never whether there was a walk: a special token with no bytes (b"")
stays where it started, so it counts as allowed everywhere and "<|im_end|>" may appear in the middle of a JSON."""
import torch


def token_mask(transitions, accepting, state, token_bytes, eos_token_ids):
    def survives(data):
        current = state
        for byte in data:
            if current < 0:
                return False
            current = transitions[current][byte]
        return current >= 0

    allowed = [survives(data) for data in token_bytes]
    for eos in eos_token_ids:
        if 0 <= eos < len(allowed):
            allowed[eos] = bool(accepting[state])
    return torch.tensor(allowed, dtype=torch.bool)
