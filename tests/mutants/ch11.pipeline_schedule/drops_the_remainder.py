"""Equal sequence counts of num_seqs // n per micro-batch: the sequences left over are dropped."""


def micro_batch_bounds(query_lens, num_micro_batches):
    if num_micro_batches < 1 or not query_lens:
        raise ValueError("need num_micro_batches >= 1 and at least one sequence")
    n = min(num_micro_batches, len(query_lens))
    per = len(query_lens) // n
    return [m * per for m in range(n + 1)]
