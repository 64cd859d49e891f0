"""Takes codes 0-3 from w_hi and 4-7 from w_lo: the two half-words swapped."""


@triton.jit
def int4_unpack(w_lo, w_hi, z, I: tl.constexpr):
    if I < 4:
        c = (w_hi >> (4 * (I % 4))) & 0xF
    else:
        c = (w_lo >> (4 * (I % 4))) & 0xF
    return c.to(tl.float32) - z
