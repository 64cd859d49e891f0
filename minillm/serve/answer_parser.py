"""A chat answer read for its parts: the thought (reasoning.py), the calls (tool_parser.py for Hermes' syntax,
pythonic_tools.py for Python's, json_tools.py for Llama 3's and Mistral's JSON), the content (the server of chapter
10; built in no exercise).

The reasoning parser runs first, and the tool-call parser reads only what it passes on as content, so a call
mentioned while thinking is not made. parse_answer reads a finished answer; AnswerParser a streaming one, turning
each new piece of text into ("reasoning", text), ("content", text) and ("call", (index, tool call)) events.
"""
from __future__ import annotations

from typing import Any

from minillm.serve.json_tools import (StreamingLlama3Parser, StreamingMistralParser, llama3_structural_tag,
                                      mistral_structural_tag, parse_llama3_calls, parse_mistral_calls)
from minillm.serve.pythonic_tools import StreamingPythonicParser, parse_pythonic_calls
from minillm.serve.reasoning import StreamingReasoningParser, split_reasoning
from minillm.serve.tool_parser import TOOL_CALL_PARSERS, StreamingToolParser, hermes_structural_tag, parse_tool_calls

# --tool-call-parser -> (read a finished answer, its streaming parser, the structural tag that keeps calls whole or
# None: a pythonic call is a whole answer, read after the fact)
TOOL_PARSERS = {"hermes": (parse_tool_calls, StreamingToolParser, hermes_structural_tag),
                "pythonic": (parse_pythonic_calls, StreamingPythonicParser, None),
                "llama3_json": (parse_llama3_calls, StreamingLlama3Parser, llama3_structural_tag),
                "mistral": (parse_mistral_calls, StreamingMistralParser, mistral_structural_tag)}
assert tuple(TOOL_PARSERS) == TOOL_CALL_PARSERS


def parse_answer(text: str, reasoning_parser: str | None, tool_parser: str | None
                 ) -> tuple[str | None, str | None, list[dict]]:
    """(reasoning or None, content or None, tool calls) of a finished answer; tool_parser None: no calls."""
    reasoning, content = split_reasoning(text, reasoning_parser) if reasoning_parser else (None, text or None)
    calls: list[dict] = []
    if tool_parser is not None and content:
        content, calls = TOOL_PARSERS[tool_parser][0](content)
    return reasoning, content, calls


class AnswerParser:
    def __init__(self, reasoning_parser: str | None, tool_parser: str | None) -> None:
        self.reasoning = StreamingReasoningParser(reasoning_parser) if reasoning_parser else None
        self.tools = None if tool_parser is None else TOOL_PARSERS[tool_parser][1]()

    @property
    def num_calls(self) -> int:
        return self.tools.num_calls if self.tools is not None else 0

    def feed(self, text: str) -> list[tuple[str, Any]]:
        return self._route(self.reasoning.feed(text) if self.reasoning is not None else [("content", text)])

    def finish(self) -> list[tuple[str, Any]]:
        events = self._route(self.reasoning.finish() if self.reasoning is not None else [])
        return events + (self.tools.finish() if self.tools is not None else [])

    def _route(self, events: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Content goes through the tool-call parser (when there is one); the rest as it is."""
        routed: list[tuple[str, Any]] = []
        for kind, value in events:
            routed.extend(self.tools.feed(value) if kind == "content" and self.tools is not None
                          else [(kind, value)])
        return routed
