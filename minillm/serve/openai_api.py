"""/v1/completions and /v1/chat/completions on top of AsyncLLM: one body in, JSON or an SSE stream out (chapter 10).

The path of one request:
  1. validate: the model name (404; an adapter's name runs the request with its LoRA: serving_models.py),
     unsupported fields (400), the prompt or the rendered chat (400), the sampling ranges (400, SamplingParams'
     own messages), prompt + max_tokens against the context (400);
  2. submit every (prompt, choice) pair as its own engine request: `n` choices are n requests whose seeds are
     derived from `seed` (seed + i), so a seeded request is reproducible and its choices still differ;
  3. merge their streams (a task per choice feeding one queue) and write either one JSON body or Server-Sent
     Events: a chunk per new piece of text, a last chunk per choice with its finish_reason, then (with
     stream_options.include_usage) a chunk with `usage` and no choices, then `data: [DONE]`; with vLLM's
     continuous_usage_stats as well, every chunk carries its choice's usage so far (that choice's prompt and the
     tokens it generated until then, as vLLM counts it; the last chunk's usage is the whole request's).
     Log-probabilities, when asked for, ride along in OpenAI's shapes (minillm/serve/logprobs.py):
     every chunk carries those of the tokens produced since the previous chunk. A completion with `echo` has its
     prompt (and the prompt's log-probabilities) in front of its first piece, as vLLM sends it.
     With `max_tokens: 0` as well, the prompt alone comes back, scored (a text's log-likelihood, as evaluation
     harnesses ask for it): the one token generated to score it is left out of the text, log-probs and usage.
     A generation that fails ends the stream with an `{"error": ...}` event, then `data: [DONE]`, like any other.
     vLLM's prompt_logprobs come in the body only (never streamed): per choice on completions, once on chat.
     vLLM's return_token_ids puts the token ids beside the text, for clients that train on exactly what was
     sampled (RL) instead of re-tokenizing it: `prompt_token_ids` (per choice on completions, once on chat; in
     a stream, on each choice's first event) and `token_ids`, the answer's (in a stream, those of the event).
A client that goes away cancels the response; cancelling the merge cancels every choice's generator, and each
generator's `finally` aborts its request in the engine, which frees its blocks before the next step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from minillm.engine.async_llm import AsyncLLM, EngineDeadError
from minillm.engine.sleep_mode import EngineSleepingError
from minillm.engine.detokenizer import decode_text
from minillm.loader.generation_config import SAMPLING_KNOBS
from minillm.lora.request import LoRARequest
from minillm.outputs import Logprob, RequestOutput
from minillm.sampling_params import ParamError, SamplingParams, choice_seed
from minillm.pooling import PoolingParams
from minillm.serve.chat_prompt import answer_role, echoed, encode_text, render_chat
from minillm.serve.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs
from minillm.beam_search import BeamSearchParams
from minillm.serve.beam_fields import beam_search_async
from minillm.serve.embeds_field import decode_prompt_embeds
from minillm.serve.sse import _disconnected, _event, _merge
from minillm.serve.serving_models import OpenAIServingModels
from minillm.serve.structured_fields import structured_outputs_of
from minillm.serve.tool_calls import tool_calls, tool_mode
from minillm.serve.answer_parser import AnswerParser, parse_answer
from minillm.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, _SamplingFields, error_body

# a request that leaves a sampling knob out (or null) gets the model's generation config's, else SamplingParams'
SAMPLING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams) if f.name in SAMPLING_KNOBS}

Prompt = tuple[str | None, list[int]]  # (text or None, token ids)
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Choice:
    index: int
    prompt_index: int
    sent: int = 0  # characters of text already sent
    sent_tokens: int = 0  # tokens whose log-probabilities were already sent
    text_offset: int = 0  # characters of token text before the next unsent token (completions' text_offset)
    num_top: int = 0  # top_logprobs per token (chat)
    echo: tuple[str, str] | None = None  # (prompt text, its first token's text): still to send, with echo=true
    score_only: bool = False  # echo with max_tokens 0: the prompt (and its log-probs) only, nothing generated
    role: str = "assistant"  # the chat answer's role (chat_prompt.answer_role)
    as_ids: bool = False  # return_tokens_as_token_ids: logprobs name tokens "token_id:<id>"
    prompt_ids: list[int] | None = None  # return_token_ids: the prompt's ids, still to send
    return_ids: bool = False  # return_token_ids: each piece of the answer carries its token ids
    sent_ids: int = 0  # answer tokens whose ids were already sent
    tool: tuple[str, str | None] | None = None  # a forced tool call (serve/tool_calls.py): answered as tool_calls;
    # ("auto", parser): calls read out of the text (serve/tool_parser.py)
    reasoning: str | None = None  # the reasoning parser that splits the thought off (serve/reasoning.py)
    include_reasoning: bool = True  # false: the thought is read, and left out
    parser: AnswerParser | None = None  # reasoning / auto tool calls while the answer streams (answer_parser.py)
    num_prompt_tokens: int = 0  # its prompt's tokens (continuous_usage_stats counts per choice)
    output: RequestOutput | None = None

    def new_ids(self, done: Any) -> list[int] | None:
        """return_token_ids: the answer's token ids not sent yet (None when not asked for; none for a scored
        prompt, whose one generated token is not part of the answer)."""
        if not self.return_ids:
            return None
        ids = [] if self.score_only else list(done.token_ids[self.sent_ids:])
        self.sent_ids += len(ids)
        return ids

    def take_prompt_ids(self) -> list[int] | None:
        """return_token_ids: the prompt's ids the first time they are asked for, then None."""
        ids, self.prompt_ids = self.prompt_ids, None
        return ids

    @property
    def auto_tools(self) -> bool:
        """Whether the model chooses between text and calls (tool_choice "auto" on a server with a parser)."""
        return self.tool is not None and self.tool[0] == "auto"

    @property
    def tool_parser(self) -> str | None:
        """The parser of the calls the model may make (tool_choice "auto"), or None."""
        return self.tool[1] if self.auto_tools else None

    @property
    def parsed(self) -> bool:
        """Whether its answer is read for reasoning and for calls the model chose to make (answer_parser.py)."""
        return self.reasoning is not None or self.auto_tools


