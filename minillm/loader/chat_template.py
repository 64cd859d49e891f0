"""Rendering a model's chat template: a list of messages -> the exact prompt string it was trained on (chapter 1).

Instruct models ship a Jinja2 template (GGUF key `tokenizer.chat_template`, or `chat_template` in an HF
tokenizer_config.json) that wraps each turn in the model's control tokens, e.g. for SmolLM2

    <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n

A prompt that misses one newline is out of distribution and the model answers worse, so we render
the template the way Hugging Face does: a *sandboxed* Jinja environment (templates come from
downloaded files and must not reach Python internals), `trim_blocks` and `lstrip_blocks` on,
`raise_exception(msg)` for templates that validate their input, and the special tokens in the context.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The messages are malformed, or the template itself rejected them."""


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """A non-empty list of {"role": str, "content": str} dicts; anything else gets a message naming the bad item."""
    if isinstance(messages, dict):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts, got a single dict; "
                                "wrap it in a list")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"messages[{i}] must be a dict with 'role' and 'content', "
                                    f"got {type(message).__name__}: {message!r}")
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise ChatTemplateError(f"messages[{i}] is missing {', '.join(repr(k) for k in missing)}: {message!r}")
        if not isinstance(message["role"], str) or not message["role"]:
            raise ChatTemplateError(f"messages[{i}]['role'] must be a non-empty string, got {message['role']!r}")
        if not isinstance(message["content"], str):
            raise ChatTemplateError(f"messages[{i}]['content'] must be a string, "
                                    f"got {type(message['content']).__name__}: {message['content']!r}")
    return list(messages)


# template variables a caller gives through arguments of their own (or that would clash with the renderer's)
RESERVED_KWARGS = ("messages", "add_generation_prompt", "continue_final_message", "special_tokens", "source")


def render_conversation(tokenizer: Any, messages: list[dict[str, Any]], template: str | None = None,
                        add_generation_prompt: bool = True, continue_final_message: bool = False,
                        **extra: Any) -> str:
    """The prompt text of `messages` (dicts as templates read them) through `template`, or through the tokenizer's
    own chat template when None; `continue_final_message` leaves the last message open (open_final_message);
    `extra`: more template variables (tools, documents, enable_thinking, ...). LLM.chat and the server's chat
    endpoint both render through it. ChatTemplateError (a ValueError) for what cannot be rendered."""
    if template is not None:
        special = {"bos_token": getattr(tokenizer, "bos_token", None),
                   "eos_token": getattr(tokenizer, "eos_token", None)}
        text = render_chat_template(template, messages, add_generation_prompt, special_tokens=special, **extra)
    else:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
    return open_final_message(text, messages[-1]["content"]) if continue_final_message else text


def template_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as chat templates for tool use read it: its arguments a mapping, parsed from OpenAI's
    JSON string (left as they are when they do not parse)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def open_final_message(text: str, final: str) -> str:
    """`text` cut right after the last message's content, so the model continues that message (continue_final_message:
    Hugging Face's rule, the last place the content appears; failing that, the content without its surrounding
    whitespace, which a template may strip)."""
    for content in (final, final.strip()):
        at = text.rfind(content)
        if at >= 0:
            return text[:at + len(content)]
    raise ChatTemplateError("continue_final_message: the last message's content does not appear in the rendered "
                            "chat (the template rewrites it), so there is no end of it to continue from")


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes <, >, & for HTML; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template does not parse (line {exc.lineno}): {exc.message}") from None


def render_chat_template(source: str, messages: Any, add_generation_prompt: bool = True,
                         special_tokens: dict[str, str | None] | None = None, **extra: Any) -> str:
    """Render `source` for `messages`; `special_tokens` supplies bos_token, eos_token, ... to the template."""
    messages = validate_messages(messages)
    context = dict(special_tokens or {})
    context.update(extra)
    return compile_chat_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **context)
