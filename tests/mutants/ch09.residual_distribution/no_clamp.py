"""Forgets max(0, .): normalises p - q by its positive mass, leaving negative 'probabilities' in the row."""


def residual_distribution(p, q):
    diff = p - q
    mass = diff.clamp_min(0).sum(dim=-1, keepdim=True)
    return torch.where(mass > 1e-6, diff / mass.clamp_min(1e-6), p)
