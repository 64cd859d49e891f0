"""Admits whenever blocks allow, even when the batch already holds max_num_seqs sequences."""


def admit_or_preempt(is_running, num_blocks_needed, num_free_blocks, watermark_blocks, num_running, max_num_seqs):
    if min(num_blocks_needed, num_free_blocks, watermark_blocks, num_running) < 0 or max_num_seqs < 1:
        raise ValueError("bad counts")
    if is_running:
        return "run" if num_blocks_needed <= num_free_blocks else "preempt"
    return "admit" if num_free_blocks - num_blocks_needed >= watermark_blocks else "wait"
