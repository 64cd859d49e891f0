"""The engine's log-probabilities in OpenAI's (and vLLM's) JSON shapes (chapter 10).

The engine gives, per token, vLLM's dict {token id: Logprob(logprob, rank, decoded_token)}: the actual token
first, then the top k. The endpoints show them three ways:

  completions  `logprobs`: parallel lists (tokens, token_logprobs, top_logprobs as {text: log-prob}, text_offset)
  chat         `logprobs.content`: per token {token, logprob, bytes, top_logprobs: [the top k by rank]}
  both         vLLM's `prompt_logprobs`: per prompt token null (the first: nothing predicts it) or
               {"<id>": {logprob, rank, decoded_token}}

With vLLM's `return_tokens_as_token_ids`, a token is named "token_id:<id>" instead of by its text, so a client
can tell apart tokens whose text is not valid UTF-8 on its own (a piece of a character) or not unique. Here only
the name changes: `bytes` stay the token's own and `text_offset` counts the text's characters.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from minillm.outputs import TokenLogprobDict

FLOOR = -9999.0  # what a log-prob of -inf is sent as (JSON has no infinity), as vLLM clamps it


def token_name(token_id: int, decoded: str | None, as_id: bool = False) -> str:
    """How a token is shown: its text, or "token_id:<id>" with return_tokens_as_token_ids."""
    return f"token_id:{token_id}" if as_id else (decoded or "")


def completion_logprobs(logprobs: list[TokenLogprobDict], text_offset: int,
                        as_ids: bool = False) -> tuple[dict[str, list], int]:
    """(/v1/completions' shape, the text offset after these tokens): parallel lists; top_logprobs[i] maps token
    name -> log-prob (the actual token and the top k, as vLLM returns them)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for entries in logprobs:
        token_id, actual = next(iter(entries.items()))  # the actual token: the first entry
        offsets.append(text_offset)
        text_offset += len(actual.decoded_token or "")
        tokens.append(token_name(token_id, actual.decoded_token, as_ids))
        token_logprobs.append(actual.logprob)
        alternatives: dict[str, float] = {}
        for i, lp in entries.items():  # two ids may decode to the same text: the actual token's entry wins
            alternatives.setdefault(token_name(i, lp.decoded_token, as_ids), lp.logprob)
        top.append(alternatives if actual.logprob is not None else None)  # an echoed prompt's first token: null
    body = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
    return body, text_offset


def chat_logprobs(logprobs: list[TokenLogprobDict], num_top: int,
                  token_bytes: Callable[[int], bytes] | None = None, as_ids: bool = False) -> dict[str, list]:
    """/v1/chat/completions' shape: per token {token, logprob, bytes, top_logprobs: the top k by rank}. `bytes`
    are the token's own (the tokenizer's token_bytes: a piece of a character stays that piece, where the token's
    text alone is U+FFFD), or its text's UTF-8 with a tokenizer that cannot tell them, and for a token with no bytes
    of its own that has text all the same (a special token, kept as text with skip_special_tokens=false)."""
    def item(token_id: int, lp: Any) -> dict[str, Any]:
        text = lp.decoded_token or ""
        raw = (token_bytes(token_id) if token_bytes is not None else b"") or text.encode("utf-8")
        return {"token": token_name(token_id, text, as_ids), "logprob": lp.logprob, "bytes": list(raw)}

    content = []
    for entries in logprobs:
        token_id, actual = next(iter(entries.items()))  # the actual token: the first entry of vLLM's dict
        # the dict holds the actual token and the top k: keep the top k by rank (the actual token when it is one)
        top = sorted(entries.items(), key=lambda kv: kv[1].rank)[:num_top]
        content.append({**item(token_id, actual), "top_logprobs": [item(i, lp) for i, lp in top
                                                                   if lp.rank <= num_top]})
    return {"content": content}


def prompt_logprobs(logprobs: list[TokenLogprobDict | None] | None) -> list[dict[str, dict] | None] | None:
    """vLLM's `prompt_logprobs`: per prompt token null or {"<id>": {logprob, rank, decoded_token}}."""
    if logprobs is None:
        return None
    return [None if entries is None else
            {str(i): {"logprob": lp.logprob if lp.logprob is None or math.isfinite(lp.logprob) else FLOOR,
                      "rank": lp.rank, "decoded_token": lp.decoded_token} for i, lp in entries.items()}
            for entries in logprobs]
