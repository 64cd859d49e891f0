"""Ignores num_draft_tokens: padding positions of a short row are tested (and accepted) like real drafts."""


def accept_reject(p_x, q_x, uniforms, num_draft_tokens):
    return (uniforms * q_x < p_x).long().cumprod(dim=1).sum(dim=1)
