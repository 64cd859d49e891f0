"""Uses the device block id as the CPU block id: two sequences' blocks can land on the same CPU block, and a
device id past the swap space does not exist there."""


def swap_out_mapping(block_table, free_cpu_blocks):
    if len(free_cpu_blocks) < len(block_table):
        raise ValueError("not enough CPU blocks")
    return [(block, block) for block in block_table]
