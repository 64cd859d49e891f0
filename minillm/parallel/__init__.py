"""Parallelism (a later issue): tensor, pipeline, expert; prefill/decode disaggregation."""
