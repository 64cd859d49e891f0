"""Counts the keys and forgets the values: half the cache."""


def kv_cache_bytes(num_layers, num_kv_heads, head_dim, bytes_per_element, num_tokens):
    if min(num_layers, num_kv_heads, head_dim) < 1 or num_tokens < 0 or bytes_per_element <= 0:
        raise ValueError("bad sizes")
    return num_layers * num_kv_heads * head_dim * bytes_per_element * num_tokens
