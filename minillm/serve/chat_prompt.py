"""A chat request's messages -> the prompt the model continues, with vLLM's chat-template fields (chapter 10).

The model's chat template (or the server's --chat-template, or the request's own `chat_template`) turns the
messages into text; the request decides how:

  add_generation_prompt   (default true) end with the header that opens the assistant's turn
                          (`<|im_start|>assistant\\n` for SmolLM2): the model answers as the assistant.
  continue_final_message  (default false) leave the last message open instead: the text ends right after its
                          content (whatever the template writes to close a turn is cut off), so the model goes on
                          writing it ("prefill" the start of an answer). It contradicts add_generation_prompt,
                          which must then be false, as in vLLM and Hugging Face.
  add_special_tokens      (default false) let the tokenizer add its BOS on top of the template, which normally
                          writes it itself: true gives it twice for most models.
  documents, chat_template_kwargs
                          more variables for the template (a RAG template reads `documents`; Qwen3's reads
                          `enable_thinking`); a template that does not use them ignores them, as in vLLM.
  echo                    the answer starts with the last message's content when that message has the answer's
                          role: with continue_final_message, the whole message comes back, not only its end.

The answer's role is the assistant's when a generation prompt opened its turn, else the last message's (what
the model is continuing), as vLLM names it.
"""
from __future__ import annotations

from typing import Any

from minillm.loader.chat_template import RESERVED_KWARGS, render_conversation
from minillm.loader.no_tokenizer import NoTokenizer
from minillm.serve.protocol import ApiError, ChatCompletionRequest

def render_chat(tokenizer: Any, server_template: str | None, request: ChatCompletionRequest,
                trust_request_template: bool = False) -> tuple[str, list[int]]:
    """(prompt text, token ids) for a chat request; ApiError 400 naming the field for what cannot be rendered.

    A request's own `chat_template` is code the server runs (Jinja's sandbox stops file and attribute access, not
    loops: a template of nested loops would hold the event loop, and every other stream, for minutes), so it is
    refused unless the server was started with --trust-request-chat-template, as vLLM does."""
    require_tokenizer(tokenizer, "a chat is rendered to text and tokenized", "messages")
    if request.chat_template is not None and not trust_request_template:
        raise ApiError(400, "chat_template in a request is refused: a template is code the server would run; "
                            "use the model's template (leave it out), or start the server with "
                            "--trust-request-chat-template", param="chat_template")
    if not request.messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} messages", param="messages")
    messages = [m.template_fields() for m in request.messages]
    kwargs = dict(request.chat_template_kwargs or {})
    clash = [k for k in kwargs if k in RESERVED_KWARGS]
    if clash:
        raise ApiError(400, f"chat_template_kwargs may not set {clash[0]!r}: give it as a field of the request "
                            f"(reserved: {', '.join(RESERVED_KWARGS)})", param="chat_template_kwargs")
    if request.documents is not None:
        kwargs.setdefault("documents", request.documents)
    if request.tools:  # a template for tool use renders them (serve/tool_calls.py)
        kwargs.setdefault("tools", request.tools)
    template = request.chat_template or server_template
    if template is None and not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise ApiError(400, "this model has no chat template: use /v1/completions, start the server with "
                            "--chat-template FILE, or send chat_template", param="messages")
    try:
        text = render_conversation(tokenizer, messages, template, request.add_generation_prompt,
                                   request.continue_final_message, **kwargs)
    except ValueError as err:  # ChatTemplateError is a ValueError
        param = "continue_final_message" if str(err).startswith("continue_final_message") else \
            "chat_template" if request.chat_template else "messages"
        raise ApiError(400, str(err), param=param) from None
    # the template wrote the special tokens as text: add them again only when asked to
    return text, encode_text(tokenizer, text, request.add_special_tokens)


def require_tokenizer(tokenizer: Any, what: str, param: str) -> None:
    """A 400 naming `param` where a request needs text tokenized and the server has no tokenizer
    (`minillm serve --skip-tokenizer-init`): token ids in, token ids out, on /v1/completions only."""
    if isinstance(tokenizer, NoTokenizer):
        raise ApiError(400, f"{what}, and this server has no tokenizer (started with --skip-tokenizer-init): "
                            f"send prompts as token ids to /v1/completions (with return_token_ids: true to get "
                            f"the answer's ids)", param=param)


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """The tokenizer's ids for `text`, with or without its special tokens (a tokenizer without the switch adds
    none). Both endpoints tokenize through it: a chat's rendered text, a completion's text prompt."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except TypeError:
        return list(tokenizer.encode(text))


def answer_role(request: ChatCompletionRequest) -> str:
    """The role the answer speaks in: the assistant's after a generation prompt, else the last message's."""
    return "assistant" if request.add_generation_prompt or not request.messages else request.messages[-1].role


def echoed(request: ChatCompletionRequest) -> str | None:
    """With echo, the text the answer starts with: the last message's content when it has the answer's role."""
    if not request.echo or not request.messages or request.messages[-1].role != answer_role(request):
        return None
    return request.messages[-1].text()
