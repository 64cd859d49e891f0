"""Admits new requests down to the very last free block: the next decode step preempts someone at once."""


def admit_or_preempt(is_running, num_blocks_needed, num_free_blocks, watermark_blocks, num_running, max_num_seqs):
    if min(num_blocks_needed, num_free_blocks, watermark_blocks, num_running) < 0 or max_num_seqs < 1:
        raise ValueError("bad counts")
    fits = num_blocks_needed <= num_free_blocks
    if is_running:
        return "run" if fits else "preempt"
    return "admit" if fits and num_running < max_num_seqs else "wait"
