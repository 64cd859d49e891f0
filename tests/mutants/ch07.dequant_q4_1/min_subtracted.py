"""Subtracts the block minimum (w = q * d - m) instead of adding it."""


def dequantize_q4_1(raw):
    blocks = raw.view(-1, 20)
    d = blocks[:, 0:2].contiguous().view(torch.float16).to(torch.float32)
    m = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    qs = blocks[:, 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.float32)
    return (q * d - m).reshape(-1)
