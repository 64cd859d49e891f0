"""Expands the scales with repeat (groups tiled: column j gets group j % n_groups) instead of repeat_interleave."""


def dequantize_per_group(codes, scales, zeros, group_size):
    g = codes.shape[1] if group_size == -1 else group_size
    scale = scales.float().repeat(1, g)
    q = codes.float()
    return q * scale if zeros is None else (q - zeros.float().repeat(1, g)) * scale
