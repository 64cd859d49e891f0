"""Swaps the exponents: max|X|^(1 - alpha) / max|W|^alpha moves the difficulty the wrong way."""


def smoothquant_scale(act_absmax, weights, alpha):
    w_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp(min=1e-5)
    x_max = act_absmax.float().clamp(min=1e-5)
    return (x_max.pow(1 - alpha) / w_max.pow(alpha)).clamp(min=1e-5)
