"""Takes max|W_j| over the first weight only (q_proj), not over every weight that reads X (q, k and v)."""


def smoothquant_scale(act_absmax, weights, alpha):
    w_max = weights[0].float().abs().amax(dim=0).clamp(min=1e-5)
    x_max = act_absmax.float().clamp(min=1e-5)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
