"""Calls torch's own RMSNorm: correct numbers, but the exercise is to write it."""


def rms_norm(x, weight, eps):
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight
