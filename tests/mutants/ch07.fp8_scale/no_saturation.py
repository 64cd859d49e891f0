"""Casts without clamping to the format's range: e5m2 turns values beyond the static range into inf."""


def scaled_fp8_quant(x, amax, fp8_dtype=torch.float8_e4m3fn):
    fp8_max = torch.finfo(fp8_dtype).max
    scale = (amax.float() / fp8_max).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).to(fp8_dtype), scale
