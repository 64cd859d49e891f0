"""Rescales the running sum but not the accumulator: earlier blocks keep weights relative to a stale maximum."""


def online_softmax_update(m_i, l_i, acc, scores, values):
    m_new = torch.maximum(m_i, scores.max(dim=-1).values)
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    alpha = torch.exp(m_i - m_safe)
    p = torch.exp(scores - m_safe[:, None])
    return m_new, l_i * alpha + p.sum(-1), acc + p @ values
