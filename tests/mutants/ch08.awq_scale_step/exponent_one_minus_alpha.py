"""Uses s_x^(1 - alpha): alpha = 0 scales fully instead of not at all."""


def awq_scale_step(x, weights, s_x, alpha):
    s = s_x.pow(1 - alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s, x / s, [w * s for w in weights]
