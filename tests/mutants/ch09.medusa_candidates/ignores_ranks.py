"""Every node takes its head's best guess: the ranks are ignored, so siblings all hold the same token."""


def medusa_candidates(root_token_ids, head_topk_ids, depths, ranks):
    drafts = head_topk_ids[:, depths[1:] - 1, 0]
    return torch.cat([root_token_ids.long().unsqueeze(-1), drafts.long()], dim=1)
