"""The OpenAI-compatible server on 127.0.0.1 (chapter 10): the official openai client, every bad request's status
and message, the API key, /metrics through Prometheus' own parser, graceful shutdown."""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from minillm.serve.server import ServerThread
from serve_tiny import MODEL, tiny_app, tiny_engine
from tiny import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def server():
    app, llm = tiny_app()
    with ServerThread(app) as srv:
        srv.llm = llm
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


def test_openai_client_lists_completes_and_streams_chat(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    done = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.prompt_tokens == 5
    again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0)
    assert again.choices[0].text == done.choices[0].text  # greedy is deterministic

    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # the text arrived in several events, not at the end
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == "".join(pieces)


def test_n_seed_and_stop(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="abc", max_tokens=6, temperature=1.0, seed=seed, n=3,
                                         extra_body={"ignore_eos": True})
    first, second = sample(7), sample(7)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]  # reproducible
    assert len(set(first.choices[i].text for i in range(3))) > 1  # the choices' seeds differ
    assert first.usage.completion_tokens == 18
    base = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next(ch for ch in base[2:] if ch.isprintable() and ch != "\ufffd")
    cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == base[:base.index(stop)]
    kept = client.completions.create(model=MODEL, prompt="abc", max_tokens=12, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True}).choices[0]
    assert kept.finish_reason == "stop" and kept.text == base[:base.index(stop) + len(stop)]  # vLLM's extension


BAD = [  # (path, body or raw bytes, status, words in the message)
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "non-empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}, 400,
     "maximum context length is 64"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 64}, 400, "maximum context length"),
    # messages of exactly max_model_len tokens with no max_tokens: the context is full, not "max_tokens ... got 0"
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 46}]}, 400,
     "the messages take 64: no room is left for the completion"),
    ("/v1/completions", b'{"prompt": "x",', 400, "not valid JSON"),
    ("/v1/completions", b"x" * (1 << 21), 413, "larger than"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": [1, 999]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n must be"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs is only allowed"),
    ("/v1/nothing", {}, 404, "Not Found"),
    # types are strict (a bool is not 1, "yes" is not true), and a union field says what it accepts
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens: Input should be a valid integer, "
                                                                  "got boolean: True"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream: Input should be a valid boolean"),
    ("/v1/completions", {"prompt": [True]}, 400, "prompt: expected a string, a list of strings, a list of token "
                                                 "ids or a list of token-id lists, got array: [True]"),
    ("/v1/completions", b"[1, 2]", 400, "the request body must be a JSON object, got array"),
    ("/v1/completions", b"[" * 50000 + b"]" * 50000, 400, "not valid JSON"),  # was FastAPI's own words
    ("/v1/completions", b'{"prompt": "\xff"}', 400, "not valid JSON"),  # not UTF-8
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role: Input should be 'system', 'developer', 'user', 'assistant', 'tool' or 'function', got "
     "string: 'wizard'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "tool_choice 'required' needs tools"),
    ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, 400,
     "stop must hold at most 16 strings, got 17"),
    # what minillm does not implement is refused, not silently ignored
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of is not supported"),
    ("/v1/completions", {"prompt": "x", "stop": "a", "include_stop_str_in_output": "yes"}, 400,
     "include_stop_str_in_output: Input should be a valid boolean"),
    ("/v1/completions", {"prompt": "x", "skip_special_tokens": "no"}, 400,
     "skip_special_tokens: Input should be a valid boolean, got string: 'no'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "spaces_between_special_tokens": 0},
     400, "spaces_between_special_tokens: Input should be a valid boolean, got number: 0"),
    # one request may not queue thousands of engine requests ahead of everyone else's
    ("/v1/completions", {"prompt": ["a"] * 20, "n": 16}, 400, "20 prompt(s) x n=16 = 320 completions in one "
                                                              "request; at most 256"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, 'tools[0] must be {"type": "function", "function": {"name": ..., "parameters": ...}}'),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_xml"}}, 400, "'json_xml' is not supported"),
    # vLLM's extensions: each refused one in test_serve_refused.py; these need more than the field itself
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "best_of": 2}, 400,
     "best_of is not supported"),
    ("/v1/completions", {"prompt": "x", "priority": 1}, 400, "priority 1 needs priority scheduling; this server "
                                                            "schedules 'fcfs': start it with --scheduling-policy "
                                                            "priority"),
    ("/v1/completions", {"prompt": "x", "stream": True, "prompt_logprobs": 1}, 400,
     "prompt_logprobs is not available with stream=true"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}], "continue_final_message": True},
     400, "set add_generation_prompt=false with it"),
]


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{b[2]}-{b[3][:20]}" for b in BAD])
def test_bad_requests_get_their_status_and_an_openai_error(server, path, body, status, words):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    response = httpx.post(server.url + path, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be a number >= 0"),
    ({"prompt": "x", "n": 17}, "n", "n must be an integer in [1, 16], got 17"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 25}, "top_logprobs",
     "top_logprobs: logprobs must be an integer in [0, 20]"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens",
     "max_completion_tokens: max_tokens must be an integer >= 1"),
    ({"prompt": "x", "stop_token_ids": [2**63]}, "stop_token_ids", "stop_token_ids must be integers in [0, "),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "messages.0.content: expected a string"),
    ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias", "logit_bias values must be in [-100, 100]"),
    ({"prompt": "x", "logit_bias": {"300": 1}}, "logit_bias", "token id 300 is outside the vocabulary [0, 300)"),
    ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0"),
    ({"prompt": "x", "max_tokens": 4, "min_tokens": 5}, "min_tokens", "min_tokens must be an integer in [0, "
                                                                        "max_tokens=4]"),
])
def test_errors_name_the_field_in_param(server, body, param, words):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    error = httpx.post(server.url + path, json=body, timeout=30).json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_json_body_without_the_json_content_type_gets_415(server):
    response = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x"}', timeout=30,
                          headers={"content-type": "application/x-www-form-urlencoded"})  # what `curl -d` sends
    assert response.status_code == 415
    assert "Content-Type: application/json, got 'application/x-www-form-urlencoded'" in \
        response.json()["error"]["message"]
    deep = httpx.post(server.url + "/v1/completions", content=b"[" * 50000 + b"]" * 50000, timeout=30)
    assert deep.status_code == 400 and "not valid JSON" in deep.json()["error"]["message"]  # was a 500


