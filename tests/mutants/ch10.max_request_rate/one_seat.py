"""Forgets the batch: 1 / (output_tokens * step_time_s) is a server that runs one request at a time."""


def max_request_rate(max_num_seqs, output_tokens, step_time_s):
    if max_num_seqs < 1 or output_tokens <= 0 or step_time_s <= 0:
        raise ValueError("bad arguments")
    return 1.0 / (output_tokens * step_time_s)
