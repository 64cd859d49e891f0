"""No check that the previous step sampled anything: a deferred id then fails with an obscure error (or reads
garbage) instead of the ValueError that names the problem."""
import torch


def resolve_deferred_ids(input_ids, previous_tokens):
    rows = (-1 - input_ids).clamp(min=0)
    input_ids.copy_(torch.where(input_ids < 0, previous_tokens[rows], input_ids))
