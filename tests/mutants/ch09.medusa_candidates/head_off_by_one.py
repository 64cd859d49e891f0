"""Reads head `depth` instead of head `depth - 1` (clamped to the last head): every guess is one position late."""


def medusa_candidates(root_token_ids, head_topk_ids, depths, ranks):
    heads = head_topk_ids.shape[1]
    drafts = head_topk_ids[:, depths[1:].clamp(max=heads - 1), ranks[1:]]
    return torch.cat([root_token_ids.long().unsqueeze(-1), drafts.long()], dim=1)
