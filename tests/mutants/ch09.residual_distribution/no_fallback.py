"""Divides by the leftover mass even when p == q: 0 / 0 gives a row of nan."""


def residual_distribution(p, q):
    residual = (p - q).clamp_min(0)
    return residual / residual.sum(dim=-1, keepdim=True)
