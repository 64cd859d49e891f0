"""Keeps a token only while the mass INCLUDING it stays below top_p: the token that crosses is lost."""


def top_p_filter(logits, top_p):
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    remove_sorted = probs.cumsum(-1) >= top_p.unsqueeze(-1)
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))
