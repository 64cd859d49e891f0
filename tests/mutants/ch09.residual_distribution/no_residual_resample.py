"""Skips the residual: after a rejection it samples the target's p again (the rejected token's mass counts twice)."""


def residual_distribution(p, q):
    return p.clone()
