"""The HTTP server: a FastAPI app around one AsyncLLM (chapter 10).

    GET  /health                 200 while the engine loop runs, 503 otherwise (never needs the API key); /ping
                                 the same, GET or POST (SageMaker's probe, as vLLM serves it)
    GET  /version                {"version": minillm's}
    GET  /v1/models              the model served and its LoRA adapters (/v1/models/{id}: one of them, or 404)
    POST /v1/completions         text or token-id prompts; JSON, or SSE with stream=true
    POST /v1/chat/completions    messages through the model's chat template
    POST /v1/responses           OpenAI's Responses API, served by the chat path (responses.py; nothing stored)
    POST /classify               a classification or reward model's label probabilities per input (classify.py)
    GET  /metrics                Prometheus text (metrics.py)
    GET  /engine/state           the engine's queues, KV blocks and recent batches as JSON (for the playground)
    GET  /                       the playground: a chat box beside the live engine (playground.html)
    POST /v1/load_lora_adapter   with allow_runtime_lora_updating only (vLLM's routes; serving_models.py):
    POST /v1/unload_lora_adapter adapters served from now on, or no longer (not mounted otherwise: 404)

Every GET route answers HEAD too (a load balancer's probe, `curl -I`); a known route asked with another method is
a 405 whose Allow header lists the methods it takes, as HTTP requires. Every error, a bug's included, is a JSON
body of OpenAI's shape: a client never has to parse Starlette's plain-text "Internal Server Error".

Why FastAPI and uvicorn: pydantic checks every body against a declared schema (a wrong type is refused for
free, naming the bad field: a 400, as OpenAI and vLLM answer it, not FastAPI's default 422), StreamingResponse
turns an async generator into Server-Sent Events and cancels it when the client disconnects, and uvicorn is the
asyncio server vLLM and SGLang run on. Errors are OpenAI-shaped
({"error": {"message", "type", "param", "code"}}) so the official openai client raises them with our message.

Two checks run before any route, in one small ASGI middleware: the API key (Authorization: Bearer KEY; the
playground page also takes ?api_key=KEY, since a browser cannot send a header when it opens a page) and the
body size (413 before the body is read when Content-Length says too much, or as soon as a chunked body does;
uvicorn itself refuses a body longer than its Content-Length).
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Sequence
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from minillm.engine.async_llm import AsyncLLM, EngineDeadError, EngineSnapshot
from minillm.engine.sleep_mode import EngineSleepingError
from minillm.pooling import PoolingParams
from minillm.serve.metrics import CONTENT_TYPE, ServerMetrics
from minillm.serve.openai_api import OpenAIServing
from minillm.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest,
                                    UnloadLoRAAdapterRequest, error_body, validation_message)
from minillm.serve.serving_models import LoRAModulePath, OpenAIServingModels
from minillm.serve.classify import ClassificationRequest, classify
from minillm.serve.embeddings import EmbeddingRequest, embeddings
from minillm.serve.responses import ResponsesRequest, respond
from minillm.serve.scoring import RerankRequest, ScoreRequest, rerank, score
from minillm.serve.reasoning import REASONING_PARSERS
from minillm.serve.tool_parser import TOOL_CALL_PARSERS
from minillm.serve.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt this context holds, far below a memory problem
RECENT_STEPS = 64  # batches the playground can show


def build_app(llm: AsyncLLM, model_name: str, *, api_key: str | None = None, chat_template: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, shutdown_timeout: float = 0.0,
              trust_request_chat_template: bool = False,
              lora_modules: Sequence[LoRAModulePath] | None = None,
              allow_runtime_lora_updating: bool = False, pooler_config: PoolingParams | None = None,
              dev_mode: bool = False, profile_dir: str | None = None, tool_call_parser: str | None = None,
              reasoning_parser: str | None = None, cors: dict[str, Any] | None = None,
              enable_prompt_tokens_details: bool = False) -> FastAPI:
    """The server for `llm`. Its lifespan starts the engine loop and, on shutdown, lets in-flight requests
    finish for `shutdown_timeout` seconds, then aborts the rest. A chat request may bring its own template only
    with trust_request_chat_template (minillm.serve.chat_prompt.render_chat says why). `lora_modules`: adapters
    served over the model (an engine with enable_lora=True), each read and checked here, before the server
    starts (serving_models.py). `allow_runtime_lora_updating` (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING; needs
    enable_lora): POST /v1/load_lora_adapter and /v1/unload_lora_adapter add and remove adapters while it runs.
    `pooler_config` (vLLM's --pooler-config): how /v1/embeddings, /score and /rerank pool (default LAST, normalized).
    `dev_mode` (vLLM's VLLM_SERVER_DEV_MODE) mounts the developers' endpoints: POST /reset_prefix_cache, and
    sleep mode's POST /sleep?level=1|2, POST /wake_up[?tags=weights&tags=kv_cache], GET /is_sleeping, and POST
    /pause?mode=wait|abort, POST /resume, GET /is_paused (new requests wait while paused).
    `profile_dir` (vLLM's VLLM_TORCH_PROFILER_DIR) mounts POST /start_profile and /stop_profile, which record
    torch.profiler traces of the engine there (minillm/engine/profiler.py). `tool_call_parser` (vLLM's
    --enable-auto-tool-choice --tool-call-parser hermes) serves tool_choice "auto" (serve/tool_parser.py).
    `reasoning_parser` (vLLM's --reasoning-parser deepseek_r1 / qwen3) returns a chat answer's thought as
    reasoning_content apart from its content (serve/reasoning.py). `enable_prompt_tokens_details` (vLLM's flag)
    adds usage.prompt_tokens_details.cached_tokens, the prompt tokens served from the prefix cache. `cors`
    (vLLM's --allowed-origins, --allow-credentials, --allowed-methods, --allowed-headers: Starlette's
    CORSMiddleware options) lets web pages of those origins call the server from a browser; None (the default,
    unlike vLLM's "*") sends no CORS headers, so no other site's page can read the answers of a server on this
    machine."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty string or None")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1, got {max_body_bytes!r}")
    if allow_runtime_lora_updating and getattr(llm.engine, "lora_slots", None) is None:
        raise ValueError("allow_runtime_lora_updating needs an engine built with enable_lora=True (minillm serve: "
                         "add --enable-lora, with --max-loras and --max-lora-rank to size the adapter slots)")
    models = OpenAIServingModels(llm.engine, model_name, llm.max_model_len, lora_modules or ())
    models.check_adapters()
    if pooler_config is not None and not isinstance(pooler_config, PoolingParams):
        raise TypeError(f"pooler_config must be a minillm.pooling.PoolingParams, got {type(pooler_config).__name__}")
    if tool_call_parser is not None and tool_call_parser not in TOOL_CALL_PARSERS:
        raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)} or None, got "
                         f"{tool_call_parser!r}")
    if reasoning_parser is not None and reasoning_parser not in REASONING_PARSERS:
        raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)} or None, got "
                         f"{reasoning_parser!r}")
    serving = OpenAIServing(llm, model_name, chat_template, trust_request_chat_template, models,
                            pooling=pooler_config, tool_parser=tool_call_parser, reasoning_parser=reasoning_parser,
                            prompt_tokens_details=enable_prompt_tokens_details)
    metrics = ServerMetrics(model_name, offload=getattr(getattr(llm.engine.scheduler, "block_manager", None),
                                                         "offload", None) is not None)
    recent: collections.deque = collections.deque(maxlen=RECENT_STEPS)

    def remember_batch(outputs: list, snapshot: EngineSnapshot) -> None:
        if snapshot.batch:
            recent.append({"step": snapshot.step, "batch": snapshot.batch})

    llm.add_step_listener(metrics.on_step)
    llm.add_step_listener(remember_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await llm.start()
        try:
            yield
        finally:
            await llm.shutdown(timeout=shutdown_timeout)

    app = FastAPI(title="minillm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llm, app.state.metrics, app.state.models = llm, metrics, models
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors is not None:  # added last, so outermost: a browser's preflight (no API key) is answered before the guard
        app.add_middleware(CORSMiddleware, **cors)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors) or not _is_json(await request.body()):
            return _bad_json()
        content_type = request.headers.get("content-type", "")
        if not _is_json_type(content_type):  # FastAPI reads a body as JSON only when the request says it is
            return JSONResponse(error_body(f"send the JSON body with Content-Type: application/json, got "
                                           f"{content_type or 'no Content-Type'!r}", code="unsupported_media_type"),
                                status_code=415)
        param, message = validation_message(errors)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 400 and request.method == "POST" and not _is_json(await request.body()):
            return _bad_json()  # JSON that is not UTF-8, or nested too deep: FastAPI's own 400 says neither
        return JSONResponse(error_body(str(err.detail), "not_found_error" if err.status_code == 404 else
                                       "invalid_request_error"), status_code=err.status_code, headers=err.headers)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(EngineSleepingError)  # sleep mode: retry once the engine is awake
    async def engine_gone(request: Request, err: RuntimeError) -> JSONResponse:
        return JSONResponse(error_body(str(err), "service_unavailable", code=503), status_code=503)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        # a bug or a failed engine step; uvicorn still logs the traceback
        return JSONResponse(error_body(f"internal server error: {type(err).__name__}: {err}", "server_error",
                                       code=500), status_code=500)

    def get(path: str) -> Any:
        """@app.get, answering HEAD too (FastAPI's own @app.get does not, unlike Starlette's routes)."""
        return app.api_route(path, methods=["GET", "HEAD"])

    @get("/health")
    async def health() -> Response:
        ok = llm.is_running and llm.accepting
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    app.api_route("/ping", methods=["GET", "HEAD", "POST"])(health)  # SageMaker's name for the probe

    @get("/version")
    async def version() -> dict:
        from minillm import __version__
        return {"version": __version__}

    @get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": models.cards()}

    @get("/v1/models/{model_id:path}")  # :path: a model id may hold a slash (HuggingFaceTB/SmolLM2-135M)
    async def model(model_id: str) -> dict:
        return models.card(model_id)

    if allow_runtime_lora_updating:  # vLLM mounts these only when runtime updating is allowed: a 404 otherwise
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
            if body.load_inplace:
                raise ApiError(400, "load_inplace=true is not supported: unload the adapter, then load it again",
                               "InvalidUserInput", "load_inplace", 400)
            return PlainTextResponse(await models.load_lora_adapter(body.lora_name, body.lora_path))

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
            return PlainTextResponse(models.unload_lora_adapter(body.lora_name))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    @app.post("/v1/responses")  # OpenAI's Responses API: the chat path's answer as output items
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await respond(serving, body, request)

    @get("/v1/responses/{response_id}")
    async def stored_response(response_id: str) -> Response:
        raise ApiError(404, f"no response {response_id!r} is stored: this server stores none (its responses say "
                            f"store: false)", "not_found_error")

    @app.post("/v1/embeddings")  # OpenAI's: a vector per input, pooled from the model (serve/embeddings.py)
    async def embed(body: EmbeddingRequest) -> dict:
        return await embeddings(serving, body)

    @app.post("/classify")  # vLLM's: a *ForSequenceClassification model's probabilities (serve/classify.py)
    async def classify_inputs(body: ClassificationRequest) -> dict:
        return await classify(serving, body)

    async def score_pairs(body: ScoreRequest) -> dict:  # vLLM's: cosine similarities of embeddings
        return await score(serving, body)

    async def rerank_documents(body: RerankRequest) -> dict:  # Jina's / Cohere's shape (serve/scoring.py)
        return await rerank(serving, body)

    for path in ("/score", "/v1/score"):
        app.post(path)(score_pairs)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.post(path)(rerank_documents)

    if dev_mode:
        @app.post("/reset_prefix_cache")  # vLLM's (dev mode): later requests reuse no prefix cached before
        async def reset_prefix_cache() -> Response:
            if not await llm.reset_prefix_cache():
                raise ApiError(400, "this server caches no prefixes (start it with --enable-prefix-caching)")
            return Response(status_code=200)

        @app.post("/sleep")  # vLLM's sleep mode (engine/sleep_mode.py): the device's memory given back
        async def sleep(request: Request) -> Response:
            level = request.query_params.get("level", "1")
            try:
                await llm.sleep(int(level) if level.isdigit() else level)
            except ValueError as err:  # a bad level; speculative decoding
                raise ApiError(400, str(err), param="level") from None
            except RuntimeError as err:  # requests running, asleep already: the server's state, not the request
                raise ApiError(409, str(err), code=409) from None
            return Response(status_code=200)

        @app.post("/wake_up")
        async def wake_up(request: Request) -> Response:
            tags = request.query_params.getlist("tags") or None
            try:
                await llm.wake_up(tags)
            except ValueError as err:
                raise ApiError(400, str(err), param="tags") from None
            return Response(status_code=200)

        @get("/is_sleeping")
        async def is_sleeping() -> dict:
            return {"is_sleeping": await llm.is_sleeping()}

        @app.post("/pause")  # vLLM's pause_generation: new requests wait; returns once the engine is idle
        async def pause(request: Request) -> Response:
            try:
                await llm.pause_generation(request.query_params.get("mode", "wait"))
            except ValueError as err:
                raise ApiError(400, str(err), param="mode") from None
            return Response(status_code=200)

        @app.post("/resume")
        async def resume() -> Response:
            await llm.resume_generation()
            return Response(status_code=200)

        @get("/is_paused")
        async def is_paused() -> dict:
            return {"is_paused": llm.is_paused}

    if profile_dir is not None:
        @app.post("/start_profile")  # vLLM's, with a profiler directory: traces of the engine at work
        async def start_profile() -> Response:
            try:
                await llm.start_profile(profile_dir)
            except RuntimeError as err:  # already recording
                raise ApiError(400, str(err)) from None
            return Response(status_code=200)

        @app.post("/stop_profile")
        async def stop_profile() -> dict:
            try:
                return {"traces": await llm.stop_profile()}
            except RuntimeError as err:  # nothing recording
                raise ApiError(400, str(err)) from None

    @app.post("/tokenize")  # vLLM's: count a prompt's or a chat's tokens, off the event loop (serve/tokenize.py)
    async def tokenize_prompt(body: TokenizeRequest) -> dict:
        return await asyncio.to_thread(tokenize, serving, body)

    @app.post("/detokenize")
    async def detokenize_ids(body: DetokenizeRequest) -> dict:
        return await asyncio.to_thread(detokenize, serving, body)

    @get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(getattr(llm.engine, "sleep_state", "awake")), media_type=CONTENT_TYPE)

    @get("/engine/state")
    async def engine_state() -> dict:
        return state_json(llm.snapshot(), list(recent), model_name)

    @get("/")
    async def playground() -> HTMLResponse:
        return HTMLResponse(resources.files("minillm.serve").joinpath("playground.html").read_text("utf-8"))

    return app


