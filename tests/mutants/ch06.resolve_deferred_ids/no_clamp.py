"""Gathers previous_tokens[-id - 1] without clamping the row: a placeholder past the previous step's rows is an
IndexError (a device-side assert on a GPU) instead of a wrong but harmless token."""


def resolve_deferred_ids(input_ids, previous_tokens):
    if previous_tokens is None or previous_tokens.numel() == 0:
        raise ValueError("the previous step sampled nothing")
    deferred = input_ids < 0
    rows = torch.where(deferred, -1 - input_ids, torch.zeros_like(input_ids))
    input_ids.copy_(torch.where(deferred, previous_tokens[rows], input_ids))
