"""Walks the block table from its end (as freeing does): the swapped-in table comes back in reverse order."""


def swap_out_mapping(block_table, free_cpu_blocks):
    if len(free_cpu_blocks) < len(block_table):
        raise ValueError("not enough CPU blocks")
    return list(zip(reversed(block_table), free_cpu_blocks))
