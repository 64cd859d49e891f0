"""Speculative decoding (a later issue): rejection sampling, draft, self-spec, Medusa, EAGLE, MTP, lookahead."""
