"""Keeps the top-k softmax probabilities as they are: each token's weights sum to less than 1."""


def route_topk(router_logits, top_k):
    if router_logits.dim() != 2 or not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError("bad router_logits or top_k")
    probs = F.softmax(router_logits.float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1)
