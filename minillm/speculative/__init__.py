"""Speculative decoding (issue 11): a rejection sampler that keeps the target's distribution exactly, and every way
of proposing draft tokens (a small draft model, the target's own early layers, Medusa heads, EAGLE, MTP, lookahead
and prompt-lookup n-grams), verified in one multi-token engine step (Scheduler.postprocess rolls back rejections)."""
