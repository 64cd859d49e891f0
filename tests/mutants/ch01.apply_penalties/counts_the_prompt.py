"""Counts prompt tokens for frequency and presence too (they penalize generated tokens only)."""


def apply_penalties(logits, history, is_output, presence, frequency, repetition):
    valid = history >= 0
    index = history.clamp(min=0)
    counts = torch.zeros_like(logits).scatter_add_(1, index, valid.to(logits.dtype))
    seen = counts > 0
    r = repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)
