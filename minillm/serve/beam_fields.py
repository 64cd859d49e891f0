"""Beam search over HTTP: vLLM's `use_beam_search` on completions and chat (the server of chapter 10; the search
itself is minillm/beam_search.py, which no chapter builds).

With `use_beam_search: true` the request's `n` is the beam width (1-10), and the answer's n choices are the best
beams, best first; `length_penalty` shapes the final ranking, `max_tokens`, `ignore_eos` and `temperature` mean what
BeamSearchParams says. The beams are stepped through the running engine as single-token requests beside everyone
else's, all of a step's beams at once. What beam search cannot honour is a 400 naming the field: streaming (a beam
may be overtaken until the last step, so no text is final before the end), log-probabilities, stop strings and stop
tokens, logits processors, constraints and tool calls. `length_penalty` without beam search is refused too.
"""
from __future__ import annotations

import asyncio
from typing import Any

from minillm.beam_search import MAX_BEAM_WIDTH, BeamSearch, BeamSearchOutput, BeamSearchParams

# fields beam search cannot honour, with their defaults: anything else is a 400 with use_beam_search
_NOT_WITH_BEAMS = {"stream": False, "logprobs": None, "top_logprobs": None, "prompt_logprobs": None, "echo": False,
                   "stop": None, "stop_token_ids": None, "min_tokens": 0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "repetition_penalty": 1.0, "logit_bias": None, "min_p": 0.0,
                   "allowed_token_ids": None, "bad_words": None, "structured_outputs": None, "guided_json": None,
                   "guided_regex": None, "guided_choice": None, "guided_grammar": None, "structural_tag": None, "response_format": None, "tool_choice": None}


def beam_problem(request: Any) -> tuple[str, str] | None:
    """(field, message) for what a request asks of beam search that it cannot give; None if all is well."""
    if not request.use_beam_search:
        if request.length_penalty != 1.0:
            return "length_penalty", (f"length_penalty applies to beam search only: give use_beam_search=true, or "
                                      f"leave it out (got {request.length_penalty})")
        return None
    if not 1 <= request.n <= MAX_BEAM_WIDTH:
        return "n", f"n is the beam width with use_beam_search: an integer in [1, {MAX_BEAM_WIDTH}], got {request.n}"
    for name, default in _NOT_WITH_BEAMS.items():
        value = getattr(request, name, default)
        if value is not None and value != default and not (name == "response_format" and value.get("type", "text") == "text") \
                and not (name == "tool_choice" and value == "none") and not (name == "logprobs" and value is False):
            return name, f"{name} is not supported with use_beam_search (leave it out, or search without beams)"
    return None


async def beam_search_async(llm: Any, prompt_ids: list[list[int]], params: BeamSearchParams,
                            request_id: str, lora_request: Any = None, cache_salt: str | None = None
                            ) -> list[BeamSearchOutput]:
    """BeamSearch driven through an AsyncLLM: each step's single-token requests run together in the engine (every
    one with `lora_request`, the adapter the request's `model` named, or None, and the request's `cache_salt`)."""
    engine = llm.engine
    search = BeamSearch(prompt_ids, params, set(engine.eos_token_ids), llm.max_model_len)
    ask = search.ask.checked_copy(output_kind="final_only")

    async def last(ids: list[int], rid: str) -> dict[int, float]:
        out = None
        async for out in llm.generate(ids, ask, request_id=rid, lora_request=lora_request,
                                      cache_salt=cache_salt):
            pass
        return {t: e.logprob for t, e in out.outputs[0].logprobs[0].items()}

    step = 0
    while batch := search.prompts():
        search.advance(await asyncio.gather(*(last(ids, f"{request_id}-beam{step}-{k}")
                                              for k, ids in enumerate(batch))))
        step += 1
    return search.results(engine.tokenizer.decode)
