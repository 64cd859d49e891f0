"""Ignores the block table past the first block: assumes the sequence's blocks are contiguous in memory."""


def slot_mapping(block_table, start, end, block_size):
    if not 0 <= start <= end or end > len(block_table) * block_size:
        raise ValueError(f"bad range {start}..{end}")
    return [block_table[0] * block_size + p for p in range(start, end)]
