"""Reads the weights once per sequence of the batch: batching would then never make decode cheaper."""


def decode_step_floor_s(weight_bytes, kv_bytes_per_token, context_lens, bandwidth):
    if not context_lens or min(context_lens) < 0 or weight_bytes < 0 or kv_bytes_per_token < 0 or bandwidth <= 0:
        raise ValueError("bad arguments")
    return (weight_bytes * len(context_lens) + kv_bytes_per_token * sum(context_lens)) / bandwidth
