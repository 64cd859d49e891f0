"""At the first mismatch it emits the rejected draft token instead of the target's correction."""


def greedy_accept(target_token_ids, draft_token_ids, num_draft_tokens):
    batch, width = draft_token_ids.shape
    positions = torch.arange(width)
    match = (draft_token_ids == target_token_ids[:, :width]) & (positions < num_draft_tokens.unsqueeze(-1))
    n = match.long().cumprod(dim=1).sum(dim=1)
    out = torch.full((batch, width + 1), -1, dtype=torch.int64)
    out[:, :width] = torch.where(positions < n.unsqueeze(-1), draft_token_ids.long(), -1)
    padded = torch.cat([draft_token_ids.long(), target_token_ids[:, -1:].long()], dim=1)
    rejected = n < num_draft_tokens
    last = torch.where(rejected, padded.gather(1, n.unsqueeze(-1)).squeeze(-1),
                       target_token_ids.gather(1, n.unsqueeze(-1)).squeeze(-1).long())
    out[torch.arange(batch), n] = last
    return out
