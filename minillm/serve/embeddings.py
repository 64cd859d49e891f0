"""POST /v1/embeddings, OpenAI's embeddings API on the served model (chapter 10; the vectors: minillm/pooling.py).

    {"model": ..., "input": "text" | ["text", ...] | [ids] | [[ids], ...], "encoding_format": "float" | "base64",
     "dimensions": d}
    -> {"object": "list", "data": [{"object": "embedding", "embedding": [...], "index": i}, ...], "model": ...,
        "usage": {"prompt_tokens": n, "total_tokens": n}}

Each input is one embedding request in the engine (its prefill only), batched with whatever else runs. vLLM's
extensions: `normalize` (default true), `truncate_prompt_tokens` (keep an input's last k tokens) and
`add_special_tokens` (default true). base64 is the little-endian float32 bytes of the vector, as OpenAI sends it.
"""
from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from minillm.pooling import PoolingParams
from minillm.sampling_params import ParamError
from minillm.serve.protocol import MAX_CHOICES, ApiError


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # OpenAI's end-user id: not used
    normalize: bool = True
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True


async def embeddings(serving: Any, request: EmbeddingRequest) -> dict[str, Any]:
    """The /v1/embeddings answer (`serving`: the server's OpenAIServing)."""
    lora = serving.models.resolve(request.model)
    problem = serving.llm.engine.pooling_problem()
    if problem:
        raise ApiError(400, f"this server cannot embed: {problem}", param="input")
    inputs = request.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
        inputs = [inputs]
    if not inputs:
        raise ApiError(400, "input must hold at least one text or token list", param="input")
    if len(inputs) > MAX_CHOICES:
        raise ApiError(400, f"input holds {len(inputs)} items; at most {MAX_CHOICES}: send several requests",
                       param="input")
    keep = request.truncate_prompt_tokens
    if keep is not None and keep < 1:
        raise ApiError(400, f"truncate_prompt_tokens must be >= 1, got {keep}", param="truncate_prompt_tokens")
    try:
        params = PoolingParams(normalize=request.normalize, dimensions=request.dimensions)
        params.check(serving.llm.engine.model_config.hidden_size)
    except ParamError as err:
        raise ApiError(400, str(err), param=err.param) from None
    prompts = await asyncio.to_thread(lambda: [serving.checked_prompt(p, "input", request.add_special_tokens, keep)
                                               for p in inputs])
    base = f"embd-{uuid.uuid4().hex}"

    async def one(i: int, text: str | None, ids: list[int]) -> list[float]:
        last = None
        async for out in serving.llm.generate(text or ids, request_id=f"{base}-{i}", prompt_token_ids=ids,
                                              lora_request=lora, pooling_params=params):
            last = out
        if last is None or last.embedding is None:
            error = last.outputs[0].error if last is not None else "no output"
            raise ApiError(500, f"input {i} got no embedding: {error}", "server_error", code=500)
        return last.embedding

    vectors = await asyncio.gather(*(one(i, text, ids) for i, (text, ids) in enumerate(prompts)))
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, request.encoding_format)}
            for i, v in enumerate(vectors)]
    used = sum(len(ids) for _, ids in prompts)
    return {"id": base, "object": "list", "created": int(time.time()), "model": serving.models.name_of(lora),
            "data": data, "usage": {"prompt_tokens": used, "total_tokens": used}}


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
