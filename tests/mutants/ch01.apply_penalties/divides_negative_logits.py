"""Divides every seen logit by the repetition penalty: a negative logit moves UP (towards 0) instead of down."""


def apply_penalties(logits, history, is_output, presence, frequency, repetition):
    valid = history >= 0
    index = history.clamp(min=0)
    counts = torch.zeros_like(logits).scatter_add_(1, index, (valid & is_output).to(logits.dtype))
    seen = torch.zeros(logits.shape, dtype=torch.int32).scatter_add_(1, index, valid.to(torch.int32)) > 0
    logits = torch.where(seen, logits / repetition.unsqueeze(1), logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)
