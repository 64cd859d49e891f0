"""POST /v1/embeddings (minillm/serve/embeddings.py): OpenAI's shape, one vector per input from the engine's
embedding requests (minillm/pooling.py), base64 and dimensions, and 400s / 404s naming the field."""
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
