"""The server's `echo` (chapter 10): the prompt and its log-probabilities in front of the completion, as OpenAI's
legacy completions and vLLM return them; with `max_tokens: 0`, the prompt alone, scored (what evaluation harnesses
ask for); streamed, under chunked prefill too."""
from __future__ import annotations

import json

import httpx

from minillm.serve.server import ServerThread
from serve_tiny import MODEL, tiny_app, tiny_engine
from test_serve_api import client, server  # noqa: F401 (module-scoped fixtures: one tiny server for this file)
from tiny import one_thread  # noqa: F401 (autouse fixture)


def test_echo_puts_the_prompt_and_its_logprobs_in_front(client):
    """OpenAI's legacy echo (as vLLM serves it): the prompt's text comes back before the completion; with logprobs,
    the prompt's tokens too, the first with a null log-prob (nothing predicts it)."""
    kwargs = dict(model=MODEL, max_tokens=4, temperature=0, logprobs=1, echo=True, extra_body={"ignore_eos": True})
    plain = client.completions.create(model=MODEL, prompt="Hey", max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    done = client.completions.create(prompt="Hey", **kwargs)
    choice, lp = done.choices[0], done.choices[0].logprobs
    assert choice.text == "Hey" + plain and done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 4
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 7
    assert lp.tokens[:3] == ["H", "e", "y"] and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:]) and lp.text_offset[:4] == [0, 1, 2, 3]
    # streamed, from token ids: the same text and log-probs (a token that ends mid-character keeps its log-prob)
    chunks = list(client.completions.create(prompt=[72, 101, 121], stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert client.completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=1, echo=True).choices[3] \
        .text.startswith("cd")


def test_echo_with_max_tokens_0_scores_the_prompt(client, server):
    """echo + max_tokens 0 + logprobs: the prompt's log-likelihood, as evaluation harnesses ask for it (OpenAI's
    legacy completions): the prompt alone comes back with its tokens' log-probs, no completion tokens, "length";
    the same log-probs as the echoed prompt of a request that generates. Without echo, max_tokens 0 is a 400."""
    kwargs = dict(model=MODEL, temperature=0, logprobs=2, echo=True)
    scored = client.completions.create(prompt="Hey you", max_tokens=0, **kwargs)
    generated = client.completions.create(prompt="Hey you", max_tokens=3, **kwargs)
    choice, lp = scored.choices[0], scored.choices[0].logprobs
    assert choice.text == "Hey you" and choice.finish_reason == "length"
    assert scored.usage.prompt_tokens == 7 and scored.usage.completion_tokens == 0
    assert lp.tokens == list("Hey you") and lp.token_logprobs[0] is None
    assert lp.token_logprobs == generated.choices[0].logprobs.token_logprobs[:7]
    assert all(len(top) <= 3 for top in lp.top_logprobs[1:])  # the actual token and the top 2
    chunks = list(client.completions.create(prompt="Hey you", max_tokens=0, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == "Hey you"
    assert [t for c in chunks for t in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert chunks[-1].choices[0].finish_reason == "length"
    bad = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hey", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert "echo=true" in bad.json()["error"]["message"]


def test_echo_streams_the_whole_prompts_logprobs_under_chunked_prefill():
    """A chunked prefill reports after every chunk; the echoed prompt is sent once it is scored whole, so a stream
    carries the same log-probs as the JSON answer. A prompt of max_model_len tokens can be scored (max_tokens 0)."""
    app, _ = tiny_app(tiny_engine(enable_chunked_prefill=True, max_num_batched_tokens=8))
    body = {"model": MODEL, "prompt": "x" * 30, "max_tokens": 2, "temperature": 0, "logprobs": 1, "echo": True}
    with ServerThread(app) as srv:
        whole = httpx.post(srv.url + "/v1/completions", json=body).json()["choices"][0]["logprobs"]["token_logprobs"]
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: {")]
        streamed = [t for e in events for t in json.loads(e)["choices"][0]["logprobs"]["token_logprobs"]]
        assert len(whole) == 32 and streamed == whole
        full = httpx.post(srv.url + "/v1/completions", json={**body, "prompt": "y" * 64, "max_tokens": 0})
        assert full.status_code == 200, full.text
        assert len(full.json()["choices"][0]["logprobs"]["tokens"]) == 64
