"""Counts a multiply-add as one FLOP instead of two."""


def arithmetic_intensity(m, n, k, bytes_per_element):
    return m * n * k / (bytes_per_element * (m * k + k * n + m * n))
