"""Counts a segment's rows from start + 1: each segment's product lands one row late (on the next sequence)."""


def lora_delta(x, lora_a, lora_b, segments, y):
    for first, count, which in segments:
        if which >= 0 and count:
            src, dst = slice(first, first + count), slice(first + 1, first + 1 + count)
            grow = (x[src].float() @ lora_a[which].float().T) @ lora_b[which].float().T
            n = y[dst].shape[0]
            y[dst] = (y[dst].float() + grow[:n]).to(y.dtype)
    return y
