"""tool_choice "auto" (minillm/serve/tool_parser.py): Hermes calls read out of the answer, in full and while it
streams; the structural tag that keeps a started call whole; the flags that turn it on."""
from __future__ import annotations

import dataclasses
import json
import random

import httpx
import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.serve.server import ServerThread
from minillm.serve.tool_parser import StreamingToolParser, hermes_structural_tag, parse_tool_calls
from serve_tiny import CONFIG, MODEL, tiny_app
from test_engine import tiny_model
from tiny import ByteTokenizer, one_thread  # noqa: F401 (autouse fixture)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Lima"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
ANSWER = "Let me check." + CALL + " Done."


def test_parse_reads_the_calls_and_keeps_the_text_around_them():
    content, calls = parse_tool_calls(ANSWER + "\n" + CALL.replace("Lima", "Paris"))
    assert content == "Let me check. Done." and [c["function"]["name"] for c in calls] == ["get_weather"] * 2
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Lima"}, {"city": "Paris"}]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in calls)
    assert parse_tool_calls("no call") == ("no call", [])
    assert parse_tool_calls(CALL) [0] is None
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(broken) == (broken, [])  # no call: it stays text
    assert parse_tool_calls("<tool_call>\n{\"name\": \"add\", \"argu") == ("<tool_call>\n{\"name\": \"add\", \"argu", [])


def fed_in_pieces(parser, text: str, rng: random.Random, longest: int) -> tuple[list[str], list[tuple]]:
    """(content pieces, (index, call) pairs) from a streaming parser fed `text` in random pieces, then finished."""
    content, calls, i = [], [], 0
    events = []
    while i < len(text):
        n = rng.randint(1, longest)
        events += parser.feed(text[i:i + n])
        i += n
    for kind, value in events + parser.finish():
        (content.append(value) if kind == "content" else calls.append(value))
    return content, calls


@pytest.mark.parametrize("seed", range(20))
def test_the_streaming_parser_agrees_with_the_whole_answer_however_it_is_cut(seed):
    rng = random.Random(seed)
    text = rng.choice([ANSWER, CALL + CALL, "a <tool_ call> b", "x<tool_call", ANSWER + "<tool_call>\n{\"na"])
    content, calls = fed_in_pieces(StreamingToolParser(), text, rng, 6)
    want_content, want_calls = parse_tool_calls(text)
    assert "".join(content).strip() == (want_content or "") and [k for k, _ in calls] == list(range(len(calls)))
    assert [c["function"] for _, c in calls] == [c["function"] for c in want_calls]


class Scripted(torch.nn.Module):
    """The tiny model with its logits pushed to spell `script`, one byte per generated token, from each new
    request's first token on (one request at a time, no prefix caching: a prefill starts at position 0)."""

    def __init__(self, inner, script: bytes) -> None:
        super().__init__()
        self.inner, self.script, self.generated = inner, script, 0

    def forward(self, input_ids, positions, *rest):
        if int(positions[0]) == 0:
            self.generated = 0
        return self.inner(input_ids, positions, *rest)

    def compute_logits(self, hidden):
        logits = self.inner.compute_logits(hidden)
        if self.generated < len(self.script):
            logits[:, self.script[self.generated]] += 100.0
        else:
            logits[:, CONFIG.eos_token_id] += 100.0
        self.generated += 1
        return logits


def scripted_server(script: str, **kwargs):
    config = dataclasses.replace(CONFIG, max_position_embeddings=256)
    engine = LLMEngine(Scripted(tiny_model(config, seed=3), script.encode()), ByteTokenizer(), config,
                       EngineConfig(max_model_len=256, max_num_seqs=1, block_size=4, num_kv_blocks=128,
                                    scheduling="continuous", kv_layout="paged"))
    app, _ = tiny_app(engine, **kwargs)
    return ServerThread(app)


def chat(url: str, **fields) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 120, "temperature": 0, "tools": TOOLS,
        "messages": [{"role": "user", "content": "weather?"}], **fields})


def stream(url: str, **fields) -> tuple[str, list[dict], str]:
    content, calls, finish = [], [], None
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 120, "temperature": 0, "tools": TOOLS, "stream": True,
            "messages": [{"role": "user", "content": "weather?"}], **fields}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                content.append(choice["delta"].get("content") or "")
                calls += choice["delta"].get("tool_calls", [])
                finish = choice["finish_reason"] or finish
    return "".join(content), calls, finish


def test_a_model_that_calls_gets_tool_calls_in_full_and_streamed():
    with scripted_server(ANSWER, tool_call_parser="hermes") as srv:
        choice = chat(srv.url).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Let me check. Done."
        (call,) = choice["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Lima"}'}
        content, calls, finish = stream(srv.url)
        assert content == "Let me check. Done." and finish == "tool_calls"
        assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
            [(0, "get_weather", '{"city": "Lima"}')]


def test_a_call_the_model_starts_is_kept_whole_by_the_structural_tag():
    """The model tries to call get_weather with a city outside the enum: the constraint does not let it; the
    call still comes out whole, its arguments valid, whatever the greedy fallback picked."""
    with scripted_server(CALL.replace("Lima", "Oslo"), tool_call_parser="hermes") as srv:
        choice = chat(srv.url).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Lima")


