"""POST /v1/responses (minillm/serve/responses.py): OpenAI's Responses API answered by the chat path. The same
request as a chat completion gives the same text; the stream's events are well formed and add up to the final
response; a conversation's earlier output items go back in as the chat messages they were; thoughts, text and calls
become reasoning, message and function_call items; what the server cannot do is refused by name."""
from __future__ import annotations

import json

import httpx
import pytest

from minillm.serve.server import ServerThread
from serve_tiny import MODEL, tiny_app, tiny_engine
from test_serve_auto_tools import CALL, TOOLS, scripted_server
from test_serve_reasoning import THOUGHT
from tiny import one_thread  # noqa: F401 (autouse fixture)

RESPONSES_TOOLS = [{"type": "function", **tool["function"]} for tool in TOOLS]


@pytest.fixture(scope="module")
def server():
    app, _ = tiny_app(tiny_engine(max_model_len=128))
    with ServerThread(app) as srv:
        yield srv.url


def respond(url: str, **fields) -> dict:
    response = httpx.post(url + "/v1/responses", json=fields, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(url: str, **fields) -> list[dict]:
    """The stream's events, each checked: an `event:` line naming the data's type, sequence numbers 0, 1, ..."""
    events, kind = [], None
    with httpx.stream("POST", url + "/v1/responses", json={**fields, "stream": True}, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == kind and data["sequence_number"] == len(events)
                events.append(data)
    return events


def output_text(body: dict) -> str:
    return "".join(part["text"] for item in body["output"] if item["type"] == "message" for part in item["content"])


def test_a_response_is_the_chat_completions_answer(server):
    chat = httpx.post(server + "/v1/chat/completions", json={
        "model": MODEL, "max_tokens": 6, "temperature": 0,
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]}).json()
    body = respond(server, model=MODEL, instructions="Be brief.", input="hi", max_output_tokens=6, temperature=0,
                   metadata={"k": "v"}, store=True)
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["model"] == MODEL
    assert output_text(body) == chat["choices"][0]["message"]["content"]
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["store"] is False and body["metadata"] == {"k": "v"}
    usage = body["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (chat["usage"]["prompt_tokens"], 6)
    assert usage["total_tokens"] == usage["input_tokens"] + 6


def test_the_stream_adds_up_to_the_response(server):
    fields = dict(input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}], max_output_tokens=9,
                  temperature=0)
    events = stream_events(server, **fields)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    final = events[-1]["response"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == events[-4]["text"] == output_text(final) == output_text(respond(server, **fields))
    assert final["id"] == events[0]["response"]["id"] and final["usage"]["output_tokens"] == 9
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []


def test_earlier_output_items_go_back_in_as_chat_messages(server):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}
    chat = httpx.post(server + "/v1/chat/completions", json={"max_tokens": 3, "temperature": 0, "messages": [
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [call, call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}, {"role": "assistant", "content": "ok"}]}).json()
    item = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Lima"}'}
    body = respond(server, max_output_tokens=3, temperature=0, input=[
        {"role": "user", "content": "weather?"}, {"type": "reasoning", "summary": []}, item, item,
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}])
    assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert output_text(body) == chat["choices"][0]["message"]["content"]


def test_a_json_schema_format_and_a_named_tool(server):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    body = respond(server, input="x", max_output_tokens=40, temperature=0,
                   text={"format": {"type": "json_schema", "name": "a", "schema": schema, "strict": True}})
    assert isinstance(json.loads(output_text(body))["a"], int) and body["status"] == "completed"
    named = dict(input="weather?", max_output_tokens=60, temperature=0, tools=RESPONSES_TOOLS,
                 tool_choice={"type": "function", "name": "get_weather"})
    body = respond(server, **named)
    calls = [item for item in body["output"] if item["type"] == "function_call"]
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and "city" in json.loads(calls[0]["arguments"])
    events = stream_events(server, **named)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done" and
            e["item"]["type"] == "function_call"]
    assert [json.loads(c["arguments"]) for c in done] == [json.loads(calls[0]["arguments"])]


def test_a_thought_text_and_a_call_become_three_items():
    with scripted_server(THOUGHT + "Checking." + CALL, reasoning_parser="qwen3", tool_call_parser="hermes") as srv:
        fields = dict(model=MODEL, input="weather?", tools=RESPONSES_TOOLS, max_output_tokens=200, temperature=0)
        body = respond(srv.url, **fields)
        assert [item["type"] for item in body["output"]] == ["reasoning", "message", "function_call"]
        assert body["output"][0]["content"][0]["text"] == "The user asks for weather.\nA tool can tell."
        assert output_text(body) == "Checking."
        assert json.loads(body["output"][2]["arguments"]) == {"city": "Lima"}
        events = stream_events(srv.url, **fields)
        added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
        assert added == ["reasoning", "message", "function_call"]
        thought = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
        assert thought == body["output"][0]["content"][0]["text"]
        final = events[-1]
        assert final["type"] == "response.completed"
        assert [item["type"] for item in final["response"]["output"]] == ["reasoning", "message", "function_call"]


@pytest.mark.parametrize("fields, param, words", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stores none"),
    ({"background": True}, "background", "background responses"),
    ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "reasoning effort"),
    ({"input": []}, "input", "input is empty"),
    ({"input": [{"type": "input_image"}]}, "input", "text only"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input", "text only"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input", "'robot'"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input", "call_id, name and arguments"),
    ({"tools": [{"type": "web_search"}]}, "tools", "built-in tools"),
    ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens must be an integer >= 1"),
    ({"temperature": -1}, "temperature", "temperature"),
    ({"text": {"format": {"type": "yaml"}}}, "text.format", "yaml"),
    ({"input": "x" * 400}, "input", "more than max_model_len=128"),
])
def test_what_the_server_cannot_do_is_refused_by_name(server, fields, param, words):
    response = httpx.post(server + "/v1/responses", json={"input": "x", **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_no_response_is_stored(server):
    response = httpx.get(server + "/v1/responses/resp_123")
    assert response.status_code == 404 and "stores none" in response.json()["error"]["message"]


def test_the_official_client_reads_the_response_and_its_events():
    """openai's client parses every item into its types and rebuilds the final response from the events itself
    (responses.stream), so a malformed or out-of-order event would fail here."""
    openai = pytest.importorskip("openai")
    with scripted_server(THOUGHT + "Checking." + CALL, reasoning_parser="qwen3", tool_call_parser="hermes") as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        fields = dict(model=MODEL, input="weather?", tools=RESPONSES_TOOLS, max_output_tokens=200, temperature=0)
        response = client.responses.create(**fields)
        assert response.output_text == "Checking." and response.output[2].arguments == '{"city": "Lima"}'
        with client.responses.stream(**fields) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_response()
        assert kinds[-1] == "response.completed" and final.output_text == "Checking."
        assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
