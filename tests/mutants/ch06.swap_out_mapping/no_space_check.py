"""Zips without checking the swap space: with too few CPU blocks the tail of the sequence is silently lost."""


def swap_out_mapping(block_table, free_cpu_blocks):
    return list(zip(block_table, free_cpu_blocks))
