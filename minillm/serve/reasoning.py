"""Reasoning outputs: a thinking model's `<think> ... </think>` apart from its answer (vLLM's --reasoning-parser;
a server option of chapter 10's, built in no exercise).

Reasoning models (DeepSeek-R1, Qwen3, SmolLM3, ...) write their chain of thought before the answer, between
`<think>` and `</think>`. A server that knows the model's convention returns the thought as the message's
`reasoning_content` and only the rest as `content` (streamed: `delta.reasoning_content`, then `delta.content`), and
`include_reasoning: false` leaves the thought out. The parsers differ in one point:

    deepseek_r1   the chat template already opens `<think>` in the prompt, so the answer starts inside the thought:
                  everything before `</think>` is reasoning (an answer cut before it is all reasoning)
    qwen3         the thought is only there if the answer starts with `<think>`; without it, all is content

split_reasoning reads a finished answer; StreamingReasoningParser does it while the answer streams (a piece that may
be the start of `</think>` is held back, as stop strings are). minillm/serve/answer_parser.py runs it before the
tool-call parser: calls are read from the content only.
"""
from __future__ import annotations

from minillm.engine.detokenizer import stream_safe_length

REASONING_PARSERS = ("deepseek_r1", "qwen3")
THINK, END_THINK = "<think>", "</think>"


def split_reasoning(text: str, parser: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a finished answer, each None when empty."""
    stripped = text.lstrip()
    opened = stripped.startswith(THINK)
    if parser == "qwen3" and not opened:
        return None, text or None
    if opened:
        stripped = stripped[len(THINK):]
    else:
        stripped = text
    reasoning, found, content = stripped.partition(END_THINK)
    if not found:  # still thinking when it stopped
        return reasoning or None, None
    return reasoning or None, content.lstrip("\n") or None


class StreamingReasoningParser:
    """Feed the answer's new text; get back ("reasoning", text) and ("content", text) events."""

    def __init__(self, parser: str) -> None:
        if parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning parser must be one of {', '.join(REASONING_PARSERS)}, got {parser!r}")
        self.parser = parser
        self._pending = ""
        self._state = "start"  # "start": before the first text that decides; "thinking"; "answering"
        self._after_think = False  # just left the thought: the newlines that follow </think> are dropped

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._pending += text
        events: list[tuple[str, str]] = []
        if self._state == "start":
            head = self._pending.lstrip()
            if THINK.startswith(head) and len(head) < len(THINK):  # too little to tell yet
                return events
            if head.startswith(THINK):
                self._pending, self._state = head[len(THINK):], "thinking"
            else:
                self._state = "thinking" if self.parser == "deepseek_r1" else "answering"
        if self._state == "thinking":
            end = self._pending.find(END_THINK)
            if end < 0:
                cut = stream_safe_length(self._pending, [END_THINK])  # a possible start of END_THINK waits
                if cut:
                    events.append(("reasoning", self._pending[:cut]))
                self._pending = self._pending[cut:]
                return events
            if end:
                events.append(("reasoning", self._pending[:end]))
            self._pending, self._state, self._after_think = self._pending[end + len(END_THINK):], "answering", True
        if self._after_think:
            self._pending = self._pending.lstrip("\n")
            if not self._pending:
                return events
            self._after_think = False
        if self._pending:
            events.append(("content", self._pending))
            self._pending = ""
        return events

    def finish(self) -> list[tuple[str, str]]:
        """The answer ended: what is held back goes out (inside the thought, as reasoning)."""
        rest, self._pending = self._pending, ""
        if not rest or (self._state == "answering" and self._after_think and not rest.strip("\n")):
            return []
        if self._state == "start":
            return [("reasoning" if self.parser == "deepseek_r1" else "content", rest)]
        return [("reasoning" if self._state == "thinking" else "content", rest)]

