"""What the server refuses (chapter 10): every field of OpenAI's API or vLLM's extensions that minillm does not
implement is a 400 naming it, unless it holds its no-op value (or null), which is served as usual: a client that
asked for beam search, a context-free grammar, audio ... must not get a plain answer it takes for the one it asked for."""
from __future__ import annotations

import httpx
import pytest

from minillm.serve.protocol import ChatCompletionRequest, CompletionRequest
from minillm.serve.server import ServerThread
from serve_tiny import tiny_app
from tiny import one_thread  # noqa: F401 (autouse fixture)

# field -> a value that asks for what minillm does not do
ASKS = {
    "logits_processors": ["m.P"],
    "mm_processor_kwargs": {"a": 1}, "kv_transfer_params": {"a": 1}, "vllm_xargs": {"a": 1},
    # completions: nothing beyond the shared fields
    "reasoning_effort": "low", "audio": {"voice": "alloy", "format": "mp3"},  # chat (include_reasoning: see
    # tests/test_serve_reasoning.py: refused only without --reasoning-parser)
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"}, "function_call": "f",
    "web_search_options": {}, "verbosity": "low", "store": True, "service_tier": "flex",
}
NO_OPS = {name: no_ops for model in (CompletionRequest, ChatCompletionRequest)
          for name, (no_ops, _) in model.REFUSED.items()}
CASES = [(path, name) for path, model in (("/v1/completions", CompletionRequest),
                                          ("/v1/chat/completions", ChatCompletionRequest)) for name in model.REFUSED]


@pytest.fixture(scope="module")
def url():
    app, _ = tiny_app()
    with ServerThread(app) as srv:
        yield srv.url


def body(path: str, **fields) -> dict:
    base = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    return {**base, "max_tokens": 2, **fields}


def test_every_refused_field_has_a_case():
    assert set(ASKS) == set(NO_OPS)


@pytest.mark.parametrize("path,name", CASES)
def test_a_refused_field_is_a_400_naming_it(url, path, name):
    response = httpx.post(url + path, json=body(path, **{name: ASKS[name]}), timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and f"{name} is not supported" in error["message"], error


@pytest.mark.parametrize("path,name", CASES)
def test_its_no_op_values_and_null_are_served(url, path, name):
    for value in (None, *NO_OPS[name]):
        response = httpx.post(url + path, json=body(path, **{name: value}), timeout=30)
        assert response.status_code == 200, (value, response.text)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fields_with_no_effect_here_are_served(url, path):
    """spaces_between_special_tokens (minillm's tokenizers write special tokens back to back either way), priority
    0, and chat's tool and bookkeeping fields that change nothing without tools or stored completions."""
    fields = {"spaces_between_special_tokens": False, "priority": 0}
    if path.endswith("chat/completions"):
        fields |= {"parallel_tool_calls": True, "metadata": {"k": "v"}, "prompt_cache_key": "k",
                   "safety_identifier": "u", "best_of": 1}
    assert httpx.post(url + path, json=body(path, **fields), timeout=30).status_code == 200
