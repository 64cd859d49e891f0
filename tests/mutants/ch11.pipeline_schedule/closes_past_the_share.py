"""Closes a micro-batch only once its running count is strictly past its share (> instead of >=)."""


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
        if groups_to_open > 0 and (acc > target * len(bounds) or left == groups_to_open):
            bounds.append(i + 1)
    bounds.append(num_seqs)
    return bounds