class OpenAIServing:
    """The two generation endpoints for the model an AsyncLLM serves (and the LoRA adapters in `models`)."""

    def __init__(self, llm: AsyncLLM, model_name: str, chat_template: str | None = None,
                 trust_request_chat_template: bool = False, models: OpenAIServingModels | None = None,
                 pooling: PoolingParams | None = None, tool_parser: str | None = None,
                 reasoning_parser: str | None = None, prompt_tokens_details: bool = False) -> None:
        self.llm = llm
        # --enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens (prefix-cache hits), as vLLM
        self.prompt_tokens_details = prompt_tokens_details
        self.reasoning_parser = reasoning_parser  # --reasoning-parser: the thought apart (serve/reasoning.py)
        self.tool_parser = tool_parser  # --tool-call-parser: tool_choice "auto" (serve/tool_parser.py); None: refused
        self.pooling = pooling or PoolingParams()  # how embeddings, /score and /rerank pool (--pooler-config)
        self.model_name = model_name
        self.models = models if models is not None else OpenAIServingModels(llm.engine, model_name, llm.max_model_len)
        self.chat_template = chat_template
        self.trust_request_chat_template = trust_request_chat_template  # a request's own template (chat_prompt)
        # a token's own bytes for chat logprobs (minillm.loader.Tokenizer.token_bytes); None: its text's UTF-8
        self._token_bytes: Callable[[int], bytes] | None = getattr(llm.tokenizer, "token_bytes", None)

    # -- validation ---------------------------------------------------------------------------------------
    def check_request(self, request: _SamplingFields) -> LoRARequest | None:
        """What the body alone decides, before any prompt is tokenized: the model name (404; the adapter it names,
        returned, or None for the base model), then unsupported fields and counts out of range (400)."""
        lora_request = self.models.resolve(request.model)
        if isinstance(request, ChatCompletionRequest):
            request._tool_parser = self.tool_parser  # what tool_choice "auto" needs (serve/tool_calls.py)
            request._reasoning_parser = self.reasoning_parser  # what include_reasoning=false needs
        problem = request.unsupported()
        if problem:
            raise ApiError(400, problem[1], param=problem[0])
        try:  # as vLLM: a priority nothing honours is an error (the engine's rule), refused before tokenizing
            self.llm.engine.check_priority(request.priority)
        except ParamError:  # said in the server's terms: the flag that turns the policy on
            policy = self.llm.engine.engine_config.scheduling_policy
            raise ApiError(400, f"priority {request.priority} needs priority scheduling; this server schedules "
                                f"{policy!r}: start it with --scheduling-policy priority, or leave priority out "
                                f"or give 0", param="priority") from None
        return lora_request

    def checked_prompt(self, prompt: str | list[int], param: str, add_special_tokens: bool = True,
                keep: int | None = None) -> Prompt:
        """(text or None, token ids) of one prompt, or a 400. add_special_tokens=False: a text prompt without the
        tokenizer's BOS/EOS; keep (truncate_prompt_tokens): only its last `keep` tokens (the text is then None)."""
        text = prompt if isinstance(prompt, str) else None
        try:
            if text and (keep is not None or not add_special_tokens):
                prompt = encode_text(self.llm.tokenizer, text, add_special_tokens) or text  # none: the engine says so
            if keep is not None and not isinstance(prompt, str) and len(prompt) > keep:
                prompt, text = list(prompt)[-keep:], None
            return text, self.llm.engine.validate_prompt(prompt)[1]
        except (ValueError, TypeError) as err:
            raise ApiError(400, str(err), param=param) from None

    def checked_embeds(self, value: str, keep: int | None = None) -> Prompt:
        """(the tensor, its placeholder ids) of one base64 prompt_embeds entry, or a 400; keep
        (truncate_prompt_tokens): only its last `keep` positions."""
        try:
            embeds = decode_prompt_embeds(value)
            if keep is not None and embeds.dim() == 2 and embeds.shape[0] > keep:
                embeds = embeds[-keep:]
            return embeds, self.llm.engine.validate_prompt(embeds)[1]
        except (ValueError, TypeError) as err:
            raise ApiError(400, str(err), param="prompt_embeds") from None

    def render_chat(self, request: ChatCompletionRequest) -> Prompt:
        text, token_ids = render_chat(self.llm.tokenizer, self.chat_template, request,
                                      self.trust_request_chat_template)
        kept = self.checked_prompt(token_ids, "messages", keep=request.truncate_prompt_tokens)[1]  # 400: empty, too long
        return (text if len(kept) == len(token_ids) else None), kept

    def sampling_knobs(self, request: _SamplingFields) -> dict[str, Any]:
        """temperature, top_p, top_k, min_p and repetition_penalty: the request's where it sets them, else the
        model's generation config (LLM(generation_config=...): minillm/loader/generation_config.py), else
        SamplingParams' defaults (vLLM's order)."""
        knobs = {name: getattr(request, name) for name in SAMPLING_KNOBS}
        defaults = self.llm.engine.generation_defaults
        return {name: defaults.get(name, SAMPLING_DEFAULTS[name]) if value is None else value
                for name, value in knobs.items()}

    def sampling_params(self, request: _SamplingFields, max_tokens: int | None, prompts: list[Prompt],
                        default_max_tokens: int | None, score_only: bool = False) -> list[SamplingParams]:
        """One SamplingParams per choice (n per prompt, seeds seed + i); 400 with the reason on a bad value.
        score_only: the one token asked for only scores the prompt, so a prompt of max_model_len tokens fits."""
        longest = max(len(ids) for _, ids in prompts)
        limit = self.llm.max_model_len
        if max_tokens is None and default_max_tokens is None and longest >= limit:  # chat: the rest of the context
            raise ApiError(400, f"This model's maximum context length is {limit} tokens and the messages take "
                                f"{longest}: no room is left for the completion. Please shorten the messages.",
                           param="messages")
        if max_tokens is None:
            max_tokens = default_max_tokens if default_max_tokens is not None else limit - longest
        model_max = self.llm.engine.generation_defaults.get("max_tokens")  # generation_config's max_new_tokens:
        if model_max is not None:  # a server-wide limit on every completion, as in vLLM
            max_tokens = min(max_tokens, model_max)
        if max_tokens >= 1 and longest + max_tokens > limit and not score_only:
            raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} in the "
                                f"completion). Please reduce the prompt or max_tokens.", param="max_tokens")
        structured, structured_field = structured_outputs_of(request)
        params, knobs = [], self.sampling_knobs(request)
        for i in range(request.n):
            seed = None if request.seed is None else choice_seed(request.seed, i)
            try:
                params.append(SamplingParams(**knobs, max_tokens=max_tokens, seed=seed,
                                             stop=request.stop, stop_token_ids=request.stop_token_ids,
                                             ignore_eos=request.ignore_eos, logprobs=request.num_logprobs(),
                                             prompt_logprobs=request.num_prompt_logprobs(),
                                             presence_penalty=request.presence_penalty,
                                             frequency_penalty=request.frequency_penalty,
                                             logit_bias=request.logit_bias, min_tokens=request.min_tokens,
                                             include_stop_str_in_output=request.include_stop_str_in_output,
                                             skip_special_tokens=request.skip_special_tokens and
                                             tool_mode(request) != ("auto", "mistral"),  # [TOOL_CALLS] is one
                                             spaces_between_special_tokens=request.spaces_between_special_tokens,
                                             priority=request.priority, structured_outputs=structured,
                                             allowed_token_ids=request.allowed_token_ids,
                                             bad_words=request.bad_words))
                self.llm.engine.check_sampling_params(params[-1])
            except ValueError as err:  # a ParamError names the SamplingParams field; the client knows its own name
                field = getattr(err, "param", None)
                param = request.api_name(field) if field else None
                if field == "structured_outputs":  # the spelling the client used (guided_json, response_format...)
                    param = structured_field
                raise ApiError(400, str(err) if param == field else f"{param}: {err}", param=param) from None
        return params

    async def _checked_params(self, request: _SamplingFields, *args: Any, **kwargs: Any) -> list[SamplingParams]:
        """sampling_params, off the event loop where the request asks for structured output: compiling a schema
        into its automaton (and, the first time, reading the vocabulary's bytes) can take a second, during which
        every other stream would stall."""
        if structured_outputs_of(request)[0] is None:
            return self.sampling_params(request, *args, **kwargs)
        return await asyncio.to_thread(self.sampling_params, request, *args, **kwargs)

    # -- endpoints ----------------------------------------------------------------------------------------
    async def completions(self, request: CompletionRequest, raw: Request) -> Response:
        lora = self.check_request(request)
        prompt = request.prompts()
        if not prompt and not request.embeds():
            raise ApiError(400, "prompt is empty: give a string, a list of token ids, or a list of those",
                           param="prompt")
        # tokenizing is the one slow thing a request body can ask for (~0.6 s for a 1 MiB prompt on 2 cores): off
        # the event loop, which keeps streaming every other request meanwhile (the tokenizer lets go of the GIL);
        # prompts given as embeddings come first, as vLLM orders them
        prompts = await asyncio.to_thread(lambda: [self.checked_embeds(e, request.truncate_prompt_tokens)
                                                   for e in request.embeds()]
                                          + [self.checked_prompt(p, "prompt", request.add_special_tokens,
                                                                 request.truncate_prompt_tokens) for p in prompt])
        # echo with max_tokens 0 scores the prompt (how evaluation harnesses ask for a text's log-likelihood): the
        # engine generates one token, which the answer leaves out
        score_only = request.echo and request.max_tokens == 0
        if request.max_tokens == 0 and not score_only:
            raise ApiError(400, "max_tokens=0 generates nothing: give it with echo=true to get the prompt back (and "
                                "its log-probabilities with logprobs), or ask for max_tokens >= 1", param="max_tokens")
        params = await self._checked_params(request, 1 if score_only else request.max_tokens, prompts,
                                            default_max_tokens=16, score_only=score_only)
        if request.use_beam_search:
            return await self._beams(request, prompts, params[0].max_tokens, lora, chat=False)
        return await self._respond(request, raw, prompts, params, lora, chat=False, score_only=score_only)

    async def chat(self, request: ChatCompletionRequest, raw: Request) -> Response:
        lora = self.check_request(request)
        prompts = [await asyncio.to_thread(self.render_chat, request)]  # off the event loop, as completions
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None \
            else request.max_tokens
        params = await self._checked_params(request, max_tokens, prompts, default_max_tokens=None)
        if request.use_beam_search:
            return await self._beams(request, prompts, params[0].max_tokens, lora, chat=True)
        return await self._respond(request, raw, prompts, params, lora, chat=True)

    async def _beams(self, request: _SamplingFields, prompts: list[Prompt], max_tokens: int,
                     lora: LoRARequest | None, chat: bool) -> Response:
        """use_beam_search: the n best beams of each prompt as its n choices, best first (serve/beam_fields.py)."""
        if not (self.llm.accepting and self.llm.is_running):
            raise ApiError(503, "the server is shutting down or not ready: retry later", "service_unavailable")
        base = f"{'chatcmpl' if chat else 'cmpl'}-{request.request_id or uuid.uuid4().hex}"
        try:
            params = BeamSearchParams(beam_width=request.n, max_tokens=max_tokens, ignore_eos=request.ignore_eos,
                                      temperature=self.sampling_knobs(request)["temperature"],
                                      length_penalty=request.length_penalty)
        except ValueError as err:
            raise ApiError(400, str(err), param=getattr(err, "param", None)) from None
        found = await beam_search_async(self.llm, [ids for _, ids in prompts], params, f"{base}-{uuid.uuid4().hex}",
                                        lora, request.cache_salt)
        role, choices = answer_role(request) if chat else "assistant", []
        for p, result in enumerate(found):
            for k, beam in enumerate(result.sequences):
                answer = {"message": {"role": role, "content": beam.text}} if chat else {"text": beam.text}
                if request.return_token_ids:
                    answer["token_ids"] = list(beam.tokens)
                    if not chat:
                        answer["prompt_token_ids"] = list(prompts[p][1])
                choices.append({"index": p * request.n + k, **answer, "logprobs": None,
                                "finish_reason": beam.finish_reason})
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        completion = sum(len(beam.tokens) for result in found for beam in result.sequences)
        top = {"prompt_token_ids": list(prompts[0][1])} if chat and request.return_token_ids else {}
        return JSONResponse({"id": base, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.models.name_of(lora), "choices": choices,
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                       "total_tokens": prompt_tokens + completion}, **top})

    # -- generation ---------------------------------------------------------------------------------------
    async def _respond(self, request: _SamplingFields, raw: Request, prompts: list[Prompt],
                       params: list[SamplingParams], lora: LoRARequest | None, chat: bool,
                       score_only: bool = False) -> Response:
        if not (self.llm.accepting and self.llm.is_running):
            raise ApiError(503, "the server is shutting down or not ready: retry later", "service_unavailable")
        base = f"{'chatcmpl' if chat else 'cmpl'}-{request.request_id or uuid.uuid4().hex}"
        # the engine's ids stay unique when two clients send the same request_id
        engine_base = base if request.request_id is None else f"{base}-{uuid.uuid4().hex}"
        role = answer_role(request) if chat else "assistant"
        # the thought is split off a chat answer unless the answer's shape is constrained from its first token (a
        # schema, a regex, a forced call: there is no thought to split); auto tools' tag leaves the text free
        mode = tool_mode(request)
        shaped = params[0].structured_outputs is not None and (mode is None or mode[0] != "auto")
        reasoning = self.reasoning_parser if chat and not shaped else None
        choices = [_Choice(p * len(params) + i, p, num_top=params[i].logprobs or 0, score_only=score_only,
                           role=role, as_ids=request.return_tokens_as_token_ids, tool=mode,
                           reasoning=reasoning, include_reasoning=getattr(request, "include_reasoning", True),
                           return_ids=request.return_token_ids,
                           prompt_ids=list(prompts[p][1]) if request.return_token_ids else None,
                           num_prompt_tokens=len(prompts[p][1]))
                   for p in range(len(prompts)) for i in range(len(params))]
        if chat and echoed(request) is not None:  # the last message's content, no log-probabilities
            for c in choices:
                c.echo = (echoed(request), None)
        elif not chat and request.echo:  # a prompt of token ids is echoed as the answer's text would show it
            decode = functools.partial(decode_text, self.llm.tokenizer, skip_special_tokens=request.skip_special_tokens)
            echoes = [(text if text is not None else decode(ids), decode(ids[:1])) for text, ids in prompts]
            for c in choices:
                c.echo = echoes[c.prompt_index]
        # what each prompt is sent as: its text, else its ids; an embeddings prompt's tensor
        first = [ids if text is None or (isinstance(text, str) and not text) else text for text, ids in prompts]
        streams = [self.llm.generate(first[c.prompt_index],
                                     params[c.index % len(params)], request_id=f"{engine_base}-{c.index}",
                                     prompt_token_ids=prompts[c.prompt_index][1], lora_request=lora,
                                     cache_salt=request.cache_salt)
                   for c in choices]
        head = {"id": base, "created": int(time.time()), "model": self.models.name_of(lora)}
        num_prompt_tokens = sum(len(ids) for _, ids in prompts)
        details = self.prompt_tokens_details or getattr(request, "_usage_details", False)
        if request.stream:
            options = request.stream_options
            include_usage = bool(options and options.include_usage)
            continuous = include_usage and options.continuous_usage_stats
            return StreamingResponse(self._sse(head, choices, streams, chat, include_usage, num_prompt_tokens,
                                               details, continuous),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(self._collect(choices, streams))
        gone = asyncio.ensure_future(_disconnected(raw))
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not collect.done():  # the client left: cancelling the merge aborts every choice
            collect.cancel()
            await asyncio.gather(collect, return_exceptions=True)
            return Response(status_code=499)
        gone.cancel()
        collect.result()  # a failed generation raises: app.py answers 503 (engine gone) or 500, OpenAI-shaped
        body = self._final_body(head, choices, chat, num_prompt_tokens, details)
        if request.prompt_logprobs is not None:  # vLLM's: per choice on completions, once on chat
            for c, choice in zip(choices, body["choices"]):
                choice["prompt_logprobs"] = prompt_logprobs(c.output.prompt_logprobs)
            if chat:
                body["prompt_logprobs"] = body["choices"][0].pop("prompt_logprobs")
                for choice in body["choices"]:
                    choice.pop("prompt_logprobs", None)
        return JSONResponse(body)

    async def _collect(self, choices: list[_Choice], streams: list[AsyncIterator[RequestOutput]]) -> None:
        async for i, out in _merge(streams):
            choices[i].output = out

    def _final_body(self, head: dict, choices: list[_Choice], chat: bool, num_prompt_tokens: int,
                    details: bool = False) -> dict:
        body_choices = []
        for c in choices:
            done = c.output.outputs[0]
            if done.finish_reason == "error":
                raise ApiError(500, f"generation failed: {done.error}", "server_error")
            text, logprobs = _next_piece(c, c.output, chat, self._token_bytes)
            calls = _calls(c, done)
            ids = {}  # return_token_ids: the answer's ids; a completion's prompt ids too (chat's: beside the choices)
            if c.return_ids:
                ids = {"token_ids": c.new_ids(done)} if chat else \
                    {"prompt_token_ids": c.take_prompt_ids(), "token_ids": c.new_ids(done)}
            if c.parsed:  # the thought, the calls the model chose to make, and the content, out of its text
                reasoning, content, found = parse_answer(text, c.reasoning, c.tool_parser)
                message = {"role": c.role, "content": content}
                if reasoning is not None and c.include_reasoning:
                    message["reasoning_content"] = reasoning
                if found:
                    message["tool_calls"] = found
                body_choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                                     "finish_reason": "tool_calls" if found else done.finish_reason, **ids})
            elif calls is not None:  # a forced call: its JSON becomes tool_calls, the content stays empty
                body_choices.append({"index": c.index, "message": {"role": c.role, "content": None,
                                     "tool_calls": calls}, "logprobs": logprobs,
                                     "finish_reason": "tool_calls" if c.tool[0] == "required" else "stop", **ids})
            elif chat:
                body_choices.append({"index": c.index, "message": {"role": c.role, "content": text},
                                     "logprobs": logprobs, "finish_reason": done.finish_reason, **ids})
            else:
                body_choices.append({"index": c.index, "text": text, "logprobs": logprobs,
                                     "finish_reason": _finish_reason(c, done.finish_reason), **ids})
        body = {**head, "object": "chat.completion" if chat else "text_completion", "choices": body_choices,
                "usage": _usage(num_prompt_tokens, choices, details)}
        if chat and choices and choices[0].return_ids:  # one prompt: its ids once, beside the choices
            body["prompt_token_ids"] = choices[0].take_prompt_ids()
        return body

    async def _sse(self, head: dict, choices: list[_Choice], streams: list[AsyncIterator[RequestOutput]],
                   chat: bool, include_usage: bool, num_prompt_tokens: int,
                   details: bool = False, continuous_usage: bool = False) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        role = choices[0].role if choices else "assistant"
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, text: str | None, finish_reason: str | None, first: bool = False,
                  logprobs: dict | None = None, calls: list[dict] | None = None, first_call: int = 0,
                  reasoning: str | None = None, token_ids: list[int] | None = None,
                  prompt_token_ids: list[int] | None = None) -> str:
            if calls is not None:  # tool calls, each whole (numbered from first_call within the choice)
                delta = {"tool_calls": [{"index": first_call + k, **call} for k, call in enumerate(calls)]}
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            elif reasoning is not None:  # a piece of the thought (serve/reasoning.py)
                choice = {"index": index, "delta": {"reasoning_content": reasoning}, "logprobs": logprobs,
                          "finish_reason": finish_reason}
            elif chat:
                delta = {"role": role, "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            else:
                choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
            top = {}  # return_token_ids: the prompt's ids on a choice's first event (chat: beside the choices)
            if prompt_token_ids is not None:
                (top if chat else choice)["prompt_token_ids"] = prompt_token_ids
            if token_ids is not None:
                choice["token_ids"] = token_ids
            if continuous_usage:  # this choice's usage until this chunk (vLLM's continuous_usage_stats)
                c = choices[index]
                top["usage"] = _usage(c.num_prompt_tokens, [c], details)
            return _event({**head, "object": obj, "choices": [choice], **extra, **top})

        if chat:
            for c in choices:
                yield chunk(c.index, None, None, first=True, prompt_token_ids=c.take_prompt_ids())
        try:
            async for i, out in _merge(streams):
                c, done = choices[i], out.outputs[0]
                c.output = out
                if done.finish_reason == "error":
                    yield _event(error_body(f"generation failed: {done.error}", "server_error", code=500))
                    break
                # one event per step that added text (a token may end mid-character and add none: its log-prob
                # waits for the next event); the last one carries the finish_reason. An echoed prompt goes once
                # it is scored whole: a chunked prefill reports after every chunk, with that chunk's log-probs only
                echo_ready = c.echo is not None and (bool(done.token_ids) or out.finished)
                if c.parsed:  # the thought, the content, each call once it is whole
                    for event in _parsed_chunks(c, out, chunk, self._token_bytes):
                        yield event
                    continue
                if c.tool is not None:  # a forced tool call streams as one tool_calls delta once it is complete
                    calls = _calls(c, done) if out.finished else None
                    if calls is not None:
                        yield chunk(c.index, None, "tool_calls" if c.tool[0] == "required" else "stop",
                                    calls=calls, token_ids=c.new_ids(done))
                        continue
                    if not out.finished:
                        continue
                if len(done.text) > c.sent or out.finished or echo_ready:
                    new_text, logprobs = _next_piece(c, out, chat, self._token_bytes)
                    yield chunk(c.index, new_text or (None if chat else ""),
                                _finish_reason(c, done.finish_reason), logprobs=logprobs,
                                token_ids=c.new_ids(done), prompt_token_ids=c.take_prompt_ids())
            else:
                if include_usage:
                    yield _event({**head, "object": obj, "choices": [],
                                  "usage": _usage(num_prompt_tokens, choices, details)})
        except (EngineDeadError, EngineSleepingError) as err:
            yield _event(error_body(str(err), "service_unavailable", code=503))
        except Exception as err:  # the headers are sent: the error can only travel as an event
            logger.exception("stream %s failed", head["id"])
            yield _event(error_body(f"generation failed: {type(err).__name__}: {err}", "server_error", code=500))
        yield "data: [DONE]\n\n"


def _parsed_chunks(choice: _Choice, out: RequestOutput, chunk: Callable[..., str],
                   token_bytes: Callable[[int], bytes] | None) -> list[str]:
    """The events of a parsed answer's new output (answer_parser.py): the thought as reasoning_content deltas
    (none with include_reasoning false), the rest as content deltas, each call as a tool_calls delta once whole;
    text that may be a marker's start is held back. The log-probs ride on the last event, and the answer's last
    event carries the finish_reason ("tool_calls" if it made a call)."""
    done = out.outputs[0]
    if len(done.text) <= choice.sent and not out.finished:
        return []
    choice.parser = choice.parser or AnswerParser(choice.reasoning, choice.tool_parser)
    new_text, logprobs = _next_piece(choice, out, True, token_bytes)
    events = choice.parser.feed(new_text) + (choice.parser.finish() if out.finished else [])
    pieces = []  # chunk() keyword arguments, one event each
    for kind, value in events:
        if kind == "call":
            pieces.append(dict(calls=[value[1]], first_call=value[0]))
        elif kind == "reasoning":
            if choice.include_reasoning:
                pieces.append(dict(reasoning=value))
        else:
            pieces.append(dict(text=value))
    if out.finished or logprobs is not None:  # the finish_reason, or log-probs of text still held back
        pieces.append({})
    reason = ("tool_calls" if choice.parser.num_calls else done.finish_reason) if out.finished else None
    last = len(pieces) - 1
    ids = choice.new_ids(done) if pieces else None  # return_token_ids: all the new output's, on the last event
    return [chunk(choice.index, piece.pop("text", None), reason if k == last else None,
                  logprobs=logprobs if k == last else None, token_ids=ids if k == last else None, **piece)
            for k, piece in enumerate(pieces)]


def _next_piece(choice: _Choice, out: RequestOutput, chat: bool,
                token_bytes: Callable[[int], bytes] | None = None) -> tuple[str, dict | None]:
    """The choice's text not sent yet, and the OpenAI logprobs object of its tokens (None when none were asked
    for). An echoed prompt comes once, in front of the first piece, with the prompt's log-probabilities."""
    done = out.outputs[0]
    text, choice.sent = done.text[choice.sent:], len(done.text)
    new = None if done.logprobs is None else done.logprobs[choice.sent_tokens:]
    if choice.score_only:  # the one token generated to get the prompt scored is not part of the answer
        text, new = "", None if new is None else []
    if choice.echo is not None:
        (prompt, first_token), choice.echo = choice.echo, None
        text = prompt + text
        if new is not None and not chat:  # nothing predicts the first prompt token: its log-prob is null (as OpenAI's)
            first = {out.prompt_token_ids[0]: Logprob(None, None, first_token)}
            new = [first, *(out.prompt_logprobs or [None])[1:], *new]
    if new is None:
        return text, None
    choice.sent_tokens = len(done.logprobs)
    if chat:
        return text, chat_logprobs(new, choice.num_top, token_bytes, choice.as_ids)
    body, choice.text_offset = completion_logprobs(new, choice.text_offset, choice.as_ids)
    return text, body


def _calls(choice: _Choice, done: Any) -> list[dict] | None:
    """A forced tool call's tool_calls once its output is complete (an answer cut by max_tokens stays text)."""
    if choice.tool is None or done.finish_reason != "stop":
        return None
    return tool_calls(done.text, choice.tool)


def _finish_reason(choice: _Choice, reason: str | None) -> str | None:
    """A scored prompt (max_tokens 0) ends by length, whatever became of the token generated to score it."""
    return "length" if choice.score_only and reason is not None else reason


def _usage(num_prompt_tokens: int, choices: list[_Choice], details: bool = False) -> dict[str, Any]:
    """The usage object; `details`: with prompt_tokens_details.cached_tokens, the prompt tokens each prompt's first
    choice found in the prefix cache (OpenAI's field; vLLM's --enable-prompt-tokens-details)."""
    completion = sum(len(c.output.outputs[0].token_ids) for c in choices if c.output is not None and not c.score_only)
    usage: dict[str, Any] = {"prompt_tokens": num_prompt_tokens, "completion_tokens": completion,
                             "total_tokens": num_prompt_tokens + completion}
    if details:
        first = {}
        for c in choices:
            first.setdefault(c.prompt_index, c)
        usage["prompt_tokens_details"] = {"cached_tokens": sum(c.output.num_cached_tokens for c in first.values()
                                                               if c.output is not None)}
    return usage