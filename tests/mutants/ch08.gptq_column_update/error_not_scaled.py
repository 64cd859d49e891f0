"""Forgets to divide the rounding error by U1[i, i]: the correction has the wrong size."""


def gptq_column_update(W1, U1, i, q):
    err = W1[:, i] - q
    W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
    return err
