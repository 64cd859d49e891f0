"""vLLM's request extensions the server honours (chapter 10), each checked by what it changes in the answer:
the chat-template fields (add_generation_prompt, continue_final_message, echo, add_special_tokens, chat_template,
chat_template_kwargs, documents), truncate_prompt_tokens, priority (on a server started with
--scheduling-policy priority), request_id, prompt_logprobs, return_tokens_as_token_ids, return_token_ids,
stream_options.continuous_usage_stats, skip_special_tokens and spaces_between_special_tokens. The fields minillm
refuses are in test_serve_api.py's BAD table."""
from __future__ import annotations

import json
import re
import threading
import time

import httpx
import pytest

from minillm.serve.server import ServerThread
from serve_tiny import tiny_app, tiny_engine
from tiny import ByteTokenizer, one_thread  # noqa: F401 (autouse fixture)

BOS = 256
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


class BosByteTokenizer(ByteTokenizer):
    """The byte tokenizer with a BOS that encode() adds unless told not to, as Llama's does."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [BOS] * add_special_tokens + super().encode(text)


@pytest.fixture(scope="module")
def url():
    app, _ = tiny_app(tiny_engine(tokenizer=BosByteTokenizer()), trust_request_chat_template=True)
    with ServerThread(app) as srv:
        yield srv.url


def post(url: str, path: str, body: dict, status: int = 200) -> dict:
    response = httpx.post(url + path, json=body, timeout=30)
    assert response.status_code == status, response.text
    return response.json()


def complete(url: str, prompt: str | list[int], **fields) -> dict:
    return post(url, "/v1/completions", {"prompt": prompt, **GREEDY, **fields})


def chat(url: str, messages: list[dict], **fields) -> dict:
    return post(url, "/v1/chat/completions", {"messages": messages, **GREEDY, **fields})


HI = [{"role": "user", "content": "Hi"}]


def test_add_generation_prompt_and_the_answers_role(url):
    opened = chat(url, HI)  # "<user>Hi\n<assistant>": 20 tokens, the template's BOS-free text
    assert opened["usage"]["prompt_tokens"] == 20 and opened["choices"][0]["message"]["role"] == "assistant"
    bare = chat(url, HI, add_generation_prompt=False)  # "<user>Hi\n": the model goes on as the user
    assert bare["usage"]["prompt_tokens"] == 9 and bare["choices"][0]["message"]["role"] == "user"
    assert bare["choices"][0]["message"]["content"] == complete(url, "<user>Hi\n", add_special_tokens=False)[
        "choices"][0]["text"]


def test_continue_final_message_prefills_the_answer_and_echo_returns_it(url):
    messages = HI + [{"role": "assistant", "content": "Once upon"}]
    cont = chat(url, messages, add_generation_prompt=False, continue_final_message=True)
    # the template closes the turn with "\n": cut off, so the model continues "Once upon" itself
    rendered = "<user>Hi\n<assistant>Once upon"
    assert cont["usage"]["prompt_tokens"] == len(rendered)
    text = complete(url, rendered, add_special_tokens=False)["choices"][0]["text"]
    assert cont["choices"][0]["message"] == {"role": "assistant", "content": text}
    echo = chat(url, messages, add_generation_prompt=False, continue_final_message=True, echo=True)
    assert echo["choices"][0]["message"]["content"] == "Once upon" + text
    stream = httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "messages": messages, **GREEDY, "add_generation_prompt": False, "continue_final_message": True,
        "echo": True, "stream": True}).text
    pieces = re.findall(r'"content": "((?:[^"\\]|\\.)*)"', stream)
    assert "".join(pieces).startswith("Once upon")
    assert chat(url, HI, echo=True)["choices"][0]["message"]["content"] == chat(url, HI)["choices"][0]["message"][
        "content"]  # the last message is the user's, not the answer's role: nothing to echo


def test_add_special_tokens_on_both_endpoints(url):
    assert complete(url, "Hi")["usage"]["prompt_tokens"] == 3  # BOS + 2 bytes: completions add it by default
    assert complete(url, "Hi", add_special_tokens=False)["usage"]["prompt_tokens"] == 2
    assert chat(url, HI, add_special_tokens=True)["usage"]["prompt_tokens"] == 21  # chat adds it only when asked
    with_bos = complete(url, "Hi")["choices"][0]["text"]
    assert complete(url, [BOS, ord("H"), ord("i")])["choices"][0]["text"] == with_bos


def test_a_requests_own_template_its_kwargs_and_documents(url):
    template = ("{% for d in documents %}[{{ d.text }}]{% endfor %}{{ greeting }}{{ messages[-1].content }}"
                "{% if add_generation_prompt %}>{% endif %}")
    answer = chat(url, HI, chat_template=template, chat_template_kwargs={"greeting": "Yo "},
                  documents=[{"title": "t", "text": "abc"}])
    rendered = "[abc]Yo Hi>"
    assert answer["usage"]["prompt_tokens"] == len(rendered)
    assert answer["choices"][0]["message"]["content"] == complete(url, rendered, add_special_tokens=False)[
        "choices"][0]["text"]
    error = chat_error(url, chat_template="{% if %}")
    assert error["param"] == "chat_template" and "does not parse" in error["message"]
    error = chat_error(url, chat_template_kwargs={"messages": []})
    assert error["param"] == "chat_template_kwargs" and "may not set 'messages'" in error["message"]


def test_a_requests_own_template_is_refused_unless_the_server_trusts_it():
    """A template is code: by default (as vLLM without --trust-request-chat-template) a 400, and nothing runs."""
    app, _ = tiny_app(tiny_engine())
    with ServerThread(app) as srv:
        error = chat_error(srv.url, chat_template="{% for i in range(99999) %}{% for j in range(99999) %}"
                                                  "{% endfor %}{% endfor %}")
        assert error["param"] == "chat_template" and "--trust-request-chat-template" in error["message"]
        assert chat(srv.url, HI)["choices"][0]["finish_reason"] in ("stop", "length")  # the model's template


def chat_error(url: str, **fields) -> dict:
    return post(url, "/v1/chat/completions", {"messages": HI, **fields}, status=400)["error"]


def test_truncate_prompt_tokens_keeps_the_last_tokens(url):
    short = complete(url, "abcdefgh", truncate_prompt_tokens=3)
    assert short["usage"]["prompt_tokens"] == 3
    assert short["choices"][0]["text"] == complete(url, "fgh", add_special_tokens=False)["choices"][0]["text"]
    long = complete(url, "x" * 200, truncate_prompt_tokens=10)  # 201 tokens: too long for 64 but for truncation
    assert long["usage"]["prompt_tokens"] == 10
    assert chat(url, HI, truncate_prompt_tokens=4)["usage"]["prompt_tokens"] == 4
    error = post(url, "/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0}, status=400)["error"]
    assert error["param"] == "truncate_prompt_tokens" and ">= 1" in error["message"]


def test_request_id_names_the_response(url):
    assert complete(url, "a", request_id="mine")["id"] == "cmpl-mine"
    assert complete(url, "a", request_id="mine")["id"] == "cmpl-mine"  # again: the engine's own ids differ
    assert chat(url, HI, request_id="mine")["id"] == "chatcmpl-mine"


def test_prompt_logprobs_on_both_endpoints(url):
    done = complete(url, "abcd", prompt_logprobs=2, max_tokens=1)
    scored = done["choices"][0]["prompt_logprobs"]
    assert len(scored) == 5 and scored[0] is None  # BOS a b c d: nothing predicts the first
    for token, entries in zip("abcd", scored[1:]):
        actual = entries[str(ord(token))]
        assert actual["decoded_token"] == token and actual["logprob"] <= 0 and actual["rank"] >= 1
        assert 2 <= len(entries) <= 3 and {e["rank"] for e in entries.values()} >= {1, 2}
    answer = chat(url, HI, prompt_logprobs=0)
    assert len(answer["prompt_logprobs"]) == answer["usage"]["prompt_tokens"] == 20
    assert "prompt_logprobs" not in answer["choices"][0] and "prompt_logprobs" not in complete(url, "ab")["choices"][0]


def test_return_tokens_as_token_ids(url):
    done = complete(url, "ab", logprobs=2, return_tokens_as_token_ids=True)["choices"][0]
    tokens = done["logprobs"]["tokens"]
    assert all(re.fullmatch(r"token_id:\d+", t) for t in tokens) and len(tokens) == 6
    ids = [int(t.split(":")[1]) for t in tokens]
    assert bytes(i for i in ids if i < 256).decode("utf-8", "replace") == done["text"]
    assert all(all(k.startswith("token_id:") for k in top) for top in done["logprobs"]["top_logprobs"])
    content = chat(url, HI, logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True)["choices"][0][
        "logprobs"]["content"]
    assert all(re.fullmatch(r"token_id:\d+", c["token"]) and c["top_logprobs"][0]["token"].startswith("token_id:")
               for c in content)


def stream_chunks(url: str, path: str, body: dict) -> list[dict]:
    """Every JSON chunk of a stream, in order."""
    events = httpx.post(url + path, json={**body, "stream": True}, timeout=30).text.split("\n\n")
    return [json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")]


def test_return_token_ids_puts_the_prompts_and_the_answers_ids_beside_the_text(url):
    """vLLM's return_token_ids: the ids of exactly what was sampled (no re-tokenizing the text), on both
    endpoints, whole and streamed (each event carries its own tokens' ids, the first the prompt's)."""
    done = complete(url, "ab", n=2, seed=1, temperature=1.0, return_token_ids=True)
    for choice in done["choices"]:
        assert choice["prompt_token_ids"] == [BOS, ord("a"), ord("b")] and len(choice["token_ids"]) == 6
        assert ByteTokenizer().decode(choice["token_ids"]) == choice["text"]
    plain = complete(url, "ab")
    assert not {"token_ids", "prompt_token_ids"} & set(plain["choices"][0])
    assert complete(url, "ab", return_token_ids=True)["choices"][0]["text"] == plain["choices"][0]["text"]
    scored = complete(url, "ab", echo=True, max_tokens=0, return_token_ids=True)["choices"][0]
    assert scored["token_ids"] == [] and scored["prompt_token_ids"] == [BOS, ord("a"), ord("b")]
    answer = chat(url, HI, return_token_ids=True)
    assert len(answer["prompt_token_ids"]) == answer["usage"]["prompt_tokens"] == 20
    assert ByteTokenizer().decode(answer["choices"][0]["token_ids"]) == answer["choices"][0]["message"]["content"]
    chunks = stream_chunks(url, "/v1/completions", {"prompt": "ab", **GREEDY, "return_token_ids": True})
    assert chunks[0]["choices"][0]["prompt_token_ids"] == [BOS, ord("a"), ord("b")]
    assert all("prompt_token_ids" not in c["choices"][0] for c in chunks[1:])
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == complete(
        url, "ab", return_token_ids=True)["choices"][0]["token_ids"]
    chunks = stream_chunks(url, "/v1/chat/completions", {"messages": HI, **GREEDY, "return_token_ids": True})
    assert chunks[0]["prompt_token_ids"] == answer["prompt_token_ids"]
    assert sum((c["choices"][0].get("token_ids", []) for c in chunks), []) == answer["choices"][0]["token_ids"]
    for beam in complete(url, "ab", use_beam_search=True, n=2, return_token_ids=True)["choices"]:
        assert ByteTokenizer().decode(beam["token_ids"]) == beam["text"] and len(beam["prompt_token_ids"]) == 3


def test_continuous_usage_stats_puts_the_usage_so_far_on_every_chunk(url):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): each chunk's usage counts its choice's
    prompt and the tokens that choice generated until then (the last chunk, without choices, the whole
    request's); without it only the last chunk has a usage."""
    body = {"prompt": "ab", **GREEDY, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = stream_chunks(url, "/v1/completions", body)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks) and counts == sorted(counts)
    assert counts[-1] == 6 and not chunks[-1]["choices"] and counts[0] >= 1
    plain = stream_chunks(url, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert [c["usage"] is None for c in plain] == [True] * (len(plain) - 1) + [False]
    chat_chunks = stream_chunks(url, "/v1/chat/completions", {"messages": HI, **GREEDY,
                                                               "stream_options": body["stream_options"]})
    assert chat_chunks[0]["usage"]["completion_tokens"] == 0 and chat_chunks[-1]["usage"]["completion_tokens"] == 6
    # two prompts of 3 and 5 tokens, two choices each: every chunk counts its own choice only
    many = stream_chunks(url, "/v1/completions", {**body, "prompt": ["ab", "abcd"], "n": 2})
    seen: dict[int, list[int]] = {}
    for c in many[:-1]:
        i, usage = c["choices"][0]["index"], c["usage"]
        assert usage["prompt_tokens"] == (3 if i < 2 else 5), c
        seen.setdefault(i, []).append(usage["completion_tokens"])
    assert {i: counts[-1] for i, counts in seen.items()} == {0: 6, 1: 6, 2: 6, 3: 6}
    assert all(counts == sorted(counts) for counts in seen.values())
    assert many[-1]["usage"] == {"prompt_tokens": 8, "completion_tokens": 24, "total_tokens": 32}


def spied_app(engine, read) -> tuple[object, list]:
    """(app, seen): a server whose AsyncLLM appends read(params) to `seen` for every request it is given."""
    app, llm = tiny_app(engine)
    seen, generate = [], llm.generate

    def spy(prompt, params, **kwargs):
        seen.append(read(params))
        return generate(prompt, params, **kwargs)
    llm.generate = spy
    return app, seen


def test_priority_reaches_the_engine_under_the_priority_policy():
    app, seen = spied_app(tiny_engine(scheduling_policy="priority"), lambda params: params.priority)
    with ServerThread(app) as srv:
        complete(srv.url, "ab", priority=-3)
        chat(srv.url, HI, priority=7)
    assert seen == [-3, 7]


def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_a_server_started_with_the_priority_flag_serves_priority_minus_one_first():
    """`minillm serve --scheduling-policy priority --max-num-seqs 1` but for the model: the flags parsed as the
    command parses them, the tiny engine built from those options. While one request holds the only slot, a
    priority-0 request arrives, then a priority -1 one: the later, lower value runs first."""
    import argparse

    from minillm.serve.cli import engine_options, register
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    options = engine_options(parser.parse_args(["serve", "--scheduling-policy", "priority", "--max-num-seqs", "1"]))
    assert options == {"scheduling_policy": "priority", "max_num_seqs": 1}
    engine = tiny_engine(step_delay=0.01, **options)
    app, _ = tiny_app(engine)
    finished: list[str] = []

    def send(name: str, priority: int, max_tokens: int) -> None:
        complete(srv.url, "ab", priority=priority, max_tokens=max_tokens)
        finished.append(name)

    with ServerThread(app) as srv:
        threads = []
        for name, priority, max_tokens, queued in (("busy", 0, 50, lambda: engine.scheduler.running),
                                                   ("first", 0, 2, lambda: len(engine.scheduler.waiting) == 1),
                                                   ("urgent", -1, 2, lambda: len(engine.scheduler.waiting) == 2)):
            threads.append(threading.Thread(target=send, args=(name, priority, max_tokens)))
            threads[-1].start()
            _wait_for(queued, f"{name} to reach the scheduler")
        assert not finished, "the busy request finished before both others were waiting: no choice was made"
        for thread in threads:
            thread.join(30)
    assert finished == ["busy", "urgent", "first"]


# greedy, pushed towards the ByteTokenizer's special token 260 ("<|260|>" when kept) and "A" in turns
SPECIAL_MIX = {"logit_bias": {"260": 100.0, "65": 97.0}, "frequency_penalty": 2.0}


def streamed(url: str, path: str, body: dict) -> list[str]:
    """The text pieces of a stream's chunks, in order (completions' text, chat's content)."""
    return [c["choices"][0].get("text", c["choices"][0].get("delta", {}).get("content", "")) or ""
            for c in stream_chunks(url, path, body) if c["choices"]]


def test_skip_special_tokens_false_keeps_their_text(url):
    """vLLM's skip_special_tokens=false on both endpoints: special tokens' text in the answer, in its stream (the
    pieces add up to the answer) and in its log-probs (the tokens add up to it, a special token's bytes are its
    text's); a stop string may end inside it."""
    dropped = complete(url, "Hi", **SPECIAL_MIX)["choices"][0]["text"]
    kept = complete(url, "Hi", **SPECIAL_MIX, skip_special_tokens=False, logprobs=0)["choices"][0]
    assert "<|" not in dropped and "<|260|>" in kept["text"] and kept["text"].replace("<|260|>", "") == dropped
    assert "".join(kept["logprobs"]["tokens"]) == kept["text"]
    body = {"prompt": "Hi", **GREEDY, **SPECIAL_MIX, "skip_special_tokens": False}
    assert "".join(streamed(url, "/v1/completions", body)) == kept["text"]
    stopped = complete(url, "Hi", **SPECIAL_MIX, skip_special_tokens=False, stop="60|>A")["choices"][0]
    assert stopped["finish_reason"] == "stop" and kept["text"].startswith(stopped["text"] + "60|>A")
    echoed = complete(url, [BOS, ord("H")], echo=True, skip_special_tokens=False)["choices"][0]["text"]
    assert echoed.startswith("<|256|>H")  # a prompt of token ids comes back as the answer's text shows tokens
    answer = chat(url, HI, **SPECIAL_MIX, skip_special_tokens=False, logprobs=True)["choices"][0]
    content, tokens = answer["message"]["content"], answer["logprobs"]["content"]
    assert "<|260|>" in content and "".join(t["token"] for t in tokens) == content
    assert [t["bytes"] for t in tokens if t["token"] == "<|260|>"][0] == list(b"<|260|>")
    body = {"messages": HI, **GREEDY, **SPECIAL_MIX, "skip_special_tokens": False}
    assert "".join(streamed(url, "/v1/chat/completions", body)) == content
    assert "<|" not in chat(url, HI, **SPECIAL_MIX)["choices"][0]["message"]["content"]


def test_both_switches_reach_the_engine():
    app, seen = spied_app(tiny_engine(), lambda p: (p.skip_special_tokens, p.spaces_between_special_tokens))
    with ServerThread(app) as srv:
        complete(srv.url, "ab", skip_special_tokens=False)
        chat(srv.url, HI, spaces_between_special_tokens=False)
        complete(srv.url, "ab", skip_special_tokens=None, spaces_between_special_tokens=None)  # null: the defaults
    assert seen == [(False, True), (True, False), (True, True)]
