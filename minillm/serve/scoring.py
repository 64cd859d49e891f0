"""POST /score and /rerank, vLLM's scoring APIs on an embedding model (chapter 10; LLM.score is the offline twin).

    /score   {"text_1": "query" | [...], "text_2": "doc" | [...]}
             -> {"object": "list", "data": [{"index": i, "object": "score", "score": s}, ...], "usage": ...}
    /rerank  {"query": "query", "documents": [...], "top_n": n}     (Jina's and Cohere's shape)
             -> {"results": [{"index": i, "document": {"text": ...}, "relevance_score": s}, ...], "usage": ...}

A score is the cosine similarity of two texts' embeddings (pooled as the server's --pooler-config says):
vLLM's scoring for embedding models. A cross-encoder, which reads
query and document together through one forward, would score them jointly; minillm serves decoders, not those.
/score pairs one text_1 with every text_2, or two lists of one length pair by pair; each distinct text is
embedded once. /rerank returns the documents best first, the `top_n` best (0 or absent: all). Also mounted at
/v1/score, /v1/rerank and /v2/rerank, as vLLM does.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from minillm.pooling import cosine_similarity
from minillm.serve.embeddings import check_truncation, embed_prompts, pooling_params
from minillm.serve.protocol import MAX_CHOICES, ApiError


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    query: str
    documents: list[str]
    top_n: int = 0
    truncate_prompt_tokens: int | None = None


async def _similarities(serving: Any, request_model: str | None, firsts: list[str], seconds: list[str],
                        keep: int | None, fields: tuple[str, str]) -> tuple[Any, list[float], int]:
    """(the adapter, cosine of each (firsts[i or 0], seconds[i]) pair, prompt tokens embedded). Every distinct
    text is embedded once; a bad one is a 400 naming its field (fields: the names of firsts' and seconds')."""
    lora = serving.models.resolve(request_model)
    params = pooling_params(serving)
    check_truncation(keep)
    texts = list(dict.fromkeys(firsts + seconds))
    known = set(firsts)
    prompts = await asyncio.to_thread(lambda: [serving.checked_prompt(t, fields[t not in known], keep=keep)
                                               for t in texts])
    vectors = await embed_prompts(serving, prompts, params, lora, f"score-{uuid.uuid4().hex}")
    by_text = dict(zip(texts, vectors))
    pairs = zip(firsts * len(seconds) if len(firsts) == 1 else firsts, seconds)
    return lora, [cosine_similarity(by_text[a], by_text[b]) for a, b in pairs], sum(len(ids) for _, ids in prompts)


def _count(texts: list[str], param: str) -> None:
    if not texts:
        raise ApiError(400, f"{param} must hold at least one text", param=param)
    if len(texts) > MAX_CHOICES:
        raise ApiError(400, f"{param} holds {len(texts)} texts; at most {MAX_CHOICES}: send several requests",
                       param=param)


async def score(serving: Any, request: ScoreRequest) -> dict[str, Any]:
    """The /score answer."""
    firsts = [request.text_1] if isinstance(request.text_1, str) else request.text_1
    seconds = [request.text_2] if isinstance(request.text_2, str) else request.text_2
    _count(firsts, "text_1")
    _count(seconds, "text_2")
    if len(firsts) not in (1, len(seconds)):
        raise ApiError(400, f"text_1 holds {len(firsts)} texts and text_2 {len(seconds)}: give one text_1, or two "
                            f"lists of one length", param="text_1")
    lora, scores, used = await _similarities(serving, request.model, firsts, seconds,
                                             request.truncate_prompt_tokens, ("text_1", "text_2"))
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": serving.models.name_of(lora),
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": used, "total_tokens": used}}


async def rerank(serving: Any, request: RerankRequest) -> dict[str, Any]:
    """The /rerank answer: documents by relevance to the query, best first."""
    _count(request.documents, "documents")
    if request.top_n < 0:
        raise ApiError(400, f"top_n must be >= 0 (0: every document), got {request.top_n}", param="top_n")
    lora, scores, used = await _similarities(serving, request.model, [request.query], request.documents,
                                             request.truncate_prompt_tokens, ("query", "documents"))
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:request.top_n or None]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": serving.models.name_of(lora),
            "usage": {"prompt_tokens": used, "total_tokens": used},
            "results": [{"index": i, "document": {"text": request.documents[i]}, "relevance_score": scores[i]}
                        for i in order]}
