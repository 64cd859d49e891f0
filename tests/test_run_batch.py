"""`minillm run-batch` (minillm/serve/run_batch.py): OpenAI's Batch API file run through the server's own app in
this process. Each line's answer is the one the server gives over HTTP, in the input's order; refused requests keep
their status and error body; lines that are no request say why; one bad line stops nothing."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from minillm.cli import main
from minillm.serve.run_batch import read_requests, run_batch
from minillm.serve.server import ServerThread
from serve_tiny import tiny_app, tiny_engine
from tiny import one_thread  # noqa: F401 (autouse fixture)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
LINES = [
    {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": CHAT},
    {"custom_id": "text", "url": "/v1/completions", "body": {"prompt": ["ab", "cd"], "max_tokens": 3, "temperature": 0}},
    {"custom_id": "vectors", "url": "/v1/embeddings", "body": {"input": "abc"}},
    {"custom_id": "response", "url": "/v1/responses", "body": {"input": "hi", "max_output_tokens": 4, "temperature": 0}},
    {"custom_id": "refused", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 10_000}},
    {"custom_id": "models", "url": "/v1/models", "body": {}},
    {"custom_id": "streamed", "url": "/v1/completions", "body": {"prompt": "x", "stream": True}},
    {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {}},
]


def test_every_line_is_answered_in_order_as_the_server_answers_it():
    lines = [json.dumps(line) for line in LINES] + ["", "[1, 2]", "{broken"]
    app, llm = tiny_app(tiny_engine())
    outputs = asyncio.run(run_batch(app, llm, read_requests(lines), max_concurrency=3))
    assert [o["custom_id"] for o in outputs] == [line["custom_id"] for line in LINES] + [None, None]
    status = {o["custom_id"]: o["response"]["status_code"] for o in outputs if o["response"] is not None}
    assert status == {"chat": 200, "text": 200, "vectors": 200, "response": 200, "refused": 400}
    by_id = {o["custom_id"]: o for o in outputs}
    assert by_id["chat"]["response"]["request_id"] == by_id["chat"]["response"]["body"]["id"]
    assert len(by_id["text"]["response"]["body"]["choices"]) == 2
    assert "maximum context length" in by_id["refused"]["response"]["body"]["error"]["message"]
    errors = [o["error"]["message"] for o in outputs if o["error"] is not None]
    assert ["url must be one of" in errors[0], "stream is not supported" in errors[1], "method must be POST" in
            errors[2], "line 10 must be a JSON object" in errors[3], "line 11 is not JSON" in errors[4]] == [True] * 5
    assert all(o["id"].startswith("batch_req_") for o in outputs)
    app, _ = tiny_app(tiny_engine())
    with ServerThread(app) as srv:  # the same body over HTTP: the same answer
        over_http = httpx.post(srv.url + "/v1/chat/completions", json=CHAT).json()
    assert over_http["choices"] == by_id["chat"]["response"]["body"]["choices"]


def test_the_command_on_the_bundled_model(tmp_path, capsys):
    requests = tmp_path / "in.jsonl"
    requests.write_text("\n".join(json.dumps(line) for line in LINES[:2]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run-batch", "-i", str(requests), "-o", str(out), "--max-model-len", "256"]) == 0
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["custom_id"] for a in answers] == ["chat", "text"]
    assert all(a["response"]["status_code"] == 200 and a["error"] is None for a in answers)
    assert "2 of 2 requests answered 200" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["output folder", "input file", "concurrency"])
def test_bad_arguments_fail_before_the_model_loads(problem, tmp_path, capsys, monkeypatch):
    import minillm.llm

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(minillm.llm, "LLM", no_load)
    requests = tmp_path / "in.jsonl"
    requests.write_text(json.dumps(LINES[0]) + "\n")
    argv = {"output folder": ["-i", str(requests), "-o", str(tmp_path / "no" / "out.jsonl")],
            "input file": ["-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out.jsonl")],
            "concurrency": ["-i", str(requests), "-o", str(tmp_path / "o.jsonl"), "--max-concurrency", "0"]}[problem]
    assert main(["run-batch", *argv]) == 2
    err = capsys.readouterr().err
    assert {"output folder": "does not exist", "input file": "missing.jsonl",
            "concurrency": "--max-concurrency must be >= 1"}[problem] in err, err
