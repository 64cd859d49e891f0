"""Skips the softmax: renormalises the raw top-k logits (which can be negative) instead of probabilities."""


def route_topk(router_logits, top_k):
    if router_logits.dim() != 2 or not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError("bad router_logits or top_k")
    weights, expert_ids = torch.topk(router_logits.float(), top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids
