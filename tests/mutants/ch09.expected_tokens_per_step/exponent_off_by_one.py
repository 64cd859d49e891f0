"""(1 - a^k) / (1 - a): one term short of the geometric sum 1 + a + ... + a^k, as if the k-th draft could never
be accepted."""


def expected_tokens_per_step(acceptance_rate, num_speculative_tokens):
    if not 0 <= acceptance_rate <= 1 or num_speculative_tokens < 0:
        raise ValueError("bad arguments")
    if acceptance_rate == 1:
        return float(num_speculative_tokens)
    return (1 - acceptance_rate ** num_speculative_tokens) / (1 - acceptance_rate)
