"""Keeps every logit >= the (k+1)-th largest: one token too many."""


def top_k_filter(logits, top_k):
    vocab = logits.shape[-1]
    k = torch.where(top_k < 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(-1, (k.clamp(max=vocab - 1)).unsqueeze(-1))  # index k is the (k+1)-th
    return logits.masked_fill(logits < kth, float("-inf"))
