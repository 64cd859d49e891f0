"""Keeps the larger side's lse and output (a 'max merge'), dropping the other side's softmax mass."""


def merge_lse(out_a, lse_a, out_b, lse_b):
    take_a = (lse_a >= lse_b).T.unsqueeze(-1)
    return torch.where(take_a, out_a, out_b), torch.maximum(lse_a, lse_b).float()
