"""Releases the table from its first block to its last: an eviction would then take a prefix's start first."""


def free_blocks(block_table, ref_counts):
    for block in block_table:
        if ref_counts[block] < 1:
            raise ValueError(f"double free of block {block}")
    freed = []
    for block in block_table:
        ref_counts[block] -= 1
        if ref_counts[block] == 0:
            freed.append(block)
    return freed
