"""Keeps every score at or above the n-th largest, counted from 1 instead of 0: 3 of every 4 survive."""


def nm_mask(scores, n, m):
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    kth = groups.sort(dim=-1, descending=True).values[..., n:n + 1]
    return (groups >= kth).reshape(scores.shape)
