"""Sorts ascending, so it accumulates the least likely tokens first."""


def top_p_filter(logits, top_p):
    sorted_logits, order = logits.sort(dim=-1)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    remove_sorted = (probs.cumsum(-1) - probs) >= top_p.unsqueeze(-1)
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))
