"""Rounds the number of blocks down: a sequence whose last block is only partly filled gets no block for it."""


def blocks_to_append(num_tokens_now, num_new_tokens, num_blocks_held, block_size):
    if num_tokens_now < 0 or num_new_tokens < 0 or num_blocks_held < 0 or block_size < 1:
        raise ValueError("bad counts")
    return max(0, (num_tokens_now + num_new_tokens) // block_size - num_blocks_held)
