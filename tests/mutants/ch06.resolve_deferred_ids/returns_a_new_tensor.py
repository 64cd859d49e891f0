"""Computes the right ids into a new tensor and returns it: the forward reads the step's buffer, still holding
the placeholders."""
import torch


def resolve_deferred_ids(input_ids, previous_tokens):
    if previous_tokens is None or previous_tokens.numel() == 0:
        raise ValueError("the previous step sampled nothing")
    rows = (-1 - input_ids).clamp(0, previous_tokens.numel() - 1)
    return torch.where(input_ids < 0, previous_tokens[rows], input_ids)
