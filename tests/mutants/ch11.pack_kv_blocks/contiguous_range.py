"""Assumes a request's blocks are neighbours: packs n blocks starting at its first one."""


def gather_kv_blocks(pool, block_ids):
    return pool.narrow(2, int(block_ids[0]), len(block_ids)).clone()
