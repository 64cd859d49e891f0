"""Multiplies by 1 / s instead of dividing by s: one rounding more, so a weight a hair from a half step lands on
the other code (the docstring: divide as written)."""


def quantize_per_group(weight, bits, group_size, symmetric):
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    w = weight.float().reshape(out_f, in_f // g, g)
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = (w.abs().amax(dim=-1) / qmax).clamp(min=tiny)
        codes = torch.round(w * (1 / scale[..., None])).clamp(-qmax - 1, qmax).to(torch.int8)
        return codes.reshape(out_f, in_f), scale, None
    qmax = (1 << bits) - 1
    lo, hi = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=tiny)
    zero = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    codes = (torch.round(w * (1 / scale[..., None])) + zero[..., None]).clamp(0, qmax).to(torch.uint8)
    return codes.reshape(out_f, in_f), scale, zero
