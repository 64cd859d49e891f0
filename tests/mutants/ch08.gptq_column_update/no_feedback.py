"""Computes the error but never propagates it: the later columns keep their weights (plain round-to-nearest)."""


def gptq_column_update(W1, U1, i, q):
    err = (W1[:, i] - q) / U1[i, i]
    W1[:, i] = q
    return err
