"""The OpenAI request bodies the server accepts, and OpenAI-shaped errors (chapter 10).

Pydantic checks the *types* of a body, strictly (a string, a float or a bool where an integer belongs is a 400
naming the field and the value: `"max_tokens": true` is not 1, `"stream": "yes"` is not true); the *ranges*
(temperature >= 0, top_p in (0, 1], ...) are SamplingParams' to check, and come back as 400s with its message
and the field as `param`. Fields the OpenAI API (or vLLM's extensions) define but minillm cannot honour are refused
with a 400 that says so, unless they hold their no-op value: a client that asked for them must not get a silent
default. They are suffix, best_of (but = n), functions, tool_choice "auto" with tools on a server without a
tool-call parser (serve/tool_parser.py), and each class's `REFUSED` table: logits_processors,
mm_processor_kwargs, kv_transfer_params, vllm_xargs, and on chat reasoning_effort,
include_reasoning=false (but on a server with --reasoning-parser), audio, modalities, prediction, function_call, web_search_options, verbosity, store and service_tier. A few change
nothing here and are served whatever they hold: chat's parallel_tool_calls, metadata, prompt_cache_key and
safety_identifier (no stored completions).
vLLM's extensions minillm honours: top_k, min_p, the penalties, min_tokens, stop_token_ids, ignore_eos,
include_stop_str_in_output, skip_special_tokens (false: special tokens' text such as "<|im_start|>" stays in the
answer, its stream and its log-probs; the stop token that ends it, "<|im_end|>", with include_stop_str_in_output),
spaces_between_special_tokens (passed on; with minillm's tokenizers either value gives the same text:
Tokenizer.decode says why), prompt_logprobs (not with stream), priority (a server started
with --scheduling-policy priority; elsewhere only 0), truncate_prompt_tokens, cache_salt (a non-empty string:
prefix-cache blocks shared only with requests of the same salt), prompt_embeds on completions (a server with
--enable-prompt-embeds; serve/embeds_field.py), request_id (the response's id),
return_tokens_as_token_ids, return_token_ids, completions' add_special_tokens, bad_words, allowed_token_ids, structured outputs
(structured_outputs, guided_json, guided_regex, guided_choice, guided_grammar, structural_tag,
guided_whitespace_pattern, and response_format
json_object / json_schema: minillm/serve/structured_fields.py), tools with a named or required tool_choice
(serve/tool_calls.py), beam search (use_beam_search with n beams, length_penalty: serve/beam_fields.py), and chat's
template fields (add_generation_prompt,
continue_final_message, echo, add_special_tokens, chat_template_kwargs, documents, and chat_template on a server
that trusts request templates: minillm/serve/chat_prompt.py).
Log-probabilities map onto SamplingParams.logprobs through `num_logprobs()`: completions' `logprobs` (an int, the
top-k), chat's `logprobs` (a bool) with `top_logprobs` (an int); completions' `echo` with `logprobs` also asks for
the prompt's (`num_prompt_logprobs()`).
Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working; `null` for an optional
field means its default, as OpenAI's spec marks them nullable (`"temperature": null` is what many clients send for
"not set").
"""
from __future__ import annotations

import json

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from minillm.loader.chat_template import template_tool_call
from minillm.sampling_params import MAX_N  # choices per prompt, as SamplingParams.n allows
from minillm.serve.beam_fields import beam_problem
from minillm.serve.tool_calls import check_tools

# engine requests one HTTP request may start (prompts x n): 20,000 prompts x 16 would queue 320,000 requests ahead
# of every other client's (a small request sent a second later had no answer after 10 minutes)
MAX_CHOICES = 256
# stop strings per request: the engine checks each one after every token, so 80,000 of them (a 1 MiB body) made a
# 40-token request take 4 s and slowed every request beside it as much (OpenAI allows 4)
MAX_STOP = 16
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's message roles


