"""A softmax written by hand without subtracting each token's max: router logits past 88.7 overflow exp (inf / inf),
and a token whose logits are all below -104 divides 0 by 0."""


def route_topk(router_logits, top_k):
    if router_logits.dim() != 2 or not 1 <= top_k <= router_logits.shape[1]:
        raise ValueError("bad router_logits or top_k")
    e = router_logits.float().exp()
    weights, expert_ids = torch.topk(e / e.sum(dim=-1, keepdim=True), top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids
