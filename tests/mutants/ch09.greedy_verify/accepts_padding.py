"""Ignores num_draft_tokens: a padding position that happens to match the target is accepted."""


def greedy_accept(target_token_ids, draft_token_ids, num_draft_tokens):
    batch, width = draft_token_ids.shape
    match = draft_token_ids == target_token_ids[:, :width]
    n = match.long().cumprod(dim=1).sum(dim=1)
    out = torch.full((batch, width + 1), -1, dtype=torch.int64)
    out[:, :width] = torch.where(torch.arange(width) < n.unsqueeze(-1), draft_token_ids.long(), -1)
    out[torch.arange(batch), n] = target_token_ids.gather(1, n.unsqueeze(-1)).squeeze(-1).long()
    return out
