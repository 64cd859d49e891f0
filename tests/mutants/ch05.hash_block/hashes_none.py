"""Hashes (None, tokens) for the first block: a key that changes from one process to the next."""


def hash_block(parent_hash, token_ids):
    return hash((parent_hash, tuple(token_ids)))
