"""Lets EOS through in every state, so the output may stop before the format is complete (half a JSON object)."""
import torch


def token_mask(transitions, accepting, state, token_bytes, eos_token_ids):
    out = torch.zeros(len(token_bytes), dtype=torch.bool)
    t = 0
    while t < len(token_bytes):
        data, s, i = token_bytes[t], state, 0
        while i < len(data) and s >= 0:
            s = transitions[s][data[i]]
            i += 1
        out[t] = len(data) > 0 and s >= 0
        t += 1
    out[[e for e in eos_token_ids if 0 <= e < len(out)]] = True
    return out
