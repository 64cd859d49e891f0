"""Uses exp where the scale is in log2 units (qk_scale holds log2(e)): every probability is off."""


@triton.jit
def attend_kv_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, q_pos, k_len, lo, hi, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        kv_pos = start_n + offs_n
        ok = (kv_pos < k_len) | (not MASKED)
        k = tl.load(k_base + kv_pos[None, :] * stride_kn + offs_d[:, None], mask=ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + kv_pos[:, None] * stride_vn + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, k.to(tl.float32))
        if MASKED:
            keep = kv_pos[None, :] < k_len
            if CAUSAL:
                keep = keep & (kv_pos[None, :] <= q_pos[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p, v.to(tl.float32), acc=acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i
