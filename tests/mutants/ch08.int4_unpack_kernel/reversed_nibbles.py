"""Reads the nibbles from the most significant end: code I taken from nibble 7 - I of the word."""


@triton.jit
def int4_unpack(w_lo, w_hi, z, I: tl.constexpr):
    J: tl.constexpr = 7 - I
    if J < 4:
        c = (w_lo >> (4 * (J % 4))) & 0xF
    else:
        c = (w_hi >> (4 * (J % 4))) & 0xF
    return c.to(tl.float32) - z
