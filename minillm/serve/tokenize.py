"""POST /tokenize and /detokenize, vLLM's (chapter 10): what a client needs to count tokens against the context, or
to read ids back, with the server's own tokenizer and chat template.

    /tokenize    {"prompt": "text", "add_special_tokens": true}                       a completion's prompt
                 {"messages": [...], "add_generation_prompt": true, ...}              a chat, rendered as /v1/chat
                 -> {"count": n, "max_model_len": L, "tokens": [ids], "token_strs": [...] or null}
    /detokenize  {"tokens": [ids]} -> {"prompt": "text"}

`model` may name the base model or an adapter (404 otherwise), as on the generation endpoints; a chat body takes
the chat fields that change the rendered prompt (add_generation_prompt, continue_final_message,
add_special_tokens, chat_template_kwargs, documents, tools; a request's own chat_template only on a server started
with --trust-request-chat-template). `return_token_strs: true` adds each token's string as the tokenizer writes it
(byte-level BPE's "Ġ" for a space). Token ids outside the vocabulary are a 400 naming `tokens`.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from minillm.serve.chat_prompt import encode_text, render_chat, require_tokenizer
from minillm.serve.protocol import ApiError, ChatCompletionRequest, ChatMessage

MAX_DETOKENIZE_IDS = 1 << 20  # ids in one /detokenize body (the body limit keeps it far lower in practice)


class ChatFields(BaseModel):
    """The fields of a body that may carry a chat instead of a prompt (/tokenize, /v1/embeddings): the messages and
    what changes how they render (vLLM's names)."""
    model_config = ConfigDict(extra="ignore", strict=True)

    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, str]] | None = None
    tools: list[Any] | None = None


def chat_token_ids(serving: Any, body: ChatFields, add_special_tokens: bool) -> list[int]:
    """body.messages rendered as /v1/chat/completions renders them, tokenized (400 for contradictory fields)."""
    if body.add_generation_prompt and body.continue_final_message:
        raise ApiError(400, "continue_final_message=true continues the last message, add_generation_prompt=true "
                            "opens a new one: set add_generation_prompt=false with it", param="continue_final_message")
    chat = ChatCompletionRequest(
        messages=body.messages, add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message, add_special_tokens=add_special_tokens,
        chat_template=body.chat_template, chat_template_kwargs=body.chat_template_kwargs,
        documents=body.documents, tools=body.tools)
    return render_chat(serving.llm.tokenizer, serving.chat_template, chat, serving.trust_request_chat_template)[1]


class TokenizeRequest(ChatFields):
    """A /tokenize body: `prompt` (a completion's) or `messages` (a chat's), not both."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    tokens: list[int] = Field(default_factory=list)


def tokenize(serving: Any, body: TokenizeRequest) -> dict[str, Any]:
    """The /tokenize answer (`serving`: the server's OpenAIServing)."""
    serving.models.resolve(body.model)  # 404 for a model this server does not serve
    tokenizer = serving.llm.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt (a completion's text) and messages (a chat)",
                       param="prompt" if body.prompt is not None else "messages")
    if body.messages is not None:
        ids = chat_token_ids(serving, body, bool(body.add_special_tokens))
    else:
        add = True if body.add_special_tokens is None else body.add_special_tokens
        require_tokenizer(tokenizer, "/tokenize tokenizes text", "prompt")
        ids = encode_text(tokenizer, body.prompt, add)
    strs = None
    if body.return_token_strs:
        token = getattr(getattr(tokenizer, "backend", None), "id_to_token", None)
        strs = [token(i) if token is not None else tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return {"count": len(ids), "max_model_len": serving.llm.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(serving: Any, body: DetokenizeRequest) -> dict[str, Any]:
    """The /detokenize answer: the text of the ids, special tokens included (vLLM's)."""
    serving.models.resolve(body.model)
    vocab = serving.llm.engine.model_config.vocab_size
    if len(body.tokens) > MAX_DETOKENIZE_IDS:
        raise ApiError(400, f"tokens holds {len(body.tokens)} ids; at most {MAX_DETOKENIZE_IDS}", param="tokens")
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"tokens holds {bad}, outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": serving.llm.tokenizer.decode(body.tokens, skip_special_tokens=False)}
