"""Subtracts the presence penalty once per occurrence, like the frequency penalty (it applies once per token)."""


def apply_penalties(logits, history, is_output, presence, frequency, repetition):
    valid = history >= 0
    index = history.clamp(min=0)
    counts = torch.zeros_like(logits).scatter_add_(1, index, (valid & is_output).to(logits.dtype))
    seen = torch.zeros(logits.shape, dtype=torch.int32).scatter_add_(1, index, valid.to(torch.int32)) > 0
    r = repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - (frequency + presence).unsqueeze(1) * counts
