"""Packing a request's KV blocks for the trip from the prefill worker to the decode worker (chapter 11).

Prefill/decode disaggregation (minillm.parallel.disagg) computes a prompt on one worker and decodes it on
another, so the prompt's keys and values must travel. In the sender's paged pool they sit in scattered blocks
(the prefill side's block table, say [7, 2, 9]); the receiver's block manager gives the request other blocks
([0, 5, 3]). The wire format is neither: the blocks in *logical* order, packed into one contiguous tensor

    packed[:, :, j] = pool[:, :, block_table[j]]      shape [2, num_layers, n_blocks, block_size, kv_heads, head_dim]

one message per request (one send instead of 2 x layers x n_blocks small ones: every message costs a round of
latency, and NCCL and gloo both move one large buffer near their peak bandwidth). The receiver scatters it back:
`pool[:, :, its_block_table[j]] = packed[:, :, j]`. The pool is the engine's single KV allocation
(minillm.engine.kv_cache: [2, num_layers, num_blocks, block_size, kv_heads, head_dim]), so both are one indexing
expression over every layer at once.

What crosses the wire is whole blocks: a prompt of P tokens sends ceil(P / block_size) blocks, the unfilled tail
of the last one included (it is cheaper to send a few unused slots than to cut a block). `kv_transfer_bytes`
is that analytic count; the tests hold the bytes actually sent to it.

The gather and the scatter themselves are course exercises (ch11.pack_kv_blocks, ch11.unpack_kv_blocks), reached
through `dispatch` from the checked entry points pack_kv_blocks / unpack_kv_blocks.
"""
from __future__ import annotations

import torch

from minillm.hooks import dispatch

KV_POOL_DIMS = 6  # [2, num_layers, num_blocks, block_size, kv_heads, head_dim]


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor viewed as uint8 (the same bytes), any other tensor as it is: an fp8 KV cache (1-byte
    floats) moves as raw bytes, since indexing kernels and the gloo wire do not all know the fp8 types."""
    return t.view(torch.uint8) if t.is_floating_point() and t.element_size() == 1 else t


def _check_pool(pool: torch.Tensor) -> None:
    if not isinstance(pool, torch.Tensor) or pool.dim() != KV_POOL_DIMS or pool.shape[0] != 2:
        shape = tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
        raise ValueError(f"the KV pool must be a tensor [2, num_layers, num_blocks, block_size, kv_heads, "
                         f"head_dim], got {shape}")


def _block_index(pool: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    num_blocks = pool.shape[2]
    if not block_ids:
        raise ValueError("block_ids is empty: a request holds at least one block")
    bad = [b for b in block_ids if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"block ids {bad[:5]} are outside [0, {num_blocks}) (the pool's blocks)")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError(f"block ids {block_ids} repeat a block: a block table never holds one block twice")
    return torch.tensor(block_ids, dtype=torch.long, device=pool.device)


# >>> exercise ch11.pack_kv_blocks
def gather_kv_blocks(pool: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Pack a request's KV blocks for the wire: a new contiguous tensor [2, num_layers, n, block_size, kv_heads,
    head_dim] whose logical block j is physical block block_ids[j] of `pool` [2, num_layers, num_blocks, ...],
    K and V of every layer at once. block_ids (int64 [n]) is the request's block table: in logical order, not
    sorted, each block once. The result shares no memory with the pool (the sender frees and reuses its blocks
    once the message is sent), and the pool is not changed.

    Example: block_ids [7, 2, 9] -> out[:, :, 0] is pool[:, :, 7], out[:, :, 1] is pool[:, :, 2], ...
    """
    # >>> solution
    return pool.index_select(2, block_ids)  # a gather along the blocks dimension: a new tensor, in table order
    # <<< solution
# <<< exercise


# >>> exercise ch11.unpack_kv_blocks
def scatter_kv_blocks(pool: torch.Tensor, block_ids: torch.Tensor, packed: torch.Tensor) -> None:
    """Unpack a received message into the receiver's pool, in place: logical block j of `packed` (gather_kv_blocks'
    layout [2, num_layers, n, block_size, kv_heads, head_dim]) lands in physical block block_ids[j] (int64 [n],
    the receiver's own block table for the request, each block once). Every other block is left as it was.

    Example: block_ids [0, 5, 3] -> pool[:, :, 5] becomes packed[:, :, 1].
    """
    # >>> solution
    pool.index_copy_(2, block_ids, packed)
    # <<< solution
# <<< exercise


def pack_kv_blocks(pool: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """The K and V of blocks `block_ids` (a block table, in logical order) of `pool`, gathered into one new
    contiguous tensor [2, num_layers, len(block_ids), block_size, kv_heads, head_dim] (gather_kv_blocks, checked).
    The pool is not changed, and the result shares no memory with it."""
    _check_pool(pool)
    index = _block_index(pool, block_ids)
    packed = dispatch("ch11.pack_kv_blocks", gather_kv_blocks)(as_bytes(pool), index)
    expected = (*pool.shape[:2], len(block_ids), *pool.shape[3:])
    if tuple(packed.shape) != expected:
        raise ValueError(f"gather_kv_blocks returned shape {tuple(packed.shape)}, expected {expected}")
    return packed.contiguous().view(pool.dtype)


def unpack_kv_blocks(pool: torch.Tensor, block_ids: list[int], packed: torch.Tensor) -> None:
    """Scatter `packed` (pack_kv_blocks' layout) into blocks `block_ids` of `pool`, in place: logical block j
    of the request lands in physical block block_ids[j] (scatter_kv_blocks, checked). Every other block of the
    pool is left as it was."""
    _check_pool(pool)
    index = _block_index(pool, block_ids)
    expected = (*pool.shape[:2], len(block_ids), *pool.shape[3:])
    if tuple(packed.shape) != expected:
        raise ValueError(f"packed KV has shape {tuple(packed.shape)}, expected {expected} for {len(block_ids)} "
                         f"block(s) of this pool")
    if packed.dtype != pool.dtype:
        raise ValueError(f"packed KV is {packed.dtype}, the pool is {pool.dtype}: both sides must use one dtype")
    dispatch("ch11.unpack_kv_blocks", scatter_kv_blocks)(as_bytes(pool), index, as_bytes(packed.to(pool.device)))


def packed_kv_shape(pool: torch.Tensor, num_blocks: int) -> tuple[int, ...]:
    """The shape of `num_blocks` packed blocks of this pool (what a receiver allocates before the recv)."""
    _check_pool(pool)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
    return (*pool.shape[:2], num_blocks, *pool.shape[3:])


def kv_transfer_bytes(num_tokens: int, block_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype) -> int:
    """Bytes one request's KV transfer carries: 2 (K and V) x layers x tokens rounded up to whole blocks x
    kv_heads x head_dim x bytes per element."""
    for name, value in (("num_tokens", num_tokens), ("block_size", block_size), ("num_layers", num_layers),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    slots = -(-num_tokens // block_size) * block_size
    return 2 * num_layers * slots * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
