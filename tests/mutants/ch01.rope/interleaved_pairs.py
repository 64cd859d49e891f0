"""GPT-J style: pairs adjacent channels (2i, 2i+1) instead of (i, i + D/2)."""


def apply_rotary(x, cos, sin):
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.flatten(-2).to(x.dtype)
