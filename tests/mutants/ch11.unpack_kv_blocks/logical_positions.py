"""Writes logical block j into physical block j, ignoring the receiver's block table."""


def scatter_kv_blocks(pool, block_ids, packed):
    pool[:, :, :packed.shape[2]] = packed