def test_a_seed_at_the_top_of_its_range_serves_every_choice(client):
    """Choice i samples with seed + i: past 2**64 - 1 it wraps round instead of refusing a valid seed."""
    done = client.completions.create(model=MODEL, prompt="abc", max_tokens=2, n=3, seed=2**64 - 1)
    assert sorted(c.index for c in done.choices) == [0, 1, 2]


def test_a_graceful_timeout_that_is_not_a_duration_is_refused():
    app, _ = tiny_app()
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="graceful_timeout must be a finite number of seconds >= 0"):
            ServerThread(app, graceful_timeout=bad)


def test_api_key_guards_every_route_but_health():
    app, _ = tiny_app(api_key="sesame")
    with ServerThread(app) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/ping").status_code == httpx.post(srv.url + "/ping").status_code == 200
        for path in ("/v1/models", "/metrics", "/engine/state", "/", "/version"):
            response = httpx.get(srv.url + path)
            assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200
        assert httpx.get(srv.url + "/?api_key=sesame").status_code == 200  # a browser opening the playground
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError):
                c.models.list()


def test_not_started_engine_answers_503():
    app, _ = tiny_app()  # no lifespan ran: the engine loop is not running
    transport = httpx.ASGITransport(app=app)

    async def main():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/health"), await c.post("/v1/completions", json={"prompt": "x"})
    import asyncio
    health, completion = asyncio.run(main())
    assert health.status_code == 503 and completion.status_code == 503
    assert "shutting down or not ready" in completion.json()["error"]["message"]


