"""Applies the admission watermark to running sequences too: they are preempted while free blocks remain."""


def admit_or_preempt(is_running, num_blocks_needed, num_free_blocks, watermark_blocks, num_running, max_num_seqs):
    if min(num_blocks_needed, num_free_blocks, watermark_blocks, num_running) < 0 or max_num_seqs < 1:
        raise ValueError("bad counts")
    fits = num_free_blocks - num_blocks_needed >= watermark_blocks
    if is_running:
        return "run" if fits else "preempt"
    return "admit" if fits and num_running < max_num_seqs else "wait"
