"""POST /classify, vLLM's classification API on a sequence-classification or reward model (chapter 10; LLM.classify
is the offline twin, minillm/classification.py the head).

    {"model": ..., "input": "text" | ["text", ...] | [ids] | [[ids], ...]}
    -> {"id": "classify-...", "object": "list", "created": t, "model": ...,
        "data": [{"index": i, "label": "pos", "probs": [p_0, ...], "num_classes": n}, ...],
        "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0}}

Each input is one embedding request in the engine (its prefill only), batched with whatever else runs, pooling
its last token's hidden state as it is, whatever --pooler-config says for /v1/embeddings: that row is the one a
*ForSequenceClassification model reads. The host applies the score head; `label` names the likeliest class.
vLLM's extensions: `truncate_prompt_tokens` (keep an input's last k tokens) and `add_special_tokens` (default
true). A generative model answers 400: it has no classification head.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict

from minillm.classification import CLASSIFY_POOLING, classification_problem, classifier_head, read_classifier_head
from minillm.serve.embeddings import check_truncation, checked_inputs, embed_prompts
from minillm.serve.protocol import ApiError


class ClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    truncate_prompt_tokens: int | None = None
    add_special_tokens: bool = True
    user: str | None = None  # OpenAI's end-user id: not used


async def classify(serving: Any, request: ClassificationRequest) -> dict[str, Any]:
    """The /classify answer (`serving`: the server's OpenAIServing)."""
    lora = serving.models.resolve(request.model)
    problem = classification_problem(serving.llm.engine)
    if problem:
        raise ApiError(400, problem, param="model")
    keep = request.truncate_prompt_tokens
    check_truncation(keep)
    prompts = await checked_inputs(serving, request.input, request.add_special_tokens, keep)
    base = f"classify-{uuid.uuid4().hex}"
    vectors = await embed_prompts(serving, prompts, CLASSIFY_POOLING, lora, base)
    head = classifier_head(await serving.llm.collective_rpc(read_classifier_head))
    data = []
    for i, vector in enumerate(vectors):
        answer = head.classify(vector)
        data.append({"index": i, "label": answer.label, "probs": answer.probs, "num_classes": answer.num_classes})
    used = sum(len(ids) for _, ids in prompts)
    return {"id": base, "object": "list", "created": int(time.time()), "model": serving.models.name_of(lora),
            "data": data, "usage": {"prompt_tokens": used, "total_tokens": used, "completion_tokens": 0}}
