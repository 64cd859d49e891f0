"""No guard for two empty sides: exp(-inf - (-inf)) = nan instead of out = 0."""


def merge_lse(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    w_a = torch.exp(lse_a.float() - lse).T.unsqueeze(-1)
    w_b = torch.exp(lse_b.float() - lse).T.unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype), lse
