"""Weights by exp(lse_x) instead of exp(lse_x - lse): the merged output is not a convex combination."""


def merge_lse(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    w_a = torch.exp(lse_a.float()).T.unsqueeze(-1)
    w_b = torch.exp(lse_b.float()).T.unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype), lse
