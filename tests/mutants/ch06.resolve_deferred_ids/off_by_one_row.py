"""Reads row -id instead of -id - 1: every placeholder takes the token of the next sequence's row."""
import torch


def resolve_deferred_ids(input_ids, previous_tokens):
    if previous_tokens is None or previous_tokens.numel() == 0:
        raise ValueError("the previous step sampled nothing")
    rows = (-input_ids).clamp(0, previous_tokens.numel() - 1)
    input_ids.copy_(torch.where(input_ids < 0, previous_tokens[rows], input_ids))
