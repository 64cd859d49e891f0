"""Falls back to p only when nothing at all is left over: a row with 2e-7 of rounding noise is renormalised into
a distribution the target never had (the docstring's floor is 1e-6)."""


def residual_distribution(p, q):
    residual = (p - q).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)
