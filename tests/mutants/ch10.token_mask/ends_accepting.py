"""Allows only tokens that end in an accepting state: a token that leaves the output unfinished (the '{' that
opens a JSON object) is refused, so most formats can never be started."""
import torch


def token_mask(transitions, accepting, state, token_bytes, eos_token_ids):
    def end_state(data):
        s = state
        for byte in data:
            s = transitions[s][byte] if s >= 0 else -1
        return s

    ends = [end_state(data) for data in token_bytes]
    mask = torch.tensor([bool(d) and e >= 0 and bool(accepting[e]) for d, e in zip(token_bytes, ends)],
                        dtype=torch.bool)
    mask[[e for e in eos_token_ids if 0 <= e < len(token_bytes)]] = bool(accepting[state])
    return mask
