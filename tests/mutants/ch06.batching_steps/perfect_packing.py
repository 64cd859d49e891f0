"""Continuous batching as perfect packing, ceil(total tokens / max_batch): ignores that one long request alone
sets a floor (it decodes one token per step however empty the batch is)."""


def batching_steps(output_lens, max_batch, continuous):
    if max_batch < 1 or any(n < 1 for n in output_lens):
        raise ValueError("bad arguments")
    if not continuous:
        return sum(max(output_lens[i:i + max_batch]) for i in range(0, len(output_lens), max_batch))
    return -(-sum(output_lens) // max_batch)
