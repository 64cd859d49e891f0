"""Forgets the zero point: codes * scale, as if every grid were symmetric."""


def dequantize_per_group(codes, scales, zeros, group_size):
    g = codes.shape[1] if group_size == -1 else group_size
    return codes.float() * scales.float().repeat_interleave(g, dim=1)
