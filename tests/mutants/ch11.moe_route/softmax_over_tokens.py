"""Takes the softmax over the tokens (dim 0) instead of over the experts."""


def route_topk(router_logits, top_k):
    if router_logits.dim() != 2 or not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError("bad router_logits or top_k")
    probs = F.softmax(router_logits.float(), dim=0)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids
