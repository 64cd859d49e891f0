"""tool_choice "auto": the model decides between text and a tool call, in Hermes' syntax (chapter 10).

Models trained for tool use (Hermes, Qwen2.5, ...) write a call inside their answer as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and vLLM reads such calls out of the text with a *tool-call parser* (`--enable-auto-tool-choice
--tool-call-parser hermes`). minillm does the same, and one thing more: the request runs under a structural tag
(minillm/structured/structural_tag.py) that leaves the text free but makes everything after a `<tool_call>` one
whole call of one of the request's tools, its arguments valid under that tool's schema, then `</tool_call>`.
So a call the model starts is always one the parser can read; whether to call stays the model's choice.

parse_tool_calls reads a finished answer: the calls in order, and the text around them as the content.
StreamingToolParser does it while the answer streams: text goes out as content until a `<tool_call>` begins
(a piece that may be the start of one is held back, as stop strings are), a call goes out whole, as one
tool_calls delta, once its `</tool_call>` arrives. A call cut short (max_tokens) stays text.

What every parser shares lives here too: make_call (OpenAI's tool call), and the streaming bases of the syntaxes
read once the answer ends (HeldCallsParser, WholeAnswerCallsParser: pythonic_tools.py, json_tools.py).
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from minillm.engine.detokenizer import stream_safe_length

# pythonic: pythonic_tools.py; llama3_json, mistral: json_tools.py (answer_parser.py picks among them)
TOOL_CALL_PARSERS = ("hermes", "pythonic", "llama3_json", "mistral")
BEGIN, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(BEGIN) + r"\s*(.*?)\s*" + re.escape(END), re.DOTALL)


def hermes_structural_tag(tools: list[dict]) -> dict:
    """The structural tag of Hermes calls to `tools` (OpenAI's tools list): free text, and after BEGIN one call
    {"name": <a tool>, "arguments": <its parameters' schema>} closed by END."""
    tags = []
    for tool in tools:
        function = tool["function"]
        tags.append({"type": "tag", "begin": f'{BEGIN}\n{{"name": {json.dumps(function["name"])}, "arguments": ',
                     "content": {"type": "json_schema",
                                 "json_schema": function.get("parameters", {"type": "object"})},
                     "end": f"}}\n{END}"})
    return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [BEGIN], "tags": tags}}


def _call(body: str) -> dict | None:
    """OpenAI's tool call for one call's JSON text, or None when it is not {"name": str, "arguments": ...}."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or "arguments" not in value:
        return None
    return make_call(value["name"], value["arguments"])


def make_call(name: str, arguments: Any) -> dict:
    """OpenAI's tool call of `name` with `arguments` (a JSON value, sent as its JSON text), with a fresh id."""
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the content: the text outside the calls, stripped, None if empty; the calls, in order). A block that is
    no call (its JSON does not parse) stays in the content."""
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        call = _call(match.group(1))
        if call is None:
            continue
        kept.append(text[last:match.start()])
        calls.append(call)
        last = match.end()
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None), calls


class HeldCallsParser:
    """What the streaming parsers of syntaxes read only once the answer ends share (pythonic_tools.py,
    json_tools.py): `feed` (a subclass's) holds back what may be calls; `finish` reads the held text with `parse`
    (text -> (content or None, calls)) into ("content", ...) and ("call", (index, tool call)) events, or sends it
    all as content when it holds no call."""

    def __init__(self, parse) -> None:
        self._parse, self._pending, self.num_calls = parse, "", 0

    def finish(self) -> list[tuple[str, Any]]:
        rest, self._pending = self._pending, ""
        if not rest:
            return []
        content, calls = self._parse(rest)
        if not calls:
            return [("content", rest)]
        events = [("content", content)] if content else []
        events += [("call", (self.num_calls + i, call)) for i, call in enumerate(calls)]
        self.num_calls += len(calls)
        return events


class WholeAnswerCallsParser(HeldCallsParser):
    """A syntax whose calls are the whole answer (pythonic's `[f(x=1)]`, Llama 3's JSON): an answer that starts
    (after whitespace) with one of `openers` is held until it ends; any other streams as content."""

    def __init__(self, parse, openers: tuple[str, ...]) -> None:
        super().__init__(parse)
        self.openers = openers
        self._holding: bool | None = None  # undecided while the answer's start may still become an opener

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._pending += text
        if self._holding is None:
            head = self._pending.lstrip()
            if not head or any(len(head) < len(o) and o.startswith(head) for o in self.openers):
                return []
            self._holding = head.startswith(self.openers)
        if self._holding:
            return []
        rest, self._pending = self._pending, ""
        return [("content", rest)]


class StreamingToolParser:
    """Feed the answer's new text as it streams; get back ("content", text) and ("call", (its index among the
    answer's calls, the tool call)) events."""

    def __init__(self) -> None:
        self._pending = ""  # text not sent yet: a possible start of BEGIN, or a call not closed yet
        self.num_calls = 0

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._pending += text
        events: list[tuple[str, Any]] = []
        while True:
            start = self._pending.find(BEGIN)
            if start < 0:  # no call begins: send all but a tail that may be BEGIN's start
                cut = stream_safe_length(self._pending, [BEGIN])  # (as a stream holds back a stop string's start)
                if cut:
                    events.append(("content", self._pending[:cut]))
                    self._pending = self._pending[cut:]
                return events
            if start:
                events.append(("content", self._pending[:start]))
                self._pending = self._pending[start:]
            end = self._pending.find(END)
            if end < 0:  # inside a call: wait for its end
                return events
            block = self._pending[:end + len(END)]
            match = _CALL.match(block)
            call = _call(match.group(1)) if match else None
            if call is None:  # no call after all: it was text
                events.append(("content", block))
            else:
                events.append(("call", (self.num_calls, call)))
                self.num_calls += 1
            self._pending = self._pending[end + len(END):]

    def finish(self) -> list[tuple[str, Any]]:
        """The answer ended: what is held back (an unclosed call, a partial BEGIN) goes out as content."""
        rest, self._pending = self._pending, ""
        return [("content", rest)] if rest else []

