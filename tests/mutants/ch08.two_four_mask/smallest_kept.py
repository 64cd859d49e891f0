"""Keeps the n smallest scores of each group (topk with largest=False): prunes the important weights."""


def nm_mask(scores, n, m):
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    keep = groups.topk(n, dim=-1, largest=False).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, keep, True)
    return mask.reshape(scores.shape)