def test_metrics_parse_and_count(server, client):
    client.completions.create(model=MODEL, prompt="count me", max_tokens=4, temperature=0,
                              extra_body={"ignore_eos": True})
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_blocks_used", "kv_cache_blocks_free",
                 "num_preemptions", "prefix_cache_hit_rate", "time_to_first_token_seconds",
                 "time_per_output_token_seconds", "e2e_request_latency_seconds", "prompt_tokens",
                 "generation_tokens"):
        assert f"minillm:{name}" in families, name

    def value(name, suffix=""):
        return sum(s.value for s in families[f"minillm:{name}"].samples if s.name == f"minillm:{name}{suffix}")
    assert value("kv_cache_blocks_used") == 0 and value("kv_cache_blocks_free") == 128
    assert value("generation_tokens", "_total") >= 4 and value("prompt_tokens", "_total") >= 8
    assert value("e2e_request_latency_seconds", "_count") == value("request_success", "_total") >= 1


def test_graceful_shutdown_finishes_in_flight_streams():
    engine = tiny_engine(step_delay=0.01)
    app, _ = tiny_app(engine)
    srv = ServerThread(app, graceful_timeout=10).start()
    events, first = [], threading.Event()

    def stream():
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30,
                          json={"prompt": "go", "max_tokens": 30, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    first.set()
    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(10)
    srv.stop()  # like Ctrl-C: no new connections, the open stream runs to its end
    reader.join(10)
    assert events[-1] == "data: [DONE]" and '"finish_reason": "length"' in events[-2]
    assert engine.scheduler.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_prompts_are_tokenized_off_the_event_loop():
    """Tokenizing is the one slow thing a request body can ask for (a 1 MiB prompt: ~0.6 s on 2 cores); on the event
    loop it would stall every other request's stream meanwhile, so both endpoints tokenize in a worker thread."""
    import asyncio
    app, llm = tiny_app()
    where = []
    tokenizer = llm.engine.tokenizer
    encode = tokenizer.encode

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return encode(*args, **kwargs)

    tokenizer.encode = recording
    with ServerThread(app) as srv:
        body = {"model": MODEL, "max_tokens": 2, "temperature": 0}
        assert httpx.post(srv.url + "/v1/completions", json={**body, "prompt": ["Hi", "there"]}).status_code == 200
        chat = {**body, "messages": [{"role": "user", "content": "Hi"}]}
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat).status_code == 200
        bad = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": "x" * 100})
        assert bad.status_code == 400 and "max_model_len" in bad.json()["error"]["message"]  # errors still arrive
    assert len(where) >= 4 and set(where) == {"worker thread"}, where


def test_null_means_the_default_as_openai_declares_the_fields_nullable(server):
    """Many clients send `"temperature": null` for "not set": OpenAI's spec marks these fields nullable."""
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "seed", "presence_penalty", "frequency_penalty",
                           "top_k", "ignore_eos", "echo", "stop", "user"))
    done = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **nulls}, timeout=30)
    assert done.status_code == 200 and len(done.json()["choices"]) == 1, done.text
    chat = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": None, "top_logprobs": None,
        **nulls})
    assert chat.status_code == 200 and chat.json()["choices"][0]["logprobs"] is None, chat.text
    missing = httpx.post(server.url + "/v1/completions", json={"prompt": None}, timeout=30)  # required: still 400
    assert missing.status_code == 400 and "prompt is required" in missing.json()["error"]["message"]


def test_text_parts_are_joined_by_newlines_as_vllm_does(client):
    def prompt_tokens(content):
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                              max_tokens=1).usage.prompt_tokens
    parts = [{"type": "text", "text": "ab"}, {"type": "text", "text": "cd"}]
    assert prompt_tokens(parts) == prompt_tokens("ab\ncd") == prompt_tokens("abcd") + 1


