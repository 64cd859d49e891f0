"""Rotates the second half against the first: out = [x1*cos + x2*sin, x2*cos - x1*sin] with halves swapped."""


def apply_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x2 * c - x1 * s, x1 * c + x2 * s), dim=-1).to(x.dtype)
