"""Takes all 128 low nibbles as sub-blocks 0-3 and the high nibbles as 4-7 (Q4_1's order), not chunk by chunk."""


def dequantize_q4_k(raw):
    blocks = raw.view(-1, 144)
    d = blocks[:, 0:2].contiguous().view(torch.float16).to(torch.float32)
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    b = blocks[:, 4:16]
    lo, mid, hi = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=1).to(torch.float32)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1).to(torch.float32)
    qs = blocks[:, 16:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).reshape(-1, 8, 32).to(torch.float32)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1)
