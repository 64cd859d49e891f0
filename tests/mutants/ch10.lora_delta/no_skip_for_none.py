"""Treats slot -1 as an index: the sequences without an adapter get the last slot's product (Python's a[-1])."""


def lora_delta(x, lora_a, lora_b, segments, y):
    for first, count, which in segments:
        part = slice(first, first + count)
        grow = (x[part].float() @ lora_a[which].float().T) @ lora_b[which].float().T
        y[part] = (y[part].float() + grow).to(y.dtype)
    return y
