"""Packs the blocks in physical (sorted) order instead of the block table's logical order."""


def gather_kv_blocks(pool, block_ids):
    return pool.index_select(2, block_ids.sort().values)
