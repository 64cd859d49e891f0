"""OpenAI's Responses API (POST /v1/responses, vLLM's too): the newer shape of a chat turn, served by the chat path.

A Responses request says the same things as a chat completion in other words, and its answer is a list of typed
output items instead of choices:

    request                                        chat completion it becomes
    instructions                                   a system message first
    input: "text"                                  one user message
    input: [{"role": ..., "content": ...}, ...]    the messages (content parts input_text / output_text joined)
      {"type": "function_call", "call_id", ...}    an assistant message with tool_calls
      {"type": "function_call_output", ...}        a tool message answering call_id
    max_output_tokens                              max_completion_tokens
    tools: [{"type": "function", "name", ...}]     tools: [{"type": "function", "function": {...}}]
    text: {"format": {"type": "json_schema", ...}} response_format

    answer                                         output items, in order
    reasoning_content (--reasoning-parser)         {"type": "reasoning", "content": [{"type": "reasoning_text"}]}
    content                                        {"type": "message", "content": [{"type": "output_text"}]}
    tool_calls                                     one {"type": "function_call", "call_id", "name", "arguments"} each
    finish_reason "length"                         status "incomplete", incomplete_details max_output_tokens

Streaming, the chat path's chunks become the Responses events (`event: <type>` and a `data:` object with its
`type` and `sequence_number`): response.created, response.in_progress, then per item output_item.added, its text
deltas (output_text / reasoning_text, or function_call_arguments for a call, sent whole as the chat path sends a
call), their .done events and output_item.done, then response.completed (or response.incomplete; an error becomes
an `error` event and response.failed). There is no `[DONE]` line in this API.

This server stores no responses (store is answered false): previous_response_id, background and conversation are
refused; a client keeps the conversation itself by sending the earlier output items back as input, which the
table above reads. Only text goes in and out (input_image and built-in tools such as web_search are refused). The
chat path does all the work, so everything it checks and honours (sampling fields, LoRA adapters as the model,
structured outputs, tool_choice, the reasoning parser) holds here the same.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from minillm.serve.protocol import ApiError, ChatCompletionRequest
from minillm.serve.sse import _event

# the chat fields a Responses request names otherwise (for the `param` of an error)
_PARAMS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens", "messages": "input",
           "response_format": "text.format"}
_PASSED_ON = ("model", "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty",
              "frequency_penalty", "stop", "ignore_eos", "user", "request_id", "priority", "include_reasoning")


class ResponsesRequest(BaseModel):
    """The body of POST /v1/responses (unknown fields ignored, as on the other endpoints)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    input: str | list[dict[str, Any]] = ""
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None  # None: the model's generation config (openai_api.py: sampling_knobs)
    top_p: float | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # calls are read as the model writes them: one or several
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None  # answered false: nothing is stored
    # OpenAI's fields for what this server does not do: refused unless left out (or their no-op value)
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    truncation: str | None = None
    max_tool_calls: int | None = None
    # vLLM's sampling extensions, passed on to the chat path
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    request_id: str | None = None
    priority: int = 0
    include_reasoning: bool = True

    def refused(self) -> tuple[str, str] | None:
        """(field, message) for the first thing asked that this server cannot do, or None."""
        if self.previous_response_id is not None or self.conversation is not None:
            field = "previous_response_id" if self.previous_response_id is not None else "conversation"
            return field, (f"{field} needs a stored response, and this server stores none: send the earlier turns "
                           f"(their output items) back as input")
        checks = {"background": (self.background, (None, False), "background responses"),
                  "prompt": (self.prompt, (None,), "stored prompt templates"),
                  "reasoning": (self.reasoning and self.reasoning.get("effort"), (None,), "a reasoning effort"),
                  "include": (self.include, (None, []), "included extras (log-probabilities, sources)"),
                  "top_logprobs": (self.top_logprobs, (None, 0), "log-probabilities"),
                  "truncation": (self.truncation, (None, "disabled"), "truncation 'auto'"),
                  "max_tool_calls": (self.max_tool_calls, (None,), "a cap on tool calls")}
        for field, (value, no_ops, what) in checks.items():
            if value not in no_ops:
                return field, f"{field} is not supported ({what}): leave it out, got {json.dumps(value)[:100]}"
        return None


