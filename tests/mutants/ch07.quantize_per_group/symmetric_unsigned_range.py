"""The symmetric grid divides max|w| by 2^b - 1 (the unsigned range): half the levels are never used."""


def quantize_per_group(weight, bits, group_size, symmetric):
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    w = weight.float().reshape(out_f, in_f // g, g)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = (1 << bits) - 1
        scale = (w.abs().amax(dim=-1) / qmax).clamp(min=tiny)
        half = (1 << (bits - 1)) - 1
        codes = torch.round(w / scale[..., None]).clamp(-half - 1, half).to(torch.int8)
        return codes.reshape(out_f, in_f), scale, None
    qmax = (1 << bits) - 1
    lo = w.amin(dim=-1).clamp(max=0.0)
    hi = w.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=tiny)
    zero = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    codes = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, qmax).to(torch.uint8)
    return codes.reshape(out_f, in_f), scale, zero
