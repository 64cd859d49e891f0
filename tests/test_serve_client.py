"""`minillm chat` / `minillm complete` (minillm/serve/client.py) against the tiny server: answers stream and
equal the non-streamed ones, a chat keeps its turns, a refused message is reported and the session goes on, and
no server is a clear exit 2."""
from __future__ import annotations

import httpx
import pytest

from minillm.cli import main
from minillm.serve.client import run_session
from minillm.serve.server import ServerThread
from serve_tiny import MODEL, tiny_app
from tiny import one_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def url():
    app, _ = tiny_app()
    with ServerThread(app) as srv:
        yield srv.url


def scripted(lines: list[str]):
    """A read() that answers the lines, then ends the input; and the list every write lands in."""
    pending, written = list(lines), []

    def read(prompt: str) -> str:
        written.append(prompt)
        if not pending:
            raise EOFError
        return pending.pop(0)
    return read, written


def test_a_chat_keeps_its_turns_and_survives_a_refused_message(url):
    sent = []
    with httpx.Client(base_url=url, event_hooks={"request": [lambda r: sent.append(r)]}) as client:
        read, written = scripted(["hello", "x" * 500, "again"])
        assert run_session(client, "chat", MODEL, 4, "be brief", None, read, written.append, temperature=0) == 0
    out = "".join(written)
    assert "error: HTTP 400" in out and out.count("> ") == 4  # three messages, then the end of input
    import json
    last = json.loads([r for r in sent if r.url.path.endswith("chat/completions")][-1].content)["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]  # the refused turn is not kept
    assert last[1]["content"] == "hello" and last[3]["content"] == "again"
    assert last[2]["content"] == streamed(url, "/v1/chat/completions",
                                          {"max_tokens": 4, "temperature": 0, "messages": last[:2]})


def streamed(url: str, path: str, body: dict) -> str:
    """The text of a streamed answer, its SSE chunks read here by hand."""
    import json
    text = []
    with httpx.stream("POST", url + path, json={"model": MODEL, "stream": True, **body}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
    return "".join(text)


def test_quick_modes_print_the_answer(url, capsys):
    want = streamed(url, "/v1/completions", {"prompt": "ab", "max_tokens": 5, "temperature": 0})
    assert main(["complete", "--url", url + "/v1", "--quick", "ab", "--max-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["chat", "--url", url, "--quick", "hi", "--max-tokens", "3"]) == 0
    assert main(["chat", "--url", url, "--quick", "x" * 500]) == 1
    assert "error: HTTP 400" in capsys.readouterr().out


def test_no_server_and_bad_flags_are_exit_2(capsys):
    assert main(["chat", "--url", "http://127.0.0.1:9", "--quick", "hi"]) == 2
    assert "is `minillm serve` running at http://127.0.0.1:9?" in capsys.readouterr().err
    assert main(["complete", "--max-tokens", "0", "--quick", "hi"]) == 2
    assert "--max-tokens must be >= 1, got 0" in capsys.readouterr().err
