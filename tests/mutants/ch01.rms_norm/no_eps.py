"""Forgets eps: an all-zero row becomes nan, tiny rows are blown up to unit scale."""


def rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True))).to(x.dtype)
