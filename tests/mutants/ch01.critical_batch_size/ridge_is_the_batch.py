"""Takes the ridge point (FLOPs per byte) for the batch size: forgets that a token brings 2 FLOPs per weight of
bytes_per_param bytes."""
import math


def critical_batch_size(peak_flops, bandwidth, bytes_per_param):
    if min(peak_flops, bandwidth, bytes_per_param) <= 0:
        raise ValueError("arguments must be > 0")
    return max(1, math.ceil(peak_flops / bandwidth))
