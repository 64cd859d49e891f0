"""No lower bound on the scale: an all-zero row gives 0 / 0 = nan."""


def scaled_fp8_quant(x, amax, fp8_dtype=torch.float8_e4m3fn):
    fp8_max = torch.finfo(fp8_dtype).max
    scale = amax.float() / fp8_max
    return (x.float() / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype), scale
