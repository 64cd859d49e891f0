"""Scatters into the receiver's blocks in sorted order instead of the block table's order."""


def scatter_kv_blocks(pool, block_ids, packed):
    pool.index_copy_(2, block_ids.sort().values, packed)
