"""Asks for ceil(num_new_tokens / block_size) fresh blocks, ignoring the free slots left in the last block held
(and the blocks already held): a decode step takes a whole block every time."""


def blocks_to_append(num_tokens_now, num_new_tokens, num_blocks_held, block_size):
    if num_tokens_now < 0 or num_new_tokens < 0 or num_blocks_held < 0 or block_size < 1:
        raise ValueError("bad counts")
    return -(-num_new_tokens // block_size)
