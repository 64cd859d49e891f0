"""Frees every block of the table, even one another sequence (a fork, a prefix-cache hit) still holds."""


def free_blocks(block_table, ref_counts):
    for block in block_table:
        if ref_counts[block] < 1:
            raise ValueError(f"double free of block {block}")
    freed = []
    for block in reversed(block_table):
        ref_counts[block] = 0
        freed.append(block)
    return freed
