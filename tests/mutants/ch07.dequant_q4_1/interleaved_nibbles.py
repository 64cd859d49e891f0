"""Reads the nibbles as interleaved pairs (byte j = elements 2j, 2j + 1), not low half then high half."""


def dequantize_q4_1(raw):
    blocks = raw.view(-1, 20)
    d = blocks[:, 0:2].contiguous().view(torch.float16).to(torch.float32)
    m = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    qs = blocks[:, 4:]
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 32).to(torch.float32)
    return (q * d + m).reshape(-1)
