"""Accepts with probability min(1, q/p) instead of min(1, p/q): the ratio upside down."""


def accept_reject(p_x, q_x, uniforms, num_draft_tokens):
    valid = torch.arange(p_x.shape[1]) < num_draft_tokens.unsqueeze(-1)
    accepted = (uniforms * p_x < q_x) & valid
    return accepted.long().cumprod(dim=1).sum(dim=1)
