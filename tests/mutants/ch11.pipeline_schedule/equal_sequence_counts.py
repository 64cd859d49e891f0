"""Cuts by sequence counts (ceil(num_seqs / n) each), blind to how many tokens each sequence brings."""


def micro_batch_bounds(query_lens, num_micro_batches):
    if num_micro_batches < 1 or not query_lens:
        raise ValueError("need num_micro_batches >= 1 and at least one sequence")
    num_seqs = len(query_lens)
    n = min(num_micro_batches, num_seqs)
    base, extra = divmod(num_seqs, n)
    bounds = [0]
    for m in range(n):
        bounds.append(bounds[-1] + base + (m < extra))
    return bounds
