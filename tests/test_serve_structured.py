"""Structured outputs, allowed_token_ids and bad_words over HTTP (minillm/serve/structured_fields.py): every spelling
a client may use reaches the engine's constraint, and a bad one is a 400 naming the field the client sent."""
from __future__ import annotations

import json
import re

import httpx
import pytest

from minillm.serve.server import ServerThread
from serve_tiny import MODEL, tiny_app, tiny_engine
from tiny import one_thread  # noqa: F401 (autouse fixture)

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
GRAMMAR = 'root ::= "(" root ")" | "<" root ">" | [a-z]{1,3}'  # brackets nested to any depth: no regex can say it


TAGS = {"type": "structural_tag", "format": {"type": "tags_with_separator", "separator": ",", "at_least_one": True,
                                             "tags": [{"type": "tag", "begin": "<n>", "end": "</n>",
                                                       "content": {"type": "regex", "pattern": "[0-9]{1,3}"}}]}}
TAGGED = r"<n>[0-9]{1,3}</n>(,<n>[0-9]{1,3}</n>)*"


def _balanced(text: str) -> bool:
    inner = text
    while inner[:1] + inner[-1:] in ("()", "<>"):
        inner = inner[1:-1]
    return re.fullmatch("[a-z]{1,3}", inner) is not None and len(text) - len(inner) <= 2 * 39


@pytest.fixture(scope="module")
def url():
    app, _ = tiny_app(tiny_engine(max_model_len=128))
    with ServerThread(app) as srv:
        yield srv.url


def complete(url: str, **fields) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 40, **fields},
                      timeout=60)


def chat(url: str, **fields) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "max_tokens": 40, "messages": [
        {"role": "user", "content": "x"}], **fields}, timeout=60)


def texts(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [c["text"] if "text" in c else c["message"]["content"] for c in response.json()["choices"]]


@pytest.mark.parametrize("send", [complete, chat])
def test_every_spelling_constrains_the_answer(url, send):
    choices = ["alpha", "beta", "gamma"]
    for fields in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        assert all(t in choices for t in texts(send(url, n=4, seed=1, **fields)))
    for fields in ({"guided_regex": r"\d{3}-[a-z]{2}"}, {"structured_outputs": {"regex": r"\d{3}-[a-z]{2}"}}):
        assert all(re.fullmatch(r"\d{3}-[a-z]{2}", t) for t in texts(send(url, n=3, seed=2, **fields)))
    for fields in ({"guided_json": SCHEMA}, {"guided_json": json.dumps(SCHEMA)},
                   {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
                   {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}):
        for text in texts(send(url, n=3, seed=3, **fields)):
            assert isinstance(json.loads(text)["ok"], bool), (fields, text)
    for fields in ({"guided_grammar": GRAMMAR}, {"structured_outputs": {"grammar": GRAMMAR}}):
        response = send(url, n=3, seed=7, **fields)
        for text, choice in zip(texts(response), response.json()["choices"]):
            assert _balanced(text) or choice["finish_reason"] == "length", (fields, text)
    for fields in ({"structural_tag": json.dumps(TAGS)}, {"response_format": TAGS}):
        response = send(url, n=3, seed=8, **fields)
        for text, choice in zip(texts(response), response.json()["choices"]):
            assert re.fullmatch(TAGGED, text) or choice["finish_reason"] == "length", (fields, text)
    for text in texts(send(url, n=2, seed=4, max_tokens=80, response_format={"type": "json_object"})):
        assert text and text.lstrip()[0] in '{["-0123456789tfn'  # a JSON value begins (it may run out of tokens)


def test_allowed_token_ids_and_bad_words_pass_through(url):
    allowed = [ord(c) for c in "ab"]
    assert all(set(t) <= set("ab") for t in texts(complete(url, n=3, seed=5, max_tokens=8, ignore_eos=True,
                                                           allowed_token_ids=allowed)))
    for text in texts(complete(url, n=3, seed=6, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed,
                               bad_words=["aa", "bb"])):
        assert "aa" not in text and "bb" not in text and set(text) <= set("ab"), text


@pytest.mark.parametrize("fields, param, message", [
    ({"guided_regex": "(ab"}, "guided_regex", "regex"),
    ({"structured_outputs": {"json": {"type": "object", "if": {}}}}, "structured_outputs", "if"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "once"),
    ({"guided_json": SCHEMA, "response_format": {"type": "json_object"}}, "response_format", "once"),
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s"}}}, "response_format", "schema"),
    ({"structured_outputs": {"grammar": "root ::= 'a"}}, "structured_outputs", "unterminated"),
    ({"guided_grammar": "root ::= root 'a' | 'b'"}, "guided_grammar", "left recursion"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "format"),
    ({"response_format": {"type": "structural_tag", "format": {"type": "token", "token": 5}}}, "response_format",
     "token-level"),
    ({"structured_outputs": {"regex": "a", "colour": 1}}, "structured_outputs", "colour"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "guided_json"),
    ({"allowed_token_ids": [1, 300]}, "allowed_token_ids", "300"),
    ({"bad_words": [""]}, "bad_words", "bad_words"),
])
@pytest.mark.parametrize("send", [complete, chat])
def test_a_bad_constraint_is_a_400_naming_the_field_sent(url, send, fields, param, message):
    response = send(url, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert texts(send(url, max_tokens=2))  # the server goes on serving


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
             "type": "object", "properties": {"city": {"enum": ["Paris", "Lima"]}, "days": {"enum": [1, 2, 3]}},
             "required": ["city", "days"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"enum": [1, 2, 3]}, "b": {"enum": [1, 2]}},
             "required": ["a", "b"]}}}]


