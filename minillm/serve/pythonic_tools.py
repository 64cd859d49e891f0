"""The "pythonic" tool-call syntax (Llama 3.2 and 4, ...; vLLM's --tool-call-parser pythonic; a server option of
chapter 10's): an answer that is a Python list of calls,

    [get_weather(city="Lima"), add(a=1, b=2)]

(Llama 4 may wrap it in <|python_start|> ... <|python_end|>), keyword arguments only, each a literal. The list is
the whole answer or there is no call: text that merely contains brackets stays text. It is read with Python's own
parser (ast) and ast.literal_eval, so nothing in it is ever run. No constraint keeps such a call whole (unlike
Hermes' tagged calls, tool_parser.py): a list that does not parse is answered as the text it is.

While streaming, an answer that starts with "[" is held back until it ends, then sent as calls or as text; any
other answer streams as content.
"""
from __future__ import annotations

import ast

from minillm.serve.tool_parser import WholeAnswerCallsParser, make_call

WRAP = ("<|python_start|>", "<|python_end|>")


def parse_pythonic_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content, calls): (None, the calls) when the whole answer is a list of calls, else (the text, [])."""
    body = text.strip()
    if body.startswith(WRAP[0]):
        body = body[len(WRAP[0]):].removesuffix(WRAP[1]).strip()
    calls = _calls(body) if body.startswith("[") else None
    if not calls:
        return (text or None), []
    return None, calls


def _calls(body: str) -> list[dict] | None:
    try:
        tree = ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        if len(arguments) != len(node.keywords):  # a **kwargs
            return None
        calls.append(make_call(node.func.id, arguments))
    return calls


class StreamingPythonicParser(WholeAnswerCallsParser):
    """Feed the answer's new text; get back ("content", text) and ("call", (index, tool call)) events."""

    def __init__(self) -> None:
        super().__init__(parse_pythonic_calls, ("[", WRAP[0]))
