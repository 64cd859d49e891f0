"""Divides by the standard deviation (LayerNorm's statistic) instead of the root mean square."""


def rms_norm(x, weight, eps):
    x32 = x.float()
    var = x32.var(-1, keepdim=True, unbiased=False)
    return weight * (x32 * torch.rsqrt(var + eps)).to(x.dtype)
