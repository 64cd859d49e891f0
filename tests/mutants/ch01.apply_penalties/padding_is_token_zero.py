"""Clamps the -1 padding to 0 and counts it: token 0 is penalized once per padding entry."""


def apply_penalties(logits, history, is_output, presence, frequency, repetition):
    index = history.clamp(min=0)
    counts = torch.zeros_like(logits).scatter_add_(1, index, is_output.to(logits.dtype))
    seen = torch.zeros(logits.shape, dtype=torch.int32).scatter_add_(1, index, torch.ones_like(index, dtype=torch.int32)) > 0
    r = repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)
