"""Flattens [heads, topk] as if it were [topk, heads]: index rank * heads + (depth - 1)."""


def medusa_candidates(root_token_ids, head_topk_ids, depths, ranks):
    batch, heads, topk = head_topk_ids.shape
    flat = ranks[1:] * heads + (depths[1:] - 1)
    drafts = head_topk_ids.reshape(batch, heads * topk).gather(1, flat.expand(batch, -1))
    return torch.cat([root_token_ids.long().unsqueeze(-1), drafts.long()], dim=1)