def test_http_methods_head_allow_and_the_model_route(server, client):
    not_allowed = httpx.get(server.url + "/v1/completions")
    assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "POST"  # HTTP requires Allow
    assert set(not_allowed.json()["error"]) == {"message", "type", "param", "code"}
    for path in ("/health", "/v1/models", "/metrics", "/ping", "/version"):  # a load balancer's probe, curl -I
        assert httpx.head(server.url + path).status_code == 200, path
    from minillm import __version__
    assert httpx.get(server.url + "/version").json() == {"version": __version__}
    assert client.models.retrieve(MODEL).id == MODEL  # GET /v1/models/{model}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_a_failed_engine_step_is_an_openai_error_and_the_server_goes_on():
    """A step that raises fails the requests in it; the client still gets OpenAI's error shape (a JSON 500, or an
    error event and [DONE] in a stream) instead of Starlette's plain text or a cut connection."""
    engine = tiny_engine()
    app, _ = tiny_app(engine)
    step, fail = engine.step, []

    def failing_step():
        if fail:
            fail.pop()
            raise RuntimeError("boom")
        return step()
    engine.step = failing_step
    body = {"prompt": "x", "max_tokens": 5, "ignore_eos": True}
    with ServerThread(app) as srv:
        fail.append(1)
        done = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert done.status_code == 500 and "boom" in done.json()["error"]["message"], done.text
        assert done.json()["error"]["type"] == "server_error"
        fail.append(1)
        events = [line for line in httpx.post(srv.url + "/v1/completions", json={**body, "stream": True},
                                              timeout=30).text.splitlines() if line]
        assert events[-1] == "data: [DONE]" and '"boom' not in events[-1] and "boom" in events[-2], events
        after = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 5
    assert engine.scheduler.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_a_client_that_stops_reading_holds_one_output_per_choice():
    """The outputs are cumulative: while a stream's reader is stalled (a client that does not read its socket), a
    newer output replaces the one waiting, instead of queueing a copy of every token after every step."""
    import asyncio
    from types import SimpleNamespace

    from minillm.serve.sse import _merge

    async def steps(n):
        for i in range(1, n + 1):
            await asyncio.sleep(0)
            yield SimpleNamespace(step=i, finished=i == n)

    async def main():
        merged, seen = _merge([steps(200), steps(150)]), []
        seen.append(await merged.__anext__())
        await asyncio.sleep(0.2)  # the reader stalls while both streams run to their end
        seen += [item async for item in merged]
        return seen
    seen = asyncio.run(main())
    assert len(seen) <= 4, len(seen)
    assert {(i, out.step) for i, out in seen if out.finished} == {(0, 200), (1, 150)}


def test_prompt_the_kv_pool_can_never_hold_is_a_400():
    """8 blocks of 4 tokens hold 32 tokens (max_model_len 64): a 40-token prompt could never be served. It is a
    400 naming the blocks, not a 500 "generation failed" after queueing; the server keeps serving."""
    app, llm = tiny_app(tiny_engine(num_kv_blocks=8))
    with ServerThread(app) as srv:
        body = {"model": MODEL, "max_tokens": 2, "temperature": 0}
        bad = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": "x" * 40})
        assert bad.status_code == 400, bad.text
        error = bad.json()["error"]
        assert error["param"] == "prompt" and "10 KV blocks of 4" in error["message"], error
        assert "the pool gives one sequence at most 8" in error["message"]
        assert httpx.post(srv.url + "/v1/completions", json={**body, "prompt": "x" * 20}).status_code == 200


def test_an_sse_event_is_one_line_for_every_line_splitter(server):
    """U+2028, U+2029 and U+0085 end a line for str.splitlines, and so for httpx's aiter_lines (what `minillm bench
    serve` reads a stream with), though not for SSE; JSON may carry them raw, so an event whose text held one came
    apart there (tests/test_openai_stress.py read half an event). The server sends them escaped."""
    prompt = "a\u2028b\u2029c\x85d"
    body = {"prompt": prompt, "echo": True, "max_tokens": 2, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    assert text.startswith(prompt)