class ApiError(Exception):
    """An error the client caused (or may retry), turned into {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape: what the openai client parses into APIStatusError.message."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False  # a last chunk with the request's usage (OpenAI's)
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk its choice's usage so far


class _SamplingFields(BaseModel):
    """What completions and chat share: the sampling knobs and the streaming switch."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None  # None: the one model this server serves
    max_tokens: int | None = None
    # the sampling knobs: None (left out, or null) takes the model's generation config, else SamplingParams' default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: benchmarks use it to fix the output length
    user: str | None = None
    # logits processors (OpenAI's penalties and logit_bias, vLLM's extensions): SamplingParams checks the ranges
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # JSON keys are strings: {"50256": -100}
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False  # vLLM's extension: keep the stop string that ended the text
    best_of: int | None = None  # only = n: one sample per choice
    # vLLM's extensions, honoured: see openai_api.py and chat_prompt.py
    priority: int = 0  # lower runs first; anything but 0 needs `minillm serve --scheduling-policy priority`
    request_id: str | None = None  # the response's id (cmpl-<request_id>); None: a random one
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (k >= 1)
    prompt_logprobs: int | None = None  # the prompt tokens' log-probabilities and the top k (not with stream)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>" instead of their text
    return_token_ids: bool = False  # the prompt's and the answer's token ids beside the text (openai_api.py)
    skip_special_tokens: bool = True  # false: special tokens' text stays in the answer (SamplingParams')
    spaces_between_special_tokens: bool = True  # passed on; changes nothing with minillm's tokenizers
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    # structured outputs (one of these, or response_format: serve/structured_fields.py reads them)
    structured_outputs: dict[str, Any] | None = None  # vLLM's {"json": ..., "regex": ..., "choice": [...], ...}
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # a GBNF grammar (minillm/structured/grammar.py)
    structural_tag: str | dict[str, Any] | None = None  # XGrammar's (minillm/structured/structural_tag.py)
    guided_whitespace_pattern: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: minillm has one backend
    use_beam_search: bool = False  # n beams, the best n come back (serve/beam_fields.py)
    length_penalty: float = 1.0  # beam search's final ranking
    # vLLM's extensions minillm does not implement: refused unless null or their no-op value (REFUSED)
    logits_processors: Any = None
    mm_processor_kwargs: Any = None
    kv_transfer_params: Any = None
    vllm_xargs: Any = None
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks shared only with requests of the same salt

    # field -> (its no-op values, what it asks for): any other value is a 400 (`null` is the default, a no-op)
    REFUSED: ClassVar[dict[str, tuple[tuple, str]]] = {
        "logits_processors": (([],), "custom logits processors"),
        "mm_processor_kwargs": (({},), "multimodal input"),
        "kv_transfer_params": (({},), "disaggregated serving through the HTTP server"),
        "vllm_xargs": (({},), "custom extension arguments"),
    }

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """Drop `null` for the optional fields (before the strict type checks), so they take their defaults."""
        if not isinstance(data, dict):
            return data  # not an object: the type check says so
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first requested feature minillm does not implement or a count out of range;
        None if all is well."""
        problem = beam_problem(self)
        if problem is not None:
            return problem
        for name, (no_ops, what) in self.REFUSED.items():
            value = getattr(self, name)
            if value is not None and not any(type(value) is type(ok) and value == ok for ok in no_ops):
                allowed = f" or give {' or '.join(json.dumps(ok) for ok in no_ops)}" if no_ops else ""
                return name, f"{name} is not supported ({what}): leave it out{allowed}, got {json.dumps(value)[:100]}"
        if self.cache_salt is not None and not self.cache_salt:
            return "cache_salt", "cache_salt must be a non-empty string if given, got \"\""
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", (f"best_of is not supported (leave it out, or give best_of = n = {self.n}), "
                               f"got {self.best_of}")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            return "truncate_prompt_tokens", (f"truncate_prompt_tokens must be an integer >= 1 (keep the prompt's "
                                              f"last k tokens), got {self.truncate_prompt_tokens}")
        if self.prompt_logprobs is not None and self.stream:
            return "prompt_logprobs", "prompt_logprobs is not available with stream=true (as in vLLM)"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream=true"
        if not 1 <= self.n <= MAX_N:
            return "n", f"n must be an integer in [1, {MAX_N}], got {self.n}"
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            return "stop", f"stop must hold at most {MAX_STOP} strings, got {len(self.stop)}"
        return None

    def num_logprobs(self) -> int | None:
        """SamplingParams.logprobs for this request: None when log-probabilities were not asked for."""
        return None

    def num_prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs: vLLM's prompt_logprobs (and, on completions, an echoed prompt's)."""
        return self.prompt_logprobs

    def api_name(self, field: str) -> str:
        """This request's name for a SamplingParams field (where a bad value came from, for the error's param)."""
        return field


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's extension: the tokenizer's BOS (and EOS) around a text prompt
    # vLLM's extension (a server with --enable-prompt-embeds): base64 of torch.save(tensor [n, hidden]), or a list
    prompt_embeds: str | list[str] | None = None
    response_format: dict[str, Any] | None = None  # vLLM's extension on completions, as chat's

    REFUSED: ClassVar[dict[str, tuple[tuple, str]]] = _SamplingFields.REFUSED

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts as a list: one string or one list of token ids is a single prompt."""
        if self.prompt is None:
            return []
        one = isinstance(self.prompt, str) or (self.prompt and all(isinstance(t, int) for t in self.prompt))
        return [self.prompt] if one else list(self.prompt)

    def embeds(self) -> list[str]:
        """The base64 tensors of prompt_embeds as a list (serve/embeds_field.py)."""
        return [] if self.prompt_embeds is None else [self.prompt_embeds] if isinstance(self.prompt_embeds, str) \
            else list(self.prompt_embeds)

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.prompt is None and self.prompt_embeds is None:
            return "prompt", "prompt is required (or prompt_embeds, on a server with --enable-prompt-embeds)"
        if self.prompt_embeds is not None and (self.echo or self.use_beam_search):
            name = "echo" if self.echo else "use_beam_search"
            return name, f"{name} is not supported with prompt_embeds (the prompt has no tokens to echo or extend)"
        problem = super().unsupported()
        prompts = len(self.prompts()) + len(self.embeds())
        if problem is None and prompts * self.n > MAX_CHOICES:
            return "prompt", (f"{prompts} prompt(s) x n={self.n} = {prompts * self.n} completions in one request; "
                              f"at most {MAX_CHOICES}: send several requests")
        return problem


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal[CHAT_ROLES]  # a 400 naming the value and the roles allowed
    content: str | list[ContentPart] | None = None
    # a tool-calling conversation's turns: the assistant's calls, and a tool's answer to one of them (with its name)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def template_fields(self) -> dict[str, Any]:
        """This message as a chat template reads it: role and content, and the tool-calling fields it has (a
        call's arguments as a mapping, parsed from OpenAI's JSON string, as templates for tool use expect)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [template_tool_call(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

    def text(self) -> str:
        """The content as one string: text parts joined by newlines, as vLLM joins them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema (structured_fields.py)
    # tool calling (serve/tool_calls.py): a named function or "required" as structured output; "none"; "auto"
    # where the server has a tool-call parser (serve/tool_parser.py)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    _tool_parser: str | None = PrivateAttr(default=None)  # the server's, set by OpenAIServing (not by the client)
    _reasoning_parser: str | None = PrivateAttr(default=None)  # likewise: --reasoning-parser (serve/reasoning.py)
    # the usage's prompt_tokens_details whatever the server's flag: a /v1/responses request (serve/responses.py),
    # whose usage always has input_tokens_details.cached_tokens
    _usage_details: bool = PrivateAttr(default=False)
    functions: list[Any] | None = None  # OpenAI's older function calling: refused
    # vLLM's chat extensions, honoured (minillm/serve/chat_prompt.py renders them)
    add_generation_prompt: bool = True  # open the assistant's turn after the messages
    continue_final_message: bool = False  # leave the last message open: the model continues it
    add_special_tokens: bool = False  # the tokenizer's BOS on top of what the template writes
    echo: bool = False  # the answer starts with the last message's content when it has the answer's role
    documents: list[dict[str, str]] | None = None  # for templates that render retrieved documents
    chat_template: str | None = None  # this request's Jinja template instead of the model's
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the template
    # OpenAI's and vLLM's chat fields minillm does not implement: refused unless null or their no-op value
    reasoning_effort: Any = None
    include_reasoning: bool = True  # false: leave the thought out (needs the server's --reasoning-parser)
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    function_call: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    store: Any = None
    service_tier: Any = None
    # metadata, parallel_tool_calls, prompt_cache_key, safety_identifier: no effect on the answer here, ignored

    REFUSED: ClassVar[dict[str, tuple[tuple, str]]] = {
        **_SamplingFields.REFUSED,
        "reasoning_effort": ((), "reasoning models"),
        "audio": ((), "audio output"),
        "modalities": ((["text"],), "output other than text"),
        "prediction": ((), "predicted outputs"),
        "function_call": (("none", "auto"), "function calling"),
        "web_search_options": ((), "web search"),
        "verbosity": (("medium",), "a verbosity setting"),
        "store": ((False,), "stored completions"),
        "service_tier": (("auto", "default"), "service tiers"),
    }

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def reasoning_parser(self) -> str | None:
        """The server's --reasoning-parser (None: answers are not split into reasoning and content)."""
        return self._reasoning_parser

    @property
    def tool_parser(self) -> str | None:
        """The server's --tool-call-parser, which tool_choice "auto" needs (None: the server has none)."""
        return self._tool_parser

    def api_name(self, field: str) -> str:
        if field == "logprobs":
            return "top_logprobs"
        if field == "max_tokens" and self.max_completion_tokens is not None:
            return "max_completion_tokens"
        return field

    def unsupported(self) -> tuple[str, str] | None:
        if self.add_generation_prompt and self.continue_final_message:
            return "continue_final_message", ("continue_final_message=true continues the last message, "
                                              "add_generation_prompt=true opens a new one: set "
                                              "add_generation_prompt=false with it")
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs is only allowed with logprobs=true"
        if self.functions:
            return "functions", "functions (OpenAI's older function calling) is not supported: give tools"
        if not self.include_reasoning and self._reasoning_parser is None:
            return "include_reasoning", ("include_reasoning=false needs a server that separates reasoning from "
                                         "content (started with --reasoning-parser deepseek_r1 or qwen3)")
        problem = check_tools(self.tools, self.tool_choice, self.tool_parser)
        if problem is not None:
            return ("tool_choice" if problem.startswith("tool_choice") else "tools"), problem
        return super().unsupported()



class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's body; serving_models.py). vLLM's newer load_inplace (new weights under a
    name already served) is refused when true: unload the name, then load it."""
    model_config = ConfigDict(extra="ignore", strict=True)

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter: the adapter's name (vLLM's lora_int_id is accepted and, as there, unused)."""
    model_config = ConfigDict(extra="ignore", strict=True)

    lora_name: str
    lora_int_id: int | None = None

# Fields that accept several shapes: pydantic reports one error per shape it tried ("prompt.str",
# "prompt.list[int].0", ...), so the message says what the field accepts instead of the first shape's complaint.
FIELD_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": 'a string, null or a list of {"type": "text", "text": ...} parts',
}


def json_type(value: Any) -> str:
    """JSON's name for a decoded value's type (what a client wrote), for error messages."""
    for kind, name in ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "array"),
                       (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def validation_message(errors: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(param, message) for pydantic's errors about a decoded JSON body: the first bad field, what it accepts and
    what it got."""
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    value = first.get("input")
    if not loc:
        return None, f"the request body must be a JSON object, got {json_type(value)}"
    for depth, name in enumerate(loc[:-1]):
        if name in FIELD_SHAPES:  # the next entry names the shape pydantic tried
            where = ".".join(loc[:depth + 1])
            got = f", got {json_type(value)}: {value!r:.100}" if len(loc) == depth + 2 else ""
            return where, f"{where}: expected {FIELD_SHAPES[name]}{got}"
    where = ".".join(loc)
    if first.get("type") == "missing":
        return where, f"{where}: field required"
    return where, f"{where}: {first.get('msg', 'invalid value')}, got {json_type(value)}: {value!r:.100}"
