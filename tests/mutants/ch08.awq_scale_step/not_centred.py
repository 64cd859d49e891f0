"""Skips the normalisation: s = s_x^alpha, not centred on 1 (the product is kept, the scales are not AWQ's)."""


def awq_scale_step(x, weights, s_x, alpha):
    s = s_x.pow(alpha)
    return s, x / s, [w * s for w in weights]
