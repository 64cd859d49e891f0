"""Multiplies the activations by s as well: (x s)(W s)^T is no longer x W^T."""


def awq_scale_step(x, weights, s_x, alpha):
    s = s_x.pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s, x * s, [w * s for w in weights]
