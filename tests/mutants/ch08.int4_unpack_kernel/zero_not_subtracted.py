"""Returns the code itself, forgetting the zero point z."""


@triton.jit
def int4_unpack(w_lo, w_hi, z, I: tl.constexpr):
    if I < 4:
        c = (w_lo >> (4 * (I % 4))) & 0xF
    else:
        c = (w_hi >> (4 * (I % 4))) & 0xF
    return c.to(tl.float32)
