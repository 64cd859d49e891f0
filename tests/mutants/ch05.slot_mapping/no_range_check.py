"""Right slots, but an out-of-range request fails with an IndexError (or silently) instead of a ValueError."""


def slot_mapping(block_table, start, end, block_size):
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
