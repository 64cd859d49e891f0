"""A finished sequence keeps its blocks: the references are dropped but nothing is handed back as free."""


def free_blocks(block_table, ref_counts):
    for block in block_table:
        if ref_counts[block] < 1:
            raise ValueError(f"double free of block {block}")
    for block in reversed(block_table):
        ref_counts[block] -= 1
    return []
