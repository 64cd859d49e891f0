"""Off by one in the proposal: starts at the last token of the match instead of the token after it."""


def propose_prompt_lookup(token_ids, num_speculative_tokens, max_n=3, min_n=1):
    if num_speculative_tokens < 1 or not 1 <= min_n <= max_n:
        raise ValueError("bad arguments")
    tokens = torch.as_tensor(list(token_ids) if not isinstance(token_ids, torch.Tensor) else token_ids)
    if tokens.dim() != 1:
        raise ValueError("token_ids must be 1-D")
    length = tokens.shape[0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        windows = tokens[:length - 1].unfold(0, n, 1)
        hits = (windows == tokens[length - n:]).all(dim=1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1]) + n - 1
            return tokens[start:start + num_speculative_tokens].tolist()
    return []
