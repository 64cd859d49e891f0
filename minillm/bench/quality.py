"""Perplexity from the engine's prompt log-probabilities (chapter 1's measurement, used by chapters 7-8's quantization).

    from minillm import LLM
    from minillm.bench import perplexity
    perplexity(LLM(), ["Some text of your own.", "Another one."])   # exp(mean negative log-likelihood)

Every text is one request with SamplingParams(prompt_logprobs=0): the engine scores each token after the first
given the ones before it (log-softmax of the raw logits, fp32), through the same paged, batched, chunked path that
serves requests. Perplexity is exp of the mean negative log-probability over all scored tokens of all texts, so a
long text weighs more than a short one (the usual corpus-level definition, as in vLLM's and HF's recipes).
A text may also be given as a list of token ids (fixed-length evaluation windows, as benchmarks/ cut them).

What the engine path measures that a cache-less forward cannot: the KV cache. A prompt prefilled in one piece
attends to its fresh keys and values, so an FP8 KV cache (`kv_cache_dtype="fp8"`) changes nothing there; with
`enable_chunked_prefill=True` and a small `max_num_batched_tokens`, every chunk after the first reads its context
back from the cache, and the perplexity then includes the cache's rounding (benchmarks/kv_cache_quality.py).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from minillm.sampling_params import SamplingParams


def prompt_token_logprobs(llm: Any, texts: Sequence[str | list[int]], use_tqdm: bool = False) -> list[list[float]]:
    """Per text (a string, or a list of token ids), the log-probability of each token after the first
    (len(tokens) - 1 values)."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise ValueError("texts is empty: give at least one text of two tokens or more")
    for i, text in enumerate(texts):
        is_ids = isinstance(text, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in text)
        if not (isinstance(text, str) or is_ids) or not text:
            raise ValueError(f"texts[{i}] must be a non-empty string or list of token ids, got {text!r}")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate(list(texts), params, use_tqdm=use_tqdm)
    scores = []
    for i, out in enumerate(outputs):
        if out.outputs[0].finish_reason == "error":
            raise ValueError(f"texts[{i}] could not be scored: {out.outputs[0].error}")
        if len(out.prompt_token_ids) < 2:
            raise ValueError(f"texts[{i}] = {texts[i]!r} is a single token: nothing to score (need >= 2)")
        scores.append([entry[token].logprob for token, entry in
                       zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:])])
    return scores


def perplexity(llm: Any, texts: Sequence[str | list[int]], use_tqdm: bool = False) -> float:
    """exp(mean over all scored tokens of -log p(token | tokens before it)) of `llm` (an LLM) on `texts`."""
    scores = [lp for per_text in prompt_token_logprobs(llm, texts, use_tqdm) for lp in per_text]
    return math.exp(-sum(scores) / len(scores))
