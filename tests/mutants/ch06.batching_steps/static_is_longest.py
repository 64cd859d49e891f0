"""Static batching as max(output_lens) per batch of the sorted requests: the scheduler does not sort, it takes
requests in arrival order."""


def batching_steps(output_lens, max_batch, continuous):
    if max_batch < 1 or any(n < 1 for n in output_lens):
        raise ValueError("bad arguments")
    if continuous:
        finish = []
        for n in output_lens:
            if len(finish) < max_batch:
                finish.append(n)
            else:
                start = min(finish)
                finish.remove(start)
                finish.append(start + n)
        return max(finish)
    lens = sorted(output_lens, reverse=True)
    return sum(max(lens[i:i + max_batch]) for i in range(0, len(lens), max_batch))
