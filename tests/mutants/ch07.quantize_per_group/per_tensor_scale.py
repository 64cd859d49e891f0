"""One scale (and zero) for the whole matrix, repeated for every row and group: an outlier coarsens every weight."""


def quantize_per_group(weight, bits, group_size, symmetric):
    out_f, in_f = weight.shape
    n_groups = 1 if group_size == -1 else in_f // group_size
    w = weight.float()
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = (w.abs().amax() / qmax).clamp(min=tiny)
        codes = torch.round(w / scale).clamp(-qmax - 1, qmax).to(torch.int8)
        return codes, scale.repeat(out_f, n_groups), None
    qmax = (1 << bits) - 1
    lo, hi = w.amin().clamp(max=0.0), w.amax().clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=tiny)
    zero = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    codes = (torch.round(w / scale) + zero).clamp(0, qmax).to(torch.uint8)
    return codes, scale.repeat(out_f, n_groups), zero.repeat(out_f, n_groups)
