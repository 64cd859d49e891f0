"""Clamps the two maxima but not the result: at alpha 0 a huge weight column gives s = 1 / max|W_j| below 1e-5."""


def smoothquant_scale(act_absmax, weights, alpha):
    w_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp(min=1e-5)
    x_max = act_absmax.float().clamp(min=1e-5)
    return x_max.pow(alpha) / w_max.pow(1 - alpha)
