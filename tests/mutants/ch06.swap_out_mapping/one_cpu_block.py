"""Sends every device block to the first free CPU block: each copy overwrites the previous one."""


def swap_out_mapping(block_table, free_cpu_blocks):
    if len(free_cpu_blocks) < len(block_table):
        raise ValueError("not enough CPU blocks")
    return [(block, free_cpu_blocks[0]) for block in block_table]
