"""Counts every accepted draft, not the accepted prefix: a draft after a rejection still counts."""


def accept_reject(p_x, q_x, uniforms, num_draft_tokens):
    valid = torch.arange(p_x.shape[1]) < num_draft_tokens.unsqueeze(-1)
    return ((uniforms * q_x < p_x) & valid).long().sum(dim=1)
