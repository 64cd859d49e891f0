"""The block manager's bookkeeping, checked: every rule of block_manager.py's docstring as an assertion (chapter 5).

Tests call BlockManager.check_invariants after every operation (the engine stress tests after every step): a
block is in exactly one state (free, used, evictable), reference counts equal the block tables' references, the
prefix cache's entries are current, the CPU swap pool adds up, the CPU tier's own checks hold, and a sliding window's
released entries are a leading run that no query of the sequence can still read.
"""
from __future__ import annotations

from minillm.engine.block_window import NULL_BLOCK, held_blocks, num_released


def check_block_manager(manager) -> None:
    """Raise AssertionError naming the first broken invariant of `manager`, a BlockManager (not imported here:
    block_manager.py imports this module)."""
    def require(ok: bool, what: str) -> None:
        if not ok:
            raise AssertionError(f"block manager invariant broken: {what}")

    refs = [0] * manager.num_blocks
    for seq_id, seq in manager._on_device.items():
        require(seq.seq_id == seq_id and seq_id not in manager._cpu_tables, f"seq {seq_id} both on device and CPU")
        require(len(seq.block_table) >= manager.blocks_needed(seq.num_computed_tokens),
                f"seq {seq_id} has {len(seq.block_table)} blocks for {seq.num_computed_tokens} computed tokens")
        released = num_released(seq.block_table)
        require(NULL_BLOCK not in seq.block_table[released:], f"seq {seq_id}: a released entry after a held one")
        require(released <= manager.first_kept_block(seq.num_computed_tokens),
                f"seq {seq_id}: {released} blocks released, but its window still reads from block "
                f"{manager.first_kept_block(seq.num_computed_tokens)}")
        for block in seq.block_table[released:]:
            refs[block] += 1
    require(refs == manager.ref_counts, "ref counts differ from the number of block-table references: "
            f"{[(b, r, c) for b, (r, c) in enumerate(zip(manager.ref_counts, refs)) if r != c][:5]}")
    free = list(manager.free_block_ids)
    evictable = manager.prefix_cache.evictable_blocks() if manager.prefix_cache else []
    used = [b for b in range(manager.num_blocks) if refs[b] > 0]
    require(len(set(free)) == len(free), "a block is twice in the free list")
    require(not set(free) & set(used), f"blocks both free and referenced: {set(free) & set(used)}")
    require(all(refs[b] == 0 for b in evictable), "an evictable block is referenced")
    require(not set(free) & set(evictable), "a block is both free and evictable")
    require(len(free) + len(evictable) + len(used) == manager.num_blocks, "free + evictable + used != all blocks")
    if manager.prefix_cache:
        for h, block in manager.prefix_cache.entries().items():
            require(manager.prefix_cache.block_hash_of(block) == h, f"cache entry of block {block} is stale")
        require(all(manager.prefix_cache.is_cached(b) for b in evictable), "an evictable block is not cached")
        require(not any(manager.prefix_cache.is_cached(b) for b in free), "a free-list block is still cached")
    cpu_used = [c for table in manager._cpu_tables.values() for c in held_blocks(table)]
    cpu_free = list(manager.free_cpu_block_ids)
    require(len(set(cpu_used)) == len(cpu_used), "a CPU block is held twice")
    require(sorted(cpu_used + cpu_free) == list(range(manager.num_cpu_blocks)), "CPU free + used != all CPU blocks")
    if manager.offload is not None:
        problems = manager.offload.check()
        require(not problems, "; ".join(problems))
        require(all(refs[dev] > 0 for _, dev in manager.offload.queued_loads()),
                "a device block waiting for its CPU-tier load is not held by any sequence")
