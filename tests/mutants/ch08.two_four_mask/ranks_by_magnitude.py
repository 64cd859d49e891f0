"""Ranks by |score| instead of score: a large negative score is kept over a small positive one (the scores are
importances already; Wanda's are products of magnitudes, but the function keeps the n highest values)."""


def nm_mask(scores, n, m):
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    keep = groups.abs().topk(n, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, keep, True)
    return mask.reshape(scores.shape)
