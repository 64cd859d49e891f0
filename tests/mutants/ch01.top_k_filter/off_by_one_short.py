"""Keeps ranks 0..k-2: one token too few (and k = 1 keeps nothing but the first)."""


def top_k_filter(logits, top_k):
    vocab = logits.shape[-1]
    k = torch.where(top_k < 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    _, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab).expand_as(logits)
    remove_sorted = ranks >= (k - 1).clamp(min=1).unsqueeze(-1)
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))
