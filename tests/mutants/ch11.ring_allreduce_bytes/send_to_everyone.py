"""The naive all-reduce: every GPU sends its whole tensor to every other GPU, (N - 1) x payload, growing with
the number of GPUs where the ring stays under twice the payload."""


def ring_allreduce_bytes(payload_bytes, world_size):
    if payload_bytes < 0 or world_size < 1:
        raise ValueError("bad arguments")
    return (world_size - 1) * payload_bytes