def test_text_only_answers_and_servers_without_the_parser():
    with scripted_server("Just text.", tool_call_parser="hermes") as srv:
        choice = chat(srv.url).json()["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "Just text."} and choice["finish_reason"] == "stop"
        assert stream(srv.url)[0] == "Just text."
        none = chat(srv.url, tool_choice="none").json()["choices"][0]
        assert "tool_calls" not in none["message"]
    with scripted_server(ANSWER) as srv:
        response = chat(srv.url, tool_choice="auto")
        assert response.status_code == 400 and "--enable-auto-tool-choice" in response.json()["error"]["message"]


def test_the_structural_tag_names_every_tool():
    tag = hermes_structural_tag(TOOLS)
    assert tag["format"]["triggers"] == ["<tool_call>"]
    assert [t["begin"] for t in tag["format"]["tags"]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": ', '<tool_call>\n{"name": "add", "arguments": ']


def test_the_flags_go_together(capsys):
    from minillm.cli import main
    assert main(["serve", "--enable-auto-tool-choice", "--port", "0"]) == 2
    assert "go together" in capsys.readouterr().err


def test_a_conversation_with_calls_and_tool_answers_reaches_the_template():
    """The assistant's earlier calls and a tool's answer come back in the next request: the template sees the
    calls (arguments as a mapping) and the tool message's id and name."""
    from minillm.serve.chat_prompt import render_chat
    from minillm.serve.protocol import ChatCompletionRequest
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                "{% for c in m.tool_calls or [] %}[{{ c.function.name }}:{{ c.function.arguments.city }}]{% endfor %}"
                "{% if m.tool_call_id %}({{ m.tool_call_id }} {{ m.name }}){% endif %}\n{% endfor %}")
    request = ChatCompletionRequest(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Lima"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"}],
        add_generation_prompt=False)
    text, _ = render_chat(ByteTokenizer(), template, request)
    assert text == "<user>weather?<assistant>[get_weather:Lima]<tool>sunny(call_1 get_weather)"  # (trim_blocks)


def test_auto_calls_with_n_logprobs_and_a_cut_call():
    """Two choices, log-probs, streamed: each choice reads its own calls and its log-probs still cover every
    token; an answer cut by max_tokens inside a call keeps the unfinished call as text, finish_reason "length"."""
    with scripted_server(ANSWER, tool_call_parser="hermes") as srv:
        events = []
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60, json={
                "model": MODEL, "max_tokens": 120, "temperature": 0, "tools": TOOLS, "stream": True, "n": 2,
                "logprobs": True, "messages": [{"role": "user", "content": "weather?"}]}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:])["choices"][0])
        for index in (0, 1):
            mine = [e for e in events if e["index"] == index]
            assert "".join(e["delta"].get("content") or "" for e in mine) == "Let me check. Done."
            assert [c["function"]["name"] for e in mine for c in e["delta"].get("tool_calls", [])] == ["get_weather"]
            assert mine[-1]["finish_reason"] == "tool_calls"
            tokens = [t for e in mine if e["logprobs"] for t in e["logprobs"]["content"]]
            assert "".join(t["token"] for t in tokens).startswith(ANSWER[:20]) and len(tokens) >= len(ANSWER)
        cut = chat(srv.url, max_tokens=30).json()["choices"][0]
        assert cut["finish_reason"] == "length" and "tool_calls" not in cut["message"]
        assert cut["message"]["content"] == ANSWER[:30]


PYTHONIC = '[get_weather(city="Lima"), add(a=1, b=-2)]'


@pytest.mark.parametrize("text, want", [
    (PYTHONIC, [("get_weather", {"city": "Lima"}), ("add", {"a": 1, "b": -2})]),
    ("<|python_start|>" + PYTHONIC + "<|python_end|>", [("get_weather", {"city": "Lima"}), ("add", {"a": 1, "b": -2})]),
    ("  [f(x=[1, {'k': None}], y=True)]\n", [("f", {"x": [1, {"k": None}], "y": True})]),
    ("[1, 2, 3]", []), ("see [f(x=1)] here", []), ("[f(1)]", []), ("[f(x=g())]", []), ("[f(**k)]", []),
    ("[__import__('os').system('x')]", []), ("[f(x=1)", []), ("[]", []),
])
def test_pythonic_calls_are_read_never_run(text, want):
    from minillm.serve.pythonic_tools import parse_pythonic_calls
    content, calls = parse_pythonic_calls(text)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == want
    assert content == (None if want else text)


@pytest.mark.parametrize("seed", range(8))
def test_the_pythonic_stream_agrees_with_the_whole_answer(seed):
    from minillm.serve.pythonic_tools import StreamingPythonicParser, parse_pythonic_calls
    rng = random.Random(seed)
    text = rng.choice([PYTHONIC, "  " + PYTHONIC, "plain [text]", "[not a call", "<|python_start|>" + PYTHONIC])
    content, calls = fed_in_pieces(StreamingPythonicParser(), text, rng, 4)
    want_content, want_calls = parse_pythonic_calls(text)
    assert ("".join(content) or None) == want_content
    assert [c["function"] for _, c in calls] == [c["function"] for c in want_calls]


def test_the_pythonic_parser_on_the_server():
    with scripted_server(PYTHONIC, tool_call_parser="pythonic") as srv:
        choice = chat(srv.url).json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather", "add"]
        content, calls, finish = stream(srv.url)
        assert content == "" and finish == "tool_calls" and [c["index"] for c in calls] == [0, 1]
    with scripted_server("No call [here].", tool_call_parser="pythonic") as srv:
        assert chat(srv.url).json()["choices"][0]["message"] == {"role": "assistant", "content": "No call [here]."}
