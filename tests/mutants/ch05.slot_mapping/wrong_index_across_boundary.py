"""Indexes the block table by position // (block_size + 1): right inside the first block, wrong after a boundary."""


def slot_mapping(block_table, start, end, block_size):
    if not 0 <= start <= end or end > len(block_table) * block_size:
        raise ValueError(f"bad range {start}..{end}")
    return [block_table[p // (block_size + 1)] * block_size + p % block_size for p in range(start, end)]
