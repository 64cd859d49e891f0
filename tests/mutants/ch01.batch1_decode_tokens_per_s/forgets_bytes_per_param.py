"""Divides the bandwidth by the parameter count alone: as if every weight were one byte, whatever its dtype."""


def batch1_decode_tokens_per_s(num_params, bytes_per_param, bandwidth):
    if min(num_params, bytes_per_param, bandwidth) <= 0:
        raise ValueError("arguments must be > 0")
    return bandwidth / num_params
