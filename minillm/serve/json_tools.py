"""Two more tool-call syntaxes for tool_choice "auto" (vLLM's --tool-call-parser llama3_json and mistral; chapter
10's server), both JSON, both kept whole by a structural tag as Hermes' calls are (tool_parser.py):

    llama3_json   Llama 3.1 / 3.2 / 3.3 with JSON tool calling: the answer is calls and nothing else,
                  {"name": "get_weather", "parameters": {"city": "Lima"}}, several separated by ";", maybe after
                  <|python_tag|>. "arguments" is read as well as "parameters". The tag: a call of one of the
                  request's tools, its parameters valid, once the model writes `{"name": `.
    mistral       Mistral's: content, then [TOOL_CALLS] and a JSON array [{"name": ..., "arguments": {...}}, ...].
                  The tag: after [TOOL_CALLS], an array of calls of the request's tools. [TOOL_CALLS] is a special
                  token of Mistral's tokenizers, so these requests keep special tokens' text (as vLLM does).

parse_llama3_calls / parse_mistral_calls read a finished answer as (content or None, calls); an answer whose JSON
does not read as calls stays content. The streaming parsers send content as it comes and hold back what may be a
call (an answer that starts with "{" or <|python_tag|>; everything from [TOOL_CALLS] on, and a piece that may be
its start), then send the calls when the answer ends.
"""
from __future__ import annotations

import json
from typing import Any

from minillm.engine.detokenizer import stream_safe_length
from minillm.serve.tool_parser import HeldCallsParser, WholeAnswerCallsParser, make_call

PYTHON_TAG, TOOL_CALLS = "<|python_tag|>", "[TOOL_CALLS]"


def _parameters(tool: dict) -> dict | bool:
    return tool["function"].get("parameters", {"type": "object"})


def llama3_structural_tag(tools: list[dict]) -> dict:
    """Free text in which `{"name": ` starts a whole call {"name": <a tool>, "parameters": <its schema>}."""
    tags = [{"type": "tag", "begin": f'{{"name": {json.dumps(tool["function"]["name"])}, "parameters": ',
             "content": {"type": "json_schema", "json_schema": _parameters(tool)}, "end": "}"} for tool in tools]
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ['{"name": '], "tags": tags}}


def mistral_structural_tag(tools: list[dict]) -> dict:
    """Free text in which [TOOL_CALLS] starts a whole JSON array of calls of the request's tools."""
    calls = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                               "arguments": _parameters(tool)},
              "required": ["name", "arguments"]} for tool in tools]
    array = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [TOOL_CALLS], "tags": [
        {"type": "tag", "begin": TOOL_CALLS, "content": {"type": "json_schema", "json_schema": array}, "end": ""}]}}


def _calls_of(values: list[Any]) -> list[dict] | None:
    """OpenAI's tool calls for JSON values {"name": str, "arguments" or "parameters": ...}; None if one is not."""
    calls = []
    for value in values:
        arguments = value.get("arguments", value.get("parameters")) if isinstance(value, dict) else None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) or arguments is None:
            return None
        calls.append(make_call(value["name"], arguments))
    return calls or None


def parse_llama3_calls(text: str) -> tuple[str | None, list[dict]]:
    """(None, the calls) when the whole answer is calls separated by ";", else (the text, [])."""
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    values, decoder, at = [], json.JSONDecoder(), 0
    while body.startswith("{") and at < len(body):
        try:
            value, end = decoder.raw_decode(body, at)
        except ValueError:
            return (text or None), []
        values.append(value)
        at = end
        while at < len(body) and body[at] in " \t\r\n;":
            at += 1
    calls = _calls_of(values) if values and at >= len(body) else None
    return (None, calls) if calls else ((text or None), [])


def parse_mistral_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the content before [TOOL_CALLS], the calls in the array after it), or (the text, []) when there is none."""
    start = text.find(TOOL_CALLS)
    if start < 0:
        return (text or None), []
    try:
        value, end = json.JSONDecoder().raw_decode(text, start + len(TOOL_CALLS))
    except ValueError:
        return (text or None), []
    calls = _calls_of(value if isinstance(value, list) else [value])
    if not calls:
        return (text or None), []
    content = (text[:start] + text[end:]).strip()
    return (content or None), calls


class StreamingLlama3Parser(WholeAnswerCallsParser):
    """Feed the answer's new text; ("content", text) and, at finish, ("call", (index, tool call)) events."""

    def __init__(self) -> None:
        super().__init__(parse_llama3_calls, ("{", PYTHON_TAG))


class StreamingMistralParser(HeldCallsParser):
    """Content streams until [TOOL_CALLS]; from there on everything is held until the answer ends."""

    def __init__(self) -> None:
        super().__init__(parse_mistral_calls)

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._pending += text
        start = self._pending.find(TOOL_CALLS)
        cut = start if start >= 0 else stream_safe_length(self._pending, [TOOL_CALLS])
        if cut <= 0:
            return []
        sent, self._pending = self._pending[:cut], self._pending[cut:]
        return [("content", sent)]
