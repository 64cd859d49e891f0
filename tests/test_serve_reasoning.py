"""--reasoning-parser (minillm/serve/reasoning.py, answer_parser.py): a thinking model's `<think> ... </think>` as
reasoning_content apart from the content, in full and streamed, left out with include_reasoning false; calls read
from the content only; the parsers' two conventions."""
from __future__ import annotations

import json
import random

import httpx
import pytest

from minillm.serve.answer_parser import AnswerParser, parse_answer
from minillm.serve.reasoning import StreamingReasoningParser, split_reasoning
from serve_tiny import MODEL
from test_serve_auto_tools import CALL, TOOLS, scripted_server
from tiny import one_thread  # noqa: F401 (autouse fixture)

THOUGHT = "<think>The user asks for weather.\nA tool can tell.</think>\n\n"


@pytest.mark.parametrize("text, parser, want", [
    (THOUGHT + "It is sunny.", "deepseek_r1", ("The user asks for weather.\nA tool can tell.", "It is sunny.")),
    (THOUGHT + "It is sunny.", "qwen3", ("The user asks for weather.\nA tool can tell.", "It is sunny.")),
    ("thinking without the tag</think>answer", "deepseek_r1", ("thinking without the tag", "answer")),
    ("thinking without the tag</think>answer", "qwen3", (None, "thinking without the tag</think>answer")),
    ("<think>cut short", "deepseek_r1", ("cut short", None)),
    ("<think>cut short", "qwen3", ("cut short", None)),
    ("no thought at all", "qwen3", (None, "no thought at all")),
    ("no thought at all", "deepseek_r1", ("no thought at all", None)),
])
def test_split_reasoning(text, parser, want):
    assert split_reasoning(text, parser) == want


@pytest.mark.parametrize("seed", range(24))
def test_the_streaming_parsers_agree_with_the_whole_answer_however_it_is_cut(seed):
    rng = random.Random(seed)
    parser = rng.choice(["deepseek_r1", "qwen3"])
    tools = "hermes" if rng.random() < 0.5 else None
    text = rng.choice([THOUGHT + "It is sunny.", THOUGHT + "ok" + CALL, "<think>a <tool_call> inside</think>b",
                       "plain</think>rest", "<thi", "no thought", THOUGHT, "<think>cut</thi"])
    streaming = AnswerParser(parser, tools)
    got: dict[str, list] = {"reasoning": [], "content": [], "call": []}
    i = 0
    while i < len(text):
        n = rng.randint(1, 5)
        for kind, value in streaming.feed(text[i:i + n]):
            got[kind].append(value)
        i += n
    for kind, value in streaming.finish():
        got[kind].append(value)
    reasoning, content, calls = parse_answer(text, parser, tools)
    assert ("".join(got["reasoning"]) or None) == reasoning, (text, parser)
    assert ("".join(got["content"]).strip() if tools else "".join(got["content"])) == (content or ""), (text, parser)
    assert [c["function"] for _, c in got["call"]] == [c["function"] for c in calls]


def test_a_bad_parser_name_is_refused():
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        StreamingReasoningParser("r2")


def stream(url: str, **fields) -> tuple[str, str, list, str]:
    reasoning, content, calls, finish = [], [], [], None
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 150, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "weather?"}], **fields}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]
                reasoning.append(delta["delta"].get("reasoning_content") or "")
                content.append(delta["delta"].get("content") or "")
                calls += delta["delta"].get("tool_calls", [])
                finish = delta["finish_reason"] or finish
    return "".join(reasoning), "".join(content), calls, finish


def chat(url: str, **fields) -> dict:
    response = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 150, "temperature": 0, "messages": [{"role": "user", "content": "weather?"}],
        **fields})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_the_server_splits_the_thought_from_the_answer():
    with scripted_server(THOUGHT + "It is sunny.", reasoning_parser="deepseek_r1") as srv:
        choice = chat(srv.url)
        assert choice["message"] == {"role": "assistant", "reasoning_content":
                                     "The user asks for weather.\nA tool can tell.", "content": "It is sunny."}
        assert stream(srv.url) == ("The user asks for weather.\nA tool can tell.", "It is sunny.", [], "stop")
        assert "reasoning_content" not in chat(srv.url, include_reasoning=False)["message"]
        assert stream(srv.url, include_reasoning=False)[:2] == ("", "It is sunny.")
        # a shaped answer (a regex) starts at the first token: nothing to split
        shaped = chat(srv.url, structured_outputs={"regex": "[a-z]{3}"})
        assert "reasoning_content" not in shaped["message"] and len(shaped["message"]["content"]) == 3


def test_thought_then_a_call_with_both_parsers():
    with scripted_server(THOUGHT + "Checking." + CALL, reasoning_parser="qwen3", tool_call_parser="hermes") as srv:
        choice = chat(srv.url, tools=TOOLS)
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
        assert choice["message"]["reasoning_content"].startswith("The user asks")
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
        reasoning, content, calls, finish = stream(srv.url, tools=TOOLS)
        assert reasoning.startswith("The user asks") and content == "Checking." and finish == "tool_calls"
        assert [c["function"]["arguments"] for c in calls] == ['{"city": "Lima"}']


def test_include_reasoning_false_needs_the_parser():
    with scripted_server("x") as srv:
        response = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 2, "include_reasoning": False,
            "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 400 and "--reasoning-parser" in response.json()["error"]["message"]
