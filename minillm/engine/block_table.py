"""Block-table arithmetic: the pure functions under the paged block manager (chapters 5 and 6).

The block manager (block_manager.py) is bookkeeping around a few small calculations, kept here as plain
functions over lists and ints so that each can be read, tested and rewritten on its own (they are course
exercises; the manager calls them through `dispatch`, so a learner's version runs inside the real engine):

    slot_mapping       token positions -> cache slots through a block table        (ch05)
    blocks_to_append   how many blocks a sequence must take to grow by n tokens     (ch05)
    free_blocks        drop a sequence's references; which blocks became free       (ch05)
    swap_out_mapping   pair a preempted sequence's device blocks with CPU blocks    (ch06)
"""
from __future__ import annotations


# >>> exercise ch05.slot_mapping
def slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of token positions start..end-1 of a sequence whose logical block j is physical block
    block_table[j].

    The KV cache is one flat array of num_blocks * block_size slots. Token position p lives in logical block
    p // block_size, at offset p % block_size inside it; the block table says which physical block that is.
    So its slot is block_table[p // block_size] * block_size + p % block_size. Positions next to each other
    are next to each other in memory only inside a block: crossing a block boundary jumps to wherever the
    next physical block happens to be.

    Example: block_size 16, block_table [7, 2]: positions 15, 16, 17 -> slots 127, 32, 33.
    Raise ValueError if 0 <= start <= end does not hold, or end needs more blocks than the table has.
    """
    # >>> solution
    if not 0 <= start <= end:
        raise ValueError(f"positions must satisfy 0 <= start <= end, got start={start}, end={end}")
    if end > len(block_table) * block_size:
        raise ValueError(f"position {end - 1} needs block {(end - 1) // block_size}, but the block table has "
                         f"{len(block_table)} blocks of {block_size}")
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
    # <<< solution
# <<< exercise


# >>> exercise ch05.blocks_to_append
def blocks_to_append(num_tokens_now: int, num_new_tokens: int, num_blocks_held: int, block_size: int) -> int:
    """How many more blocks a sequence must take so that its block table covers num_tokens_now +
    num_new_tokens token positions, when it already holds num_blocks_held blocks of block_size slots.

    A block is taken only when a token first lands in it: n tokens need ceil(n / block_size) blocks, so
    the 16th token of a block_size-16 sequence needs no new block and the 17th needs one. The same formula
    serves a new prompt (num_tokens_now = 0, num_blocks_held = 0), a prefill chunk and a decode step.
    A table may already hold more blocks than needed (a prompt is allocated whole, then computed in
    chunks): then nothing is taken, never a negative number.

    Example: block_size 16, 16 tokens in 1 block: +1 token -> 1, +0 -> 0; 0 tokens, 0 blocks, +33 -> 3.
    Raise ValueError if a count is negative or block_size < 1.
    """
    # >>> solution
    if num_tokens_now < 0 or num_new_tokens < 0 or num_blocks_held < 0 or block_size < 1:
        raise ValueError(f"need counts >= 0 and block_size >= 1, got num_tokens_now={num_tokens_now}, "
                         f"num_new_tokens={num_new_tokens}, num_blocks_held={num_blocks_held}, block_size={block_size}")
    blocks_needed = -(-(num_tokens_now + num_new_tokens) // block_size)  # ceiling division
    return max(0, blocks_needed - num_blocks_held)
    # <<< solution
# <<< exercise


# >>> exercise ch05.free_blocks
def free_blocks(block_table: list[int], ref_counts: list[int]) -> list[int]:
    """Drop a finished (or preempted) sequence's hold on its blocks; return the blocks nobody holds any more.

    ref_counts[b] is how many block tables hold physical block b (a forked sequence, or a request that hit
    a cached prefix, shares blocks). Decrement it, in place, once for every block of block_table, walking
    the table from its LAST block to its first; a block whose count reaches 0 is free again and goes into
    the returned list, in that order. A block still held by another table is not free.

    Why tail first: the caller keeps freed prefix-cached blocks in least-recently-freed order, so when it
    must evict, it takes the end of a prefix before its start (a later request can still hit the start).
    Raise ValueError (and change nothing) if a block of the table has ref_counts[b] < 1: a double free.

    Example: block_table [4, 7], ref_counts[4] = 2, ref_counts[7] = 1 -> returns [7]; counts become 1 and 0.
    """
    # >>> solution
    bad = [b for b in block_table if ref_counts[b] < 1]
    if bad:
        raise ValueError(f"block {bad[0]} has ref count {ref_counts[bad[0]]}; a held block has a count >= 1 "
                         f"(double free?)")
    freed = []
    for block in reversed(block_table):
        ref_counts[block] -= 1
        if ref_counts[block] == 0:
            freed.append(block)
    return freed
    # <<< solution
# <<< exercise


# >>> exercise ch06.swap_out_mapping
def swap_out_mapping(block_table: list[int], free_cpu_blocks: list[int]) -> list[tuple[int, int]]:
    """Where each device block of a preempted sequence goes in CPU memory: [(device_block, cpu_block), ...].

    Swapping a sequence out copies every block of its table into the CPU swap space, so that it can come
    back later without recomputing anything. Pair block_table[j] with free_cpu_blocks[j]: the free CPU
    blocks are taken from the front of the free list, in order, one per device block, and never twice.
    The pairs keep the table's order, so that swapping in can rebuild the same logical order of blocks.
    Do not modify the arguments (the caller removes the CPU blocks you used from its free list).

    Example: block_table [7, 2, 9], free_cpu_blocks [0, 3, 4, 5] -> [(7, 0), (2, 3), (9, 4)].
    Raise ValueError if there are fewer free CPU blocks than blocks to move.
    """
    # >>> solution
    if len(free_cpu_blocks) < len(block_table):
        raise ValueError(f"swapping out {len(block_table)} blocks needs as many free CPU blocks, "
                         f"only {len(free_cpu_blocks)} are free")
    return [(block, cpu) for block, cpu in zip(block_table, free_cpu_blocks)]
    # <<< solution
# <<< exercise
