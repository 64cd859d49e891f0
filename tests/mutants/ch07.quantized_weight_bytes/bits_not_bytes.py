"""Returns bits, not bytes: forgets the division by 8."""


def quantized_weight_bytes(num_params, bits, group_size, scale_bits=16, zero_bits=0):
    if num_params <= 0 or bits < 1 or group_size < 1 or scale_bits < 0 or zero_bits < 0:
        raise ValueError("bad arguments")
    return num_params * (bits + (scale_bits + zero_bits) / group_size)
