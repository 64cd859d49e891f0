"""Treats top_k = -1 as 'keep the top -1', which empties the row instead of keeping it whole."""


def top_k_filter(logits, top_k):
    vocab = logits.shape[-1]
    _, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab).expand_as(logits)
    remove_sorted = ranks >= top_k.clamp(min=1).unsqueeze(-1)
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))
