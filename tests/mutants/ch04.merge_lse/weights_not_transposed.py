"""Forgets that lse is [H, T] while out is [T, H, D]: weights are applied to the wrong (token, head) pairs."""


def merge_lse(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a.float(), lse_b.float())
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a.float() - safe).reshape(out_a.shape[0], out_a.shape[1], 1)
    w_b = torch.exp(lse_b.float() - safe).reshape(out_a.shape[0], out_a.shape[1], 1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype), lse
