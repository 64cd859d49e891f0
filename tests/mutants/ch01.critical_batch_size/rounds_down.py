"""Rounds the batch down: the returned batch is still (just) below the ridge point, so still memory-bound."""


def critical_batch_size(peak_flops, bandwidth, bytes_per_param):
    if min(peak_flops, bandwidth, bytes_per_param) <= 0:
        raise ValueError("arguments must be > 0")
    return max(1, int(peak_flops / bandwidth * bytes_per_param / 2))
