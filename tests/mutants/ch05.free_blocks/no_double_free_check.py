"""Right for valid tables, but a double free drives a reference count below zero instead of raising."""


def free_blocks(block_table, ref_counts):
    freed = []
    for block in reversed(block_table):
        ref_counts[block] -= 1
        if ref_counts[block] == 0:
            freed.append(block)
    return freed
