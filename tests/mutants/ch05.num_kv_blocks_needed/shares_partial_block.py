"""Shares the prefix's partly filled last block too: but each sequence writes its own tokens after the prefix
into that block, so it cannot be shared."""


def num_kv_blocks_needed(seq_lens, block_size, shared_prefix_len=0):
    if block_size < 1 or shared_prefix_len < 0 or not seq_lens or min(seq_lens) < shared_prefix_len:
        raise ValueError("bad arguments")
    shared = -(-shared_prefix_len // block_size)
    return shared + sum(-(-n // block_size) - shared for n in seq_lens)