def state_json(snap: EngineSnapshot, recent: list[dict], model_name: str) -> dict[str, Any]:
    """What the playground draws: queues, the KV pool (which request holds which block), recent batches."""
    def seqs(views):
        return [{"request_id": v.request_id, "prompt_tokens": v.num_prompt_tokens,
                 "output_tokens": v.num_output_tokens, "blocks": v.blocks, "lora_name": v.lora_name} for v in views]
    queries = snap.prefix_cache_queries
    return {"model": model_name, "step": snap.step, "running": seqs(snap.running), "waiting": seqs(snap.waiting),
            "swapped": seqs(snap.swapped), "num_blocks": snap.num_blocks, "num_free_blocks": snap.num_free_blocks,
            "num_used_blocks": snap.num_used_blocks, "block_size": snap.block_size,
            "num_preemptions": snap.num_preemptions,
            "prefix_cache_hit_rate": snap.prefix_cache_hits / queries if queries else 0.0, "recent_steps": recent}


def _bad_json() -> JSONResponse:
    return JSONResponse(error_body("the request body is not valid JSON", code="bad_json"), status_code=400)


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; [[[[...]]]] nested too deep
        return False
    return True


def _is_json_type(content_type: str) -> bool:
    """application/json or application/<something>+json, parameters (charset) ignored: what FastAPI parses."""
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


