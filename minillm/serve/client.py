"""`minillm chat` and `minillm complete`: terminal clients of an OpenAI-compatible server (vLLM's `vllm chat` and
`vllm complete`; chapter 10).

    minillm serve &                                   # the bundled model on http://127.0.0.1:8000
    minillm chat --system-prompt "Answer briefly."    # type a message, read the answer as it streams
    minillm chat --quick "What is a KV cache?"        # one question, one answer, exit
    minillm complete --quick "The capital of France is"

A chat keeps the conversation (every turn is sent again: the server is stateless, which is what prefix caching
is for); a completion sends each line as a fresh prompt. Answers stream token by token over Server-Sent Events.
Ctrl-D (end of input) quits. An error the server answers (a prompt too long, a bad value) is printed and the
session goes on; no server at --url ends it with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import httpx  # imported where a command runs: `minillm` itself must start without it (the autograder's image)


def stream_deltas(client: httpx.Client, path: str, body: dict[str, Any]) -> Iterator[str]:
    """POST body (with "stream": true) and yield each chunk's new text: a chat's delta content or a completion's
    text. An error the server sends (before or during the stream) raises RuntimeError with its message."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(_error_message(response))
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message", str(chunk["error"])))
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                if text:
                    yield text


def _error_message(response: httpx.Response) -> str:
    try:
        return f"HTTP {response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


def served_model(client: httpx.Client) -> str:
    """The first model the server lists (the base model)."""
    response = client.get("/v1/models")
    if response.status_code != 200:
        raise RuntimeError(_error_message(response))
    return response.json()["data"][0]["id"]


def run_session(client: httpx.Client, mode: str, model: str, max_tokens: int | None, system_prompt: str | None,
                quick: str | None, read: Callable[[str], str] = input, write: Callable[[str], None] = None,
                temperature: float | None = None) -> int:
    """The loop: read a line, stream its answer. mode "chat" or "complete"; max_tokens and temperature None leave
    the server's defaults. Returns the exit code."""
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    while True:
        if quick is not None:
            line = quick
        else:
            try:
                line = read("> " if mode == "chat" else "prompt> ")
            except EOFError:
                write("\n")
                return 0
            if not line.strip():
                continue
        body: dict[str, Any] = {"model": model}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if temperature is not None:
            body["temperature"] = temperature
        if mode == "chat":
            body["messages"] = messages + [{"role": "user", "content": line}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = line
            path = "/v1/completions"
        answer = []
        try:
            for text in stream_deltas(client, path, body):
                answer.append(text)
                write(text)
            write("\n")
        except RuntimeError as err:  # the server refused this one: say so, keep the session
            write(f"\nerror: {err}\n")
            if quick is not None:
                return 1
            continue
        if mode == "chat":
            messages = body["messages"] + [{"role": "assistant", "content": "".join(answer)}]
        if quick is not None:
            return 0


def _cmd_client(args: argparse.Namespace) -> int:
    import httpx

    if args.max_tokens is not None and args.max_tokens < 1:
        print(f"minillm {args.mode}: error: --max-tokens must be >= 1, got {args.max_tokens}", file=sys.stderr)
        return 2
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = args.url.rstrip("/")
    if url.endswith("/v1"):  # vLLM's clients take the /v1 base URL; the paths here carry it
        url = url[:-len("/v1")]
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(10.0, read=None)) as client:
            model = args.model_name or served_model(client)
            return run_session(client, args.mode, model, args.max_tokens, getattr(args, "system_prompt", None),
                               args.quick, temperature=args.temperature)
    except (httpx.HTTPError, RuntimeError) as err:
        print(f"minillm {args.mode}: error: {err} (is `minillm serve` running at {args.url}?)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def register(subparsers: argparse._SubParsersAction) -> None:
    for mode, help_text in (("chat", "talk to a running server's chat endpoint (vLLM's `vllm chat`)"),
                            ("complete", "send prompts to a running server's completions endpoint")):
        p = subparsers.add_parser(mode, help=help_text)
        p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's base URL")
        p.add_argument("--model-name", default=None, help="model id (default: the server's first)")
        p.add_argument("--api-key", default=None, help="the server's --api-key, if it has one")
        p.add_argument("--max-tokens", type=int, default=None, help="longest answer (default: the server's)")
        p.add_argument("--temperature", type=float, default=None, help="0 for greedy (default: the server's, 1)")
        p.add_argument("--quick", default=None, metavar="TEXT", help="send one message, print its answer, exit")
        if mode == "chat":
            p.add_argument("--system-prompt", default=None, help="a system message opening the conversation")
        p.set_defaults(func=_cmd_client, mode=mode)