# -- the request, as a chat completion --------------------------------------------------------------------------
def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or parts input_text / output_text / text, joined by newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts, got "
                            f"{json.dumps(content)[:100]}", param="input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}.content[{j}] must be an input_text or output_text part with a text; "
                                f"this server takes text only, got {json.dumps(part)[:100]}", param="input")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """The chat messages of the request's instructions and input (module docstring's table)."""
    messages = [{"role": "system", "content": request.instructions}] if request.instructions else []
    if isinstance(request.input, str):
        return messages + [{"role": "user", "content": request.input}]
    for i, item in enumerate(request.input):
        kind, where = item.get("type", "message"), f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{where}.role must be user, assistant, system or developer, got {role!r}",
                               param="input")
            messages.append({"role": role, "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            if not all(isinstance(v, str) for v in (call["id"], *call["function"].values())):
                raise ApiError(400, f"{where}: a function_call needs call_id, name and arguments (strings)",
                               param="input")
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise ApiError(400, f"{where}: a function_call_output needs call_id and output (strings)",
                               param="input")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        elif kind != "reasoning":  # an earlier thought is not fed back (as chat templates drop it)
            raise ApiError(400, f"{where}.type must be message, function_call, function_call_output or reasoning; "
                                f"this server takes text only, got {kind!r}", param="input")
    if not messages:
        raise ApiError(400, "input is empty: give a string or a list of messages", param="input")
    return messages


def _chat_tools(request: ResponsesRequest) -> tuple[list | None, Any]:
    """(chat tools, chat tool_choice) of the request's function tools; built-in tools are refused."""
    tools = []
    for i, tool in enumerate(request.tools or []):
        if tool.get("type") != "function":
            raise ApiError(400, f"tools[{i}].type must be 'function' (this server runs no built-in tools such as "
                                f"web_search or file_search), got {tool.get('type')!r}", param="tools")
        tools.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                       if k in tool}})
    choice = request.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return tools or None, choice


def _response_format(request: ResponsesRequest) -> dict | None:
    form = (request.text or {}).get("format")
    if form is None or (isinstance(form, dict) and form.get("type") == "text"):
        return None
    if isinstance(form, dict) and form.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: form[k] for k in ("name", "schema", "strict")
                                                       if k in form}}
    return form  # json_object, or something the chat path refuses by name


def to_chat(request: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion that answers `request` (its refused fields are a 400 first)."""
    problem = request.refused()
    if problem is not None:
        raise ApiError(400, problem[1], param=problem[0])
    if request.max_output_tokens is not None and request.max_output_tokens < 1:
        raise ApiError(400, f"max_output_tokens must be an integer >= 1, or left out (until the context ends), got "
                            f"{request.max_output_tokens}", param="max_output_tokens")
    tools, tool_choice = _chat_tools(request)
    fields = {name: getattr(request, name) for name in _PASSED_ON}
    fields.update(messages=chat_messages(request), max_completion_tokens=request.max_output_tokens, tools=tools,
                  tool_choice=tool_choice, response_format=_response_format(request), stream=request.stream)
    if request.stream:
        fields["stream_options"] = {"include_usage": True}
    try:
        chat = ChatCompletionRequest.model_validate(fields)
    except ValidationError as err:
        first = err.errors()[0]
        raise ApiError(400, f"{'.'.join(map(str, first['loc']))}: {first['msg']}", param="input") from None
    chat._usage_details = True  # input_tokens_details.cached_tokens: the prefix cache's hits
    return chat


# -- the answer, as a response ----------------------------------------------------------------------------------
def _usage(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    cached = chat_usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
    return {"input_tokens": chat_usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}


class _Response:
    """One response's fixed fields (from the request) and its output items as they are made."""

    def __init__(self, request: ResponsesRequest, model: str | None = None) -> None:
        self.request = request
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model or request.model
        self.output: list[dict] = []

    def body(self, status: str, usage: dict | None = None, error: dict | None = None) -> dict:
        r = self.request
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": error, "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
                else None, "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "model": self.model, "output": self.output, "parallel_tool_calls": r.parallel_tool_calls,
                "previous_response_id": None, "reasoning": {"effort": None, "summary": None}, "store": False,
                "temperature": r.temperature, "text": r.text or {"format": {"type": "text"}},
                "tool_choice": r.tool_choice if r.tool_choice is not None else "auto", "tools": r.tools or [],
                "top_p": r.top_p, "truncation": "disabled", "usage": usage, "user": r.user,
                "metadata": r.metadata or {}}


def _message(text: str, status: str) -> dict:
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def _reasoning(text: str) -> dict:
    return {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _function_call(call: dict) -> dict:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}


def response_body(request: ResponsesRequest, chat_body: dict) -> dict:
    """The response of a finished chat completion's body (module docstring's table)."""
    response = _Response(request)
    response.model = chat_body["model"]
    choice = chat_body["choices"][0]
    message, incomplete = choice["message"], choice["finish_reason"] == "length"
    if message.get("reasoning_content"):
        response.output.append(_reasoning(message["reasoning_content"]))
    if message.get("content") is not None or not message.get("tool_calls"):
        response.output.append(_message(message.get("content") or "", "incomplete" if incomplete else "completed"))
    response.output.extend(_function_call(call) for call in message.get("tool_calls") or ())
    return response.body("incomplete" if incomplete else "completed", _usage(chat_body.get("usage")))


async def respond(serving: Any, request: ResponsesRequest, raw: Request) -> Response:
    """POST /v1/responses through the chat path (`serving` is the server's OpenAIServing)."""
    knobs = serving.sampling_knobs(request)  # what a left-out temperature / top_p will be: the response says so
    request = request.model_copy(update={"temperature": knobs["temperature"], "top_p": knobs["top_p"]})
    chat = to_chat(request)
    try:
        answer = await serving.chat(chat, raw)
    except ApiError as err:
        err.param = _PARAMS.get(err.param, err.param)
        raise
    if isinstance(answer, StreamingResponse):
        events = _events(request, answer.body_iterator, request.model or serving.model_name)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    if not isinstance(answer, JSONResponse):  # the client left (499)
        return answer
    return JSONResponse(response_body(request, json.loads(answer.body)))


class _EventWriter:
    """The Responses events of one streamed answer, item by item: the item being written (a message or a thought,
    `open`), closed by the next kind of output or by the end; each call sent whole, as the chat path sends it."""

    def __init__(self, response: _Response) -> None:
        self.response, self.seq, self.open = response, 0, None
        self.finish: str | None = None
        self.usage: dict | None = None

    def event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        return f"event: {kind}\n" + _event({"type": kind, "sequence_number": self.seq - 1, **fields})

    def chunk(self, chunk: dict) -> list[str]:
        """The events of one chat chunk's deltas (its finish reason and usage remembered for the end)."""
        self.response.model = chunk.get("model", self.response.model)
        self.usage = chunk.get("usage") or self.usage
        out: list[str] = []
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                out += self.write("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                out += self.write("message", delta["content"])
            if delta.get("tool_calls"):
                out += self.calls(delta["tool_calls"])
            self.finish = choice.get("finish_reason") or self.finish
        return out

    def write(self, kind: str, delta: str) -> list[str]:
        """Events for `delta` of a thought ("reasoning") or of the answer's text ("message")."""
        out = [] if self.open is not None and self.open["type"] == kind else self.close()
        index = len(self.response.output)  # (after closing the item before)
        if self.open is None:
            self.open = _message("", "in_progress") if kind == "message" else _reasoning("")
            out.append(self.event("response.output_item.added", output_index=index,
                                  item={**self.open, "content": []}))
            if kind == "message":
                out.append(self.event("response.content_part.added", item_id=self.open["id"], output_index=index,
                                      content_index=0, part=dict(self.open["content"][0])))
        self.open["content"][0]["text"] += delta
        if kind == "message":
            return out + [self.event("response.output_text.delta", item_id=self.open["id"], output_index=index,
                                     content_index=0, delta=delta, logprobs=[])]
        return out + [self.event("response.reasoning_text.delta", item_id=self.open["id"], output_index=index,
                                 content_index=0, delta=delta)]

    def calls(self, calls: list[dict]) -> list[str]:
        out = self.close()
        for call in calls:
            item, index = _function_call(call), len(self.response.output)
            out += [self.event("response.output_item.added", output_index=index,
                               item={**item, "arguments": "", "status": "in_progress"}),
                    self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                               delta=item["arguments"]),
                    self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=index, item=item)]
            self.response.output.append(item)
        return out

    def close(self) -> list[str]:
        """The .done events of the item being written, if any."""
        item, self.open = self.open, None
        if item is None:
            return []
        index, part = len(self.response.output), item["content"][0]
        if item["type"] == "message":
            item["status"] = "incomplete" if self.finish == "length" else "completed"
            done = [self.event("response.output_text.done", item_id=item["id"], output_index=index,
                               content_index=0, text=part["text"]),
                    self.event("response.content_part.done", item_id=item["id"], output_index=index,
                               content_index=0, part=part)]
        else:
            done = [self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                               content_index=0, text=part["text"])]
        self.response.output.append(item)
        return done + [self.event("response.output_item.done", output_index=index, item=item)]

    def end(self) -> list[str]:
        """The last item's .done events (an empty message when nothing was said), then completed / incomplete."""
        out = self.write("message", "") if not self.response.output and self.open is None else []
        status = "incomplete" if self.finish == "length" else "completed"
        return out + self.close() + [self.event(f"response.{status}",
                                                response=self.response.body(status, _usage(self.usage)))]


async def _events(request: ResponsesRequest, chunks: AsyncIterator[str], model: str) -> AsyncIterator[str]:
    """The Responses events of the chat path's streamed chunks (module docstring)."""
    writer = _EventWriter(_Response(request, model))
    yield writer.event("response.created", response=writer.response.body("in_progress"))
    yield writer.event("response.in_progress", response=writer.response.body("in_progress"))
    try:
        async for piece in chunks:
            for line in piece.split("\n"):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    message = chunk["error"].get("message")
                    yield writer.event("error", code=chunk["error"].get("code"), message=message, param=None)
                    yield writer.event("response.failed", response=writer.response.body(
                        "failed", error={"code": "server_error", "message": message}))
                    return
                for text in writer.chunk(chunk):
                    yield text
    finally:
        await chunks.aclose()  # a client that left: the chat stream's own cleanup aborts the request
    for text in writer.end():
        yield text
