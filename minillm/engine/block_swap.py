"""Swap space: a preempted sequence's KV blocks parked in CPU memory and brought back (chapter 6, preemption by swap).

BlockManager's swapping half. Under memory pressure the scheduler may preempt a running sequence by *swapping* it
out (vLLM's preemption_mode="swap") instead of recomputing it later: its device blocks are copied into free CPU
blocks (the pinned pool EngineConfig.swap_space sizes), released on the device (cached ones stay hit-able), and
its block table is empty until swap_in gives it fresh device blocks and copies the K/V back. The copies themselves
are the runner's: these methods return (source, destination) pairs, swap-outs run before swap-ins in a step. Which
CPU blocks a swap-out takes is the course's exercise ch06.swap_out_mapping (block_table.py).

Reads and writes BlockManager's state: `_on_device` and `_cpu_tables` (which sequences live where),
`free_cpu_block_ids`, `_num_offered`, and its block-taking and releasing methods. A sliding window's released entries
(NULL_BLOCK, block_window.py) are not copied: the CPU table keeps them, so that swap-in rebuilds the same layout.
"""
from __future__ import annotations

from collections import deque

from minillm.engine.block_table import swap_out_mapping
from minillm.engine.block_window import NULL_BLOCK, held_blocks, num_released
from minillm.engine.sequence import Sequence
from minillm.hooks import dispatch


class SwapSpace:
    """Mixed into BlockManager: moving a whole sequence's blocks between the device pool and the CPU swap pool."""

    def can_swap_out(self, seq: Sequence) -> bool:
        return seq.seq_id in self._on_device and len(held_blocks(seq.block_table)) <= self.num_free_cpu_blocks

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move seq's blocks to CPU memory: returns (device_block, cpu_block) copies; its device blocks are
        released (cached ones stay hit-able) and seq.block_table is empty until swap_in."""
        if not self.can_swap_out(seq):
            raise RuntimeError(f"cannot swap out sequence {seq.seq_id}: {len(held_blocks(seq.block_table))} blocks, "
                               f"{self.num_free_cpu_blocks} free CPU blocks")
        self.mark_computed(seq)
        released, held = num_released(seq.block_table), held_blocks(seq.block_table)
        mapping = dispatch("ch06.swap_out_mapping", swap_out_mapping)(list(held), list(self.free_cpu_block_ids))
        used = {cpu for _, cpu in mapping}
        self.free_cpu_block_ids = deque(c for c in self.free_cpu_block_ids if c not in used)
        self._release(held)
        self._cpu_tables[seq.seq_id] = [NULL_BLOCK] * released + [cpu for _, cpu in mapping]
        del self._on_device[seq.seq_id]
        self._num_offered[seq.seq_id] = 0  # its blocks will be new ones: offer them again once back
        seq.block_table = []
        return mapping

    def can_swap_in(self, seq: Sequence, num_new_tokens: int = 0) -> bool:
        """Could seq come back and then compute num_new_tokens more tokens, leaving the watermark free?"""
        if seq.seq_id not in self._cpu_tables:
            return False
        return self.num_free_blocks - self.num_blocks_to_swap_in(seq, num_new_tokens) >= self.watermark_blocks

    def num_blocks_to_swap_in(self, seq: Sequence, num_new_tokens: int = 0) -> int:
        """Free blocks seq needs to come back from CPU and then compute num_new_tokens more tokens."""
        if seq.seq_id not in self._cpu_tables:
            raise ValueError(f"sequence {seq.seq_id} is not swapped out")
        table = self._cpu_tables[seq.seq_id]
        released = num_released(table)
        return max(len(table), self.blocks_needed(seq.num_computed_tokens + num_new_tokens)) - released

    def swap_in(self, seq: Sequence) -> list[tuple[int, int]]:
        """Bring seq's blocks back from CPU into fresh device blocks: returns (cpu_block, device_block) copies.
        Its CPU blocks are free again at once, so do not swap anything out later in the same step (the
        scheduler never does: it swaps in only in steps without preemption)."""
        cpu_table = self._cpu_tables.get(seq.seq_id)
        if cpu_table is None:
            raise ValueError(f"sequence {seq.seq_id} is not swapped out")
        released, held = num_released(cpu_table), held_blocks(cpu_table)
        if len(held) > self.num_free_blocks:
            raise RuntimeError(f"swap_in needs {len(held)} free blocks, {self.num_free_blocks} are free")
        del self._cpu_tables[seq.seq_id]
        mapping = [(cpu, self._take_block()) for cpu in held]
        self.free_cpu_block_ids.extend(held)
        seq.block_table = [NULL_BLOCK] * released + [dev for _, dev in mapping]
        self._on_device[seq.seq_id] = seq
        return mapping
