"""POST /tokenize and /detokenize (minillm/serve/tokenize.py): the server's own tokenizer and chat template, the
counts the generation endpoints use, and 400s / 404s naming what is wrong."""
from __future__ import annotations

import httpx
import pytest

from minillm.serve.server import ServerThread
from serve_tiny import MODEL, tiny_app
from tiny import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def url():
    app, _ = tiny_app()
    with ServerThread(app) as srv:
        yield srv.url


def post(url: str, path: str, **body) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30)


def test_tokenize_a_prompt_and_a_chat_as_the_generation_endpoints_count_them(url):
    got = post(url, "/tokenize", model=MODEL, prompt="héllo").json()
    assert got == {"count": 6, "max_model_len": 64, "tokens": list("héllo".encode()), "token_strs": None}
    messages = [{"role": "user", "content": "hi"}]
    chat = post(url, "/tokenize", messages=messages, return_token_strs=True).json()
    assert chat["tokens"] == list(b"<user>hi\n<assistant>") and "".join(chat["token_strs"]) == "<user>hi\n<assistant>"
    usage = post(url, "/v1/chat/completions", model=MODEL, messages=messages, max_tokens=1).json()["usage"]
    assert usage["prompt_tokens"] == chat["count"]
    usage = post(url, "/v1/completions", model=MODEL, prompt="héllo", max_tokens=1).json()["usage"]
    assert usage["prompt_tokens"] == got["count"]
    open_turn = post(url, "/tokenize", messages=messages, add_generation_prompt=False).json()
    assert open_turn["tokens"] == list(b"<user>hi\n")


def test_detokenize_reads_ids_back_special_tokens_included(url):
    assert post(url, "/detokenize", tokens=list("héllo".encode()) + [257]).json() == {"prompt": "héllo<|257|>"}
    assert post(url, "/detokenize", model=MODEL, tokens=[]).json() == {"prompt": ""}


@pytest.mark.parametrize("path, body, status, param, message", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, "prompt", "exactly one"),
    ("/tokenize", {}, 400, "messages", "exactly one"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "string"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "continue_final_message": True}, 400,
     "continue_final_message", "add_generation_prompt=false"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "a"}]}, 400, "messages.0.role", "wizard"),
    ("/tokenize", {"prompt": "a", "model": "other"}, 404, None, "other"),
    ("/detokenize", {"tokens": [1, 300]}, 400, "tokens", "300"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "-1"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0", "integer"),
])
def test_bad_bodies_are_refused_naming_the_field(url, path, body, status, param, message):
    response = post(url, path, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and (param is None or error["param"] == param), error
    assert post(url, "/tokenize", prompt="ok").status_code == 200  # the server goes on
