"""POST /v1/embeddings, OpenAI's embeddings API on the served model (chapter 10; the vectors: minillm/pooling.py).

    {"model": ..., "input": "text" | ["text", ...] | [ids] | [[ids], ...], "encoding_format": "float" | "base64",
     "dimensions": d}
    -> {"object": "list", "data": [{"object": "embedding", "embedding": [...], "index": i}, ...], "model": ...,
        "usage": {"prompt_tokens": n, "total_tokens": n}}

Each input is one embedding request in the engine (its prefill only), batched with whatever else runs. vLLM's
extensions: `normalize` (default: the server's, true unless --pooler-config says otherwise),
`truncate_prompt_tokens` (keep an input's last k tokens), `add_special_tokens` (default true), and a chat in place
of `input`: `messages` (with add_generation_prompt, default false, and the other chat fields of /tokenize),
rendered with the server's chat template and embedded as one input. How a vector is pooled (LAST, MEAN, CLS) is
the server's `--pooler-config '{"pooling_type": "MEAN"}'`, as in vLLM. base64 is the little-endian float32 bytes
of the vector, as OpenAI sends it. `embed_prompts` serves /score and /rerank too (serve/scoring.py).
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
import uuid
from typing import Any, Literal

import numpy as np

from minillm.pooling import PoolingParams
from minillm.sampling_params import ParamError
from minillm.serve.protocol import MAX_CHOICES, ApiError
from minillm.serve.tokenize import ChatFields, chat_token_ids


class EmbeddingRequest(ChatFields):
    """A /v1/embeddings body: `input` (texts or token ids) or `messages` (one chat), not both."""

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # OpenAI's end-user id: not used
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool | None = None  # default: true for input, false for messages (as vLLM)
    add_generation_prompt: bool = False  # an embedded chat is not asked to go on (vLLM's default here)


def pooling_params(serving: Any, normalize: bool | None = None, dimensions: int | None = None) -> PoolingParams:
    """The server's pooling (--pooler-config) with a request's normalize and dimensions; 400 naming a bad field,
    or when the engine cannot embed at all (pooling_problem)."""
    problem = serving.llm.engine.pooling_problem()
    if problem:
        raise ApiError(400, f"this server cannot embed: {problem}", param="input")
    base = serving.pooling
    try:
        params = dataclasses.replace(base, normalize=base.normalize if normalize is None else normalize,
                                     dimensions=dimensions)
        params.check(serving.llm.engine.model_config.hidden_size)
    except ParamError as err:
        raise ApiError(400, str(err), param=err.param) from None
    return params


def check_truncation(keep: int | None) -> None:
    if keep is not None and keep < 1:
        raise ApiError(400, f"truncate_prompt_tokens must be >= 1, got {keep}", param="truncate_prompt_tokens")


async def checked_inputs(serving: Any, inputs: str | list, add_special_tokens: bool,
                         keep: int | None) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) of each item of an `input` field (a text, texts, token ids or lists of them),
    tokenized off the event loop; a 400 naming `input` when it is empty, too long a list, or holds a bad prompt
    (/v1/embeddings, /classify)."""
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise ApiError(400, "input must hold at least one text or token list", param="input")
    if len(inputs) > MAX_CHOICES:
        raise ApiError(400, f"input holds {len(inputs)} items; at most {MAX_CHOICES}: send several requests",
                       param="input")
    return await asyncio.to_thread(lambda: [serving.checked_prompt(p, "input", add_special_tokens, keep)
                                            for p in inputs])


async def embed_prompts(serving: Any, prompts: list[tuple[str | None, list[int]]], params: PoolingParams,
                        lora: Any, base_id: str) -> list[list[float]]:
    """One vector per checked prompt (text or None, token ids), all embedded at once by the engine."""
    async def one(i: int, text: str | None, ids: list[int]) -> list[float]:
        last = None
        async for out in serving.llm.generate(text or ids, request_id=f"{base_id}-{i}", prompt_token_ids=ids,
                                              lora_request=lora, pooling_params=params):
            last = out
        if last is None or last.embedding is None:
            error = last.outputs[0].error if last is not None else "no output"
            raise ApiError(500, f"input {i} got no embedding: {error}", "server_error", code=500)
        return last.embedding

    return list(await asyncio.gather(*(one(i, text, ids) for i, (text, ids) in enumerate(prompts))))


async def embeddings(serving: Any, request: EmbeddingRequest) -> dict[str, Any]:
    """The /v1/embeddings answer (`serving`: the server's OpenAIServing)."""
    lora = serving.models.resolve(request.model)
    params = pooling_params(serving, request.normalize, request.dimensions)
    keep = request.truncate_prompt_tokens
    check_truncation(keep)
    if (request.input is None) == (request.messages is None):
        raise ApiError(400, "give exactly one of input (texts or token ids) and messages (a chat)",
                       param="messages" if request.input is not None else "input")
    if request.messages is not None:
        def render() -> list[tuple[str | None, list[int]]]:
            ids = chat_token_ids(serving, request, bool(request.add_special_tokens))
            return [serving.checked_prompt(ids, "messages", keep=keep)]
        prompts = await asyncio.to_thread(render)
    else:
        prompts = await checked_inputs(serving, request.input, request.add_special_tokens is not False, keep)
    base = f"embd-{uuid.uuid4().hex}"
    vectors = await embed_prompts(serving, prompts, params, lora, base)
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, request.encoding_format)}
            for i, v in enumerate(vectors)]
    used = sum(len(ids) for _, ids in prompts)
    return {"id": base, "object": "list", "created": int(time.time()), "model": serving.models.name_of(lora),
            "data": data, "usage": {"prompt_tokens": used, "total_tokens": used}}


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
