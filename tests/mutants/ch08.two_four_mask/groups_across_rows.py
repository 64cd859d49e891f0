"""Forms the groups of m down the first dim (m consecutive rows of one column), not along the last dim."""


def nm_mask(scores, n, m):
    flat = scores.reshape(-1, scores.shape[-1]).T.reshape(-1)
    if flat.numel() % m:
        raise ValueError("cannot group")
    groups = flat.reshape(-1, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(scores.shape[-1], -1).T.reshape(scores.shape)
