"""Pushes the error onto the next column only, not onto every column after i."""


def gptq_column_update(W1, U1, i, q):
    err = (W1[:, i] - q) / U1[i, i]
    W1[:, i:i + 2] -= err[:, None] * U1[i, i:i + 2][None, :]
    return err
