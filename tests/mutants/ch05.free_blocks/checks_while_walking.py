"""Checks each block for a double free only when the walk reaches it: blocks after it in the walk (nearer the
table's end) have already lost a reference when the ValueError is raised, so a rejected call changes counts."""


def free_blocks(block_table, ref_counts):
    freed = []
    for block in reversed(block_table):
        if ref_counts[block] < 1:
            raise ValueError(f"block {block} has ref count {ref_counts[block]} (double free?)")
        ref_counts[block] -= 1
        if ref_counts[block] == 0:
            freed.append(block)
    return freed
