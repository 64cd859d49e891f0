"""Keeps every score >= the n-th highest of its group: with ties it keeps more than n (not n:m sparse)."""


def nm_mask(scores, n, m):
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    threshold = groups.topk(n, dim=-1).values[..., -1:]
    return (groups >= threshold).reshape(scores.shape)
