"""Forgets that a table may already hold more blocks than needed (a prompt allocated whole, computed in
chunks): returns a negative count instead of 0."""


def blocks_to_append(num_tokens_now, num_new_tokens, num_blocks_held, block_size):
    if num_tokens_now < 0 or num_new_tokens < 0 or num_blocks_held < 0 or block_size < 1:
        raise ValueError("bad counts")
    return -(-(num_tokens_now + num_new_tokens) // block_size) - num_blocks_held
