"""Assumes sequence i is row i of the previous step (true only while no sequence joins or leaves the batch)."""
import torch


def resolve_deferred_ids(input_ids, previous_tokens):
    if previous_tokens is None or previous_tokens.numel() == 0:
        raise ValueError("the previous step sampled nothing")
    n = input_ids.numel()
    rows = torch.arange(n).clamp(max=previous_tokens.numel() - 1)
    input_ids.copy_(torch.where(input_ids < 0, previous_tokens[rows], input_ids))
