"""Counts the bytes read of A and B but forgets writing C."""


def arithmetic_intensity(m, n, k, bytes_per_element):
    return 2 * m * n * k / (bytes_per_element * (m * k + k * n))