def stream_calls(url: str, **fields) -> tuple[list[dict], str]:
    """A streamed chat's tool_calls deltas and its last finish_reason."""
    calls, finish = [], None
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "max_tokens": 60, "messages": [{"role": "user", "content": "x"}], "stream": True,
            **fields}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                calls += choice["delta"].get("tool_calls", [])
                finish = choice["finish_reason"] or finish
    return calls, finish


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_comes_back_as_tool_calls(url, stream):
    named = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    # (a random model would go on listing calls: a bias on "]" closes the array as soon as the format allows)
    required = {"tools": TOOLS, "tool_choice": "required", "max_tokens": 100, "logit_bias": {str(ord("]")): 30}}
    for fields, finish in ((named, "stop"), (required, "tool_calls")):
        if stream:
            calls, got_finish = stream_calls(url, seed=7, **fields)
        else:
            response = chat(url, seed=7, **fields)
            assert response.status_code == 200, response.text
            choice = response.json()["choices"][0]
            calls, got_finish = choice["message"]["tool_calls"], choice["finish_reason"]
            assert choice["message"]["content"] is None
        assert got_finish == finish and calls, (fields, calls)
        for call in calls:
            assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
            arguments = json.loads(call["function"]["arguments"])
            if call["function"]["name"] == "get_weather":
                assert arguments["city"] in ("Paris", "Lima") and arguments["days"] in (1, 2, 3)
            else:
                assert call["function"]["name"] == "add" and isinstance(arguments["a"], int)
        if fields is named:
            assert [c["function"]["name"] for c in calls] == ["get_weather"]


@pytest.mark.parametrize("fields, param, message", [
    ({"tools": TOOLS}, "tool_choice", "'auto' is not supported"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "parser"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "one of"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "tools", "twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}], "tool_choice": "required"},
     "tools", "parameters"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice", "once"),
    ({"functions": [{"name": "f"}]}, "functions", "older function calling"),
])
def test_tool_requests_minillm_cannot_honour_are_400s(url, fields, param, message):
    response = chat(url, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_tool_choice_none_answers_in_text(url):
    (text,) = texts(chat(url, tools=TOOLS, tool_choice="none", max_tokens=4))
    assert isinstance(text, str)


def test_the_openai_client_reads_the_tool_call(url):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "weather?"}],
                                           tools=TOOLS, tool_choice={"type": "function",
                                                                     "function": {"name": "get_weather"}},
                                           max_tokens=40, temperature=0)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Lima")
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "one word"}],
                                            response_format={"type": "json_schema", "json_schema": {
                                                "name": "w", "schema": {"enum": ["yes", "no"]}}},
                                            max_tokens=10, temperature=0)
    assert json.loads(answer.choices[0].message.content) in ("yes", "no")


def test_a_tool_call_cut_by_a_stop_string_is_answered_as_text(url):
    response = chat(url, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                    stop=['"city"'], temperature=0)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert "tool_calls" not in message and message["content"].startswith("{"), message
