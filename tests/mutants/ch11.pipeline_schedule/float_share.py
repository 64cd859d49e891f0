"""Compares the running count with a float share, acc >= g * (total / n): right for small n, but 58 / 14 * 7 is
29.000000000000004, so with 58 tokens in 14 micro-batches the 7th closes one row late."""


def micro_batch_bounds(query_lens, num_micro_batches):
    if num_micro_batches < 1 or not query_lens:
        raise ValueError("need num_micro_batches >= 1 and at least one sequence")
    n = min(num_micro_batches, len(query_lens))
    share = sum(query_lens) / n  # tokens per micro-batch
    bounds, acc = [0], 0
    for i, q in enumerate(query_lens, start=1):
        acc += q
        g = len(bounds)
        if g < n and (acc >= g * share or len(query_lens) - i == n - g):
            bounds.append(i)
    return bounds + [len(query_lens)]
