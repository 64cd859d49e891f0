"""Counts the reduce-scatter, (N - 1) / N of the payload, and forgets the all-gather that hands the summed chunks
back to every GPU."""


def ring_allreduce_bytes(payload_bytes, world_size):
    if payload_bytes < 0 or world_size < 1:
        raise ValueError("bad arguments")
    return (world_size - 1) * payload_bytes / world_size
