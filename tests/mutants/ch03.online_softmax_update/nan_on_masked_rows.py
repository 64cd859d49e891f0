"""No guard for rows that have seen only -inf: (-inf) - (-inf) = nan poisons the row."""


def online_softmax_update(m_i, l_i, acc, scores, values):
    m_new = torch.maximum(m_i, scores.max(dim=-1).values)
    alpha = torch.exp(m_i - m_new)
    p = torch.exp(scores - m_new[:, None])
    return m_new, l_i * alpha + p.sum(-1), acc * alpha[:, None] + p @ values
