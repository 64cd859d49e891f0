"""Lets the earlier occurrence end before the suffix starts (no overlap): a repeated pattern's own repetition is
missed, and a shorter n matches instead."""


def propose_prompt_lookup(token_ids, num_speculative_tokens, max_n=3, min_n=1):
    if num_speculative_tokens < 1 or not 1 <= min_n <= max_n:
        raise ValueError("bad arguments")
    tokens = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids)
    if tokens.dim() != 1:
        raise ValueError("token_ids must be 1-D")
    ids, length = tokens.tolist(), tokens.shape[0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = ids[length - n:]
        for start in range(length - 2 * n, -1, -1):
            if ids[start:start + n] == suffix:
                return ids[start + n:start + n + num_speculative_tokens]
    return []
