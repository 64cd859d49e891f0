"""`minillm run-batch -i requests.jsonl -o results.jsonl [MODEL]`: OpenAI's Batch API file format, run offline
(vLLM's `vllm run-batch`; chapter 10's server without the network).

Each input line is one request,

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...], ...}}

for /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /score and /rerank (and their /v1, /v2
spellings). Each output line answers one, in the input's order,

    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "chatcmpl-...",
     "body": {...the endpoint's JSON answer...}}, "error": null}

A request the server refuses keeps its status code and OpenAI-shaped error body in "response" (as OpenAI's batch
output does); a line that is no request at all (not JSON, no url, a url no endpoint serves, stream: true) gets
"response": null and an "error" naming what is wrong. One bad line never stops the others.

The requests go through the server's own app in this process (httpx's ASGI transport: no socket), so every check,
default and answer is the server's; all of them are in flight at once (up to --max-concurrency), and the engine
batches them as it batches a server's clients: this is offline throughput with the API's exact semantics.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/score", "/v1/score",
              "/rerank", "/v1/rerank", "/v2/rerank")


def read_requests(lines: list[str]) -> list[dict | tuple[Any, str]]:
    """Each non-empty line's request (a dict with custom_id, url and body), or (its custom_id if it has one, the
    reason it is no request)."""
    requests: list[dict | tuple[Any, str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError as err:
            requests.append((None, f"line {number} is not JSON: {err}"))
            continue
        if not isinstance(request, dict):
            requests.append((None, f"line {number} must be a JSON object, got {type(request).__name__}"))
            continue
        body, url = request.get("body"), request.get("url")
        problem = (f"url must be one of {', '.join(BATCH_URLS)}, got {url!r}" if url not in BATCH_URLS else
                   f"method must be POST, got {request.get('method')!r}" if request.get("method", "POST") != "POST"
                   else "body must be a JSON object" if not isinstance(body, dict) else
                   "stream is not supported in a batch: each answer is written whole" if body.get("stream") else None)
        requests.append((request.get("custom_id"), f"line {number}: {problem}") if problem else request)
    return requests


def _output(custom_id: Any, status: int | None = None, body: Any = None, error: str | None = None) -> dict:
    response = None if status is None else {
        "status_code": status, "request_id": (body or {}).get("id") if isinstance(body, dict) else None, "body": body}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": response,
            "error": None if error is None else {"code": "invalid_request", "message": error}}


async def run_batch(app: Any, llm: Any, requests: list[dict | tuple[Any, str]], max_concurrency: int = 256,
                    progress: Any = None) -> list[dict]:
    """The output line of every request, in order: each request sent to `app` (the server's, around the AsyncLLM
    `llm`, whose loop runs meanwhile) at most `max_concurrency` at a time."""
    import httpx  # (the server's client library, imported only here: the autograder's image has none)
    limit = asyncio.Semaphore(max_concurrency)
    await llm.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://batch",
                                     timeout=None) as client:
            async def one(request: dict | tuple[Any, str]) -> dict:
                if isinstance(request, tuple):
                    return _output(*request[:1], error=request[1])
                async with limit:
                    response = await client.post(request["url"], json=request["body"])
                if progress is not None:
                    progress.update(1)
                try:
                    body = response.json()
                except ValueError:
                    body = response.text
                return _output(request.get("custom_id"), response.status_code, body)
            return list(await asyncio.gather(*(one(r) for r in requests)))
    finally:
        await llm.shutdown()


def _cmd_run_batch(args: argparse.Namespace) -> int:
    from minillm.cli import check_output_path
    from minillm.serve.cli import build_served_app, check_server_options
    try:
        if args.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
        with (sys.stdin if args.input_file == "-" else open(args.input_file, encoding="utf-8")) as f:
            requests = read_requests(f.read().splitlines())
        if args.output_file != "-":
            check_output_path(args.output_file, "-o", folder=False)  # before the model loads
        check_server_options(args)
        llm, app, _ = build_served_app(args, max_body_bytes=1 << 30)
    except (ValueError, TypeError, OSError) as err:
        print(f"minillm run-batch: error: {err}", file=sys.stderr)
        return 2
    from tqdm import tqdm
    start = time.perf_counter()
    with tqdm(total=sum(isinstance(r, dict) for r in requests), desc="requests", file=sys.stderr,
              disable=args.output_file == "-" and not sys.stderr.isatty()) as bar:
        outputs = asyncio.run(run_batch(app, app.state.llm, requests, args.max_concurrency, bar))
    llm.llm_engine.shutdown()
    text = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs)
    if args.output_file == "-":
        sys.stdout.write(text)
    else:
        with open(args.output_file, "w", encoding="utf-8") as f:
            f.write(text)
    failed = sum(o["error"] is not None or o["response"]["status_code"] != 200 for o in outputs)
    print(f"minillm run-batch: {len(outputs) - failed} of {len(outputs)} requests answered 200 in "
          f"{time.perf_counter() - start:.1f} s" + (f"; {failed} failed (their lines say why)" if failed else ""),
          file=sys.stderr)
    return 0


def register_run_batch(subparsers: argparse._SubParsersAction) -> None:
    from minillm.serve.cli import add_model_options
    p = subparsers.add_parser("run-batch", help="OpenAI Batch API file (JSONL) run offline through the server's "
                                                "endpoints (vLLM's run-batch)")
    p.add_argument("-i", "--input-file", required=True, help="requests, one JSON object per line ('-': stdin)")
    p.add_argument("-o", "--output-file", required=True, help="answers, one per request, in order ('-': stdout)")
    p.add_argument("--max-concurrency", type=int, default=256, help="requests in flight at once")
    add_model_options(p)
    p.set_defaults(func=_cmd_run_batch, allow_runtime_lora_updating=False)