class GuardMiddleware:
    """API key on every route but /health and /ping; request bodies of at most max_body_bytes (413 otherwise)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"] not in ("/health", "/ping") and \
                not self._authorized(scope, headers):
            return await _send_json(send, 401, error_body("invalid or missing API key: send 'Authorization: Bearer "
                                                          "<key>'", "authentication_error", code="invalid_api_key"))
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_json(send, 413, self._too_large())
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # a chunked body: read it here (at most the limit), then replay it to the app
            chunks, seen, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left before sending its body
                chunks.append(message.get("body", b""))
                seen += len(chunks[-1])
                if seen > self.max_body_bytes:
                    return await _send_json(send, 413, self._too_large())
                more = message.get("more_body", False)
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def replaying_receive() -> dict:
                return replay.pop() if replay else await receive()
            return await self.app(scope, replaying_receive, send)
        await self.app(scope, receive, send)

    def _too_large(self) -> dict:
        return error_body(f"request body is larger than {self.max_body_bytes} bytes", code="body_too_large")

    def _authorized(self, scope: dict, headers: dict[str, str]) -> bool:
        given = headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not token and scope["path"] == "/" and scope["method"] == "GET":
            token = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key", [""])[0]
        return hmac.compare_digest(token.encode(), self.api_key.encode())


async def _send_json(send: Any, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
