"""POST /v1/embeddings (minillm/serve/embeddings.py): OpenAI's shape, one vector per input from the engine's
embedding requests (minillm/pooling.py), base64 and dimensions, a chat as input, the server's pooling; /score and
/rerank (serve/scoring.py): cosine similarities of those vectors; 400s / 404s naming the field."""
from __future__ import annotations

import base64
import math

import httpx
import numpy as np
import pytest

from minillm.serve.server import ServerThread
from serve_tiny import MODEL, tiny_app
from tiny import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def url():
    app, _ = tiny_app()
    with ServerThread(app) as srv:
        yield srv.url


def post(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"model": MODEL, **body}, timeout=30)


def test_one_vector_per_input_in_openais_shape(url):
    body = post(url, input=["héllo", "a longer input, twice as long"]).json()
    assert body["object"] == "list" and body["model"] == MODEL and [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 6 + 29, "total_tokens": 6 + 29}
    first = body["data"][0]["embedding"]
    assert len(first) == 32 and math.isclose(sum(x * x for x in first), 1.0, rel_tol=1e-5)
    same = post(url, input=list("héllo".encode())).json()["data"][0]["embedding"]  # the text's token ids
    assert np.allclose(same, first, atol=1e-6)
    packed = post(url, input="héllo", encoding_format="base64").json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(packed), dtype="<f4"), first, atol=1e-6)
    short = post(url, input="héllo", dimensions=8).json()["data"][0]["embedding"]
    assert np.allclose(short, np.asarray(first[:8]) / np.linalg.norm(first[:8]), atol=1e-5)
    raw = post(url, input="héllo", normalize=False).json()["data"][0]["embedding"]
    assert np.allclose(np.asarray(raw) / np.linalg.norm(raw), first, atol=1e-5)
    cut = post(url, input="xxxxhéllo", truncate_prompt_tokens=6).json()
    assert cut["usage"]["prompt_tokens"] == 6 and np.allclose(cut["data"][0]["embedding"], first, atol=1e-6)
    many = post(url, input=[[1, 2], [3, 4, 5]]).json()
    assert len(many["data"]) == 2 and many["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize("body, status, param, message", [
    ({"input": []}, 400, "input", "at least one"),
    ({"input": "a", "dimensions": 33}, 400, "dimensions", "hidden size 32"),
    ({"input": "a", "dimensions": 0}, 400, "dimensions", ">= 1"),
    ({"input": "a", "encoding_format": "hex"}, 400, "encoding_format", "hex"),
    ({"input": [1, 300]}, 400, "input", "300"),
    ({"input": "a", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens", ">= 1"),
    ({"input": "a", "model": "other"}, 404, None, "other"),
    ({"input": ["a"] * 257}, 400, "input", "at most 256"),
    ({}, 400, "input", "exactly one of input"),
    ({"input": "a", "messages": [{"role": "user", "content": "a"}]}, 400, "messages", "exactly one"),
    ({"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": True, "continue_final_message": True},
     400, "continue_final_message", "add_generation_prompt=false"),
])
def test_bad_bodies_are_refused_naming_the_field(url, body, status, param, message):
    response = httpx.post(url + "/v1/embeddings", json={"model": MODEL, **body}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and (param is None or error["param"] == param), error
    assert post(url, input="ok").status_code == 200


def test_metrics_count_an_embeddings_prompt_not_its_token(url):
    def value(name: str) -> float:
        text = httpx.get(url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))
    prompt, generated = value("minillm:prompt_tokens_total"), value("minillm:generation_tokens_total")
    assert post(url, input=["abc", "de"]).status_code == 200
    assert value("minillm:prompt_tokens_total") == prompt + 5
    assert value("minillm:generation_tokens_total") == generated


def test_a_chat_is_embedded_as_its_rendered_prompt(url):
    """messages render with the server's template (serve_tiny.TEMPLATE), no generation prompt unless asked."""
    messages = [{"role": "user", "content": "hi"}]
    chat = post(url, messages=messages).json()
    text = post(url, input="<user>hi\n", add_special_tokens=False).json()
    assert chat["usage"]["prompt_tokens"] == len("<user>hi\n") and len(chat["data"]) == 1
    assert np.allclose(chat["data"][0]["embedding"], text["data"][0]["embedding"], atol=1e-6)
    opened = post(url, messages=messages, add_generation_prompt=True).json()
    assert opened["usage"]["prompt_tokens"] == len("<user>hi\n<assistant>")


def unit(vector) -> np.ndarray:
    return np.asarray(vector) / np.linalg.norm(vector)


def test_score_and_rerank_are_cosines_of_the_embeddings(url):
    texts = ["alpha", "beta gamma", "alpha!", "delta"]
    vec = {t: unit(post(url, input=t, normalize=False).json()["data"][0]["embedding"]) for t in texts}
    body = httpx.post(url + "/score", json={"model": MODEL, "text_1": "alpha", "text_2": texts[1:]}).json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert np.allclose([d["score"] for d in body["data"]], [vec["alpha"] @ vec[t] for t in texts[1:]], atol=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(map(len, texts))  # each distinct text embedded once
    pairs = httpx.post(url + "/v1/score", json={"text_1": texts[:2], "text_2": texts[2:]}).json()
    assert np.allclose([d["score"] for d in pairs["data"]], [vec[texts[0]] @ vec[texts[2]],
                                                             vec[texts[1]] @ vec[texts[3]]], atol=1e-5)
    ranked = httpx.post(url + "/v1/rerank", json={"query": "alpha", "documents": texts[1:], "top_n": 2}).json()
    want = sorted(range(3), key=lambda i: -(vec["alpha"] @ vec[texts[1 + i]]))[:2]
    assert [r["index"] for r in ranked["results"]] == want
    assert [r["document"]["text"] for r in ranked["results"]] == [texts[1 + i] for i in want]
    assert np.allclose([r["relevance_score"] for r in ranked["results"]],
                       [vec["alpha"] @ vec[texts[1 + i]] for i in want], atol=1e-5)
    assert len(httpx.post(url + "/v2/rerank", json={"query": "a", "documents": ["b", "c"]}).json()["results"]) == 2


@pytest.mark.parametrize("path, body, param, message", [
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_1", "two lists of one length"),
    ("/score", {"text_1": "a", "text_2": []}, "text_2", "at least one"),
    ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", ">= 1"),
    ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n", ">= 0"),
    ("/rerank", {"query": "", "documents": ["b"]}, "query", "empty"),
    ("/rerank", {"query": "a", "documents": ["b", ""]}, "documents", "empty"),
])
def test_bad_scoring_bodies_are_refused_naming_the_field(url, path, body, param, message):
    response = httpx.post(url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == param, error


def test_the_servers_pooler_config_pools_every_endpoint():
    from minillm.pooling import PoolingParams
    app, _ = tiny_app(pooler_config=PoolingParams(pooling_type="MEAN"))
    with ServerThread(app) as srv:
        mean = httpx.post(srv.url + "/v1/embeddings", json={"input": "abc"}).json()["data"][0]["embedding"]
        scored = httpx.post(srv.url + "/score", json={"text_1": "abc", "text_2": "abd"}).json()["data"][0]["score"]
    app, _ = tiny_app()
    with ServerThread(app) as srv:
        last = httpx.post(srv.url + "/v1/embeddings", json={"input": "abc"}).json()["data"][0]["embedding"]
    assert not np.allclose(mean, last, atol=1e-3) and -1.0 <= scored <= 1.0 + 1e-6
    app, _ = tiny_app(pooler_config=PoolingParams(normalize=False))  # raw vectors: a score is still their cosine
    with ServerThread(app) as srv:
        raw = [httpx.post(srv.url + "/v1/embeddings", json={"input": t}).json()["data"][0]["embedding"]
               for t in ("abc", "abd")]
        scored = httpx.post(srv.url + "/score", json={"text_1": "abc", "text_2": "abd"}).json()["data"][0]["score"]
    assert abs(np.linalg.norm(raw[0]) - 1.0) > 1e-3
    assert abs(scored - float(unit(raw[0]) @ unit(raw[1]))) < 1e-5
