"""1 + k * a: counts every accepted draft as if it stood alone, but a draft after a rejection is thrown away
(the chain stops at its first rejection)."""


def expected_tokens_per_step(acceptance_rate, num_speculative_tokens):
    if not 0 <= acceptance_rate <= 1 or num_speculative_tokens < 0:
        raise ValueError("bad arguments")
    return 1 + num_speculative_tokens * acceptance_rate
