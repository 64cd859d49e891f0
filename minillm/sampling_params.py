"""SamplingParams: how to pick each next token and when to stop (vLLM's names and defaults).

Validated on construction: every bad value raises ValueError (a ParamError, whose `param` names the field) with
the value and the allowed range, before the request reaches the engine. That includes the values a type check
alone lets through: nan and inf (a nan temperature turns every probability into nan and the sampler then returns
token 0 forever), bools where a number is meant (True is an int to Python, not to us), and integers too large for
the int64 tensors the sampler builds. The sampler that honours these is minillm.layers.sampler (chapter 1).
Fields are plain attributes, so a value assigned after construction (p.seed = 2**70) is checked by no constructor:
every entry point that queues a request (LLMEngine.add_request, LLM.generate/chat/generate_stream, AsyncLLM.generate)
takes a `checked_copy()`, which refuses it there, and keeps the queued request safe from later assignments too.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

INT64_MAX = 2**63 - 1
# top-k log-probabilities per token an engine returns by default (EngineConfig.max_logprobs; OpenAI's top_logprobs
# limit, vLLM's default); a request may ask for more from an engine started with a larger max_logprobs
MAX_LOGPROBS = 20
# Below this a temperature divides logits into values that overflow fp16/bf16 (inf - inf = nan in the softmax);
# as vLLM does, smaller positive temperatures are raised to it with a warning (0 itself means greedy).
MIN_TEMPERATURE = 1e-2
# The sampler divides the logits by the temperature in float32: a larger one would be inf there (a warning in the
# middle of a step; an error for every request in it where warnings are errors)
MAX_TEMPERATURE = 3.4028234663852886e38  # torch.finfo(torch.float32).max
OUTPUT_KINDS = ("cumulative", "final_only")
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range, vLLM's check)
MAX_LOGIT_BIAS = 100.0  # a logit bias lies in [-100, 100] (OpenAI's range: -100 bans a token, 100 forces it)
MAX_LOGIT_BIAS_ENTRIES = 300  # tokens one request may bias (OpenAI's limit): each is a scatter on the device


class ParamError(ValueError):
    """A bad value for one field; `param` names the field (a server's OpenAI error carries it as "param")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _number(name: str, value: Any, allowed: str) -> float:
    """A finite real number as a float (numpy scalars are welcome; bools, strings, nan and inf are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParamError(name, f"{name} must be a number {allowed}, got {type(value).__name__}: {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range (10**400); int(value): numpy integers have no bit_length
        raise ParamError(name, f"{name} must be a finite number {allowed}, got an integer of {int(value).bit_length()} "
                               f"bits, beyond a float's range") from None
    if not math.isfinite(value):
        raise ParamError(name, f"{name} must be a finite number {allowed}, got {value!r}")
    return value


def _integer(name: str, value: Any, low: int, high: int = INT64_MAX, allowed: str | None = None) -> int:
    """An integer in [low, high] as an int (numpy integers are welcome; bools and 2.0 are not)."""
    allowed = allowed or f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParamError(name, f"{name} must be an integer {allowed}, got {type(value).__name__}: {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ParamError(name, f"{name} must be an integer {allowed}, got {value!r}")
    return value


MAX_BAD_WORDS = 100  # bad_words entries per request: each is matched against the output at every step
MAX_ALLOWED_TOKEN_IDS = 1 << 20  # allowed_token_ids entries (a vocabulary is smaller: the engine checks it)
STRUCTURED_KINDS = ("json", "regex", "choice", "json_object", "grammar", "structural_tag")


@dataclass
class StructuredOutputsParams:
    """vLLM's structured outputs: the output must match one constraint, enforced token by token (minillm/structured:
    the constraint becomes a byte-level automaton; each step masks every token that would leave it).

    Exactly one of: `json`, a JSON schema (a dict, or its JSON text); `regex`, a pattern the whole output must match
    (Python's syntax, a subset: minillm.structured.regex_dfa); `choice`, a list of strings, one of which is the
    output; `json_object=True`, any JSON value; `grammar`, a context-free grammar in GBNF, llama.cpp's and
    xgrammar's EBNF (minillm.structured.grammar). The last two run on a pushdown automaton, so they nest without
    limit (a regular language cannot count brackets: a `json` schema whose $ref recurses, or that holds values of
    any shape, runs on one too: minillm.structured.json_grammar); `structural_tag`,
    XGrammar's formats that switch constrained parts on inside free text (a dict, or its JSON text:
    minillm.structured.structural_tag). `whitespace_pattern` is the regex
    allowed between JSON tokens (default: at most two spaces, newlines or tabs); `disable_any_whitespace=True`
    allows none."""

    json: dict | str | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None
    grammar: str | None = None
    structural_tag: str | dict | None = None
    whitespace_pattern: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            kinds = ", ".join(STRUCTURED_KINDS)
            raise ParamError("structured_outputs", f"structured_outputs takes exactly one of {kinds}; got "
                                                   f"{', '.join(given) if given else 'none'}")
        kind = given[0]
        if kind == "structural_tag" and not isinstance(self.structural_tag, (str, dict)):
            raise ParamError("structured_outputs", f"structured_outputs structural_tag must be a JSON object or its "
                                                   f"text, got {type(self.structural_tag).__name__}")
        if kind == "grammar" and not isinstance(self.grammar, str):
            raise ParamError("structured_outputs", f"structured_outputs grammar must be a GBNF grammar's text (a "
                                                   f"string), got {type(self.grammar).__name__}")
        if kind == "json" and not isinstance(self.json, (dict, str, bool)):
            raise ParamError("structured_outputs", f"structured_outputs json must be a JSON schema (a dict or its "
                                                   f"JSON text), got {type(self.json).__name__}: {self.json!r}")
        if kind == "regex" and not isinstance(self.regex, str):
            raise ParamError("structured_outputs", f"structured_outputs regex must be a string, got {self.regex!r}")
        if kind == "choice" and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                 or any(not isinstance(c, str) for c in self.choice)):
            raise ParamError("structured_outputs", f"structured_outputs choice must be a non-empty list of strings, "
                                                   f"got {self.choice!r}")
        if self.json_object not in (None, True, False):
            raise ParamError("structured_outputs", f"structured_outputs json_object must be a bool, got "
                                                   f"{self.json_object!r}")
        if self.whitespace_pattern is not None and not isinstance(self.whitespace_pattern, str):
            raise ParamError("structured_outputs", f"structured_outputs whitespace_pattern must be a regex string, "
                                                   f"got {self.whitespace_pattern!r}")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ParamError("structured_outputs", f"structured_outputs disable_any_whitespace must be a bool, got "
                                                   f"{self.disable_any_whitespace!r}")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))


MAX_N = 16  # choices per prompt (SamplingParams.n, the server's n): each is a full request in the engine


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a seeded request with n choices: seed + index, wrapped round at the top of the
    range a seed may take ([-2**63, 2**64 - 1]), so that a valid seed never makes its later choices invalid."""
    return seed + index - 2**64 if seed < 2**64 <= seed + index else seed + index  # (an invalid seed stays invalid)


def _short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters (a bad list of a million ids must not make a million-digit message)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_seed(value: Any, name: str = "seed") -> int:
    """A random seed as an int: the range torch.Generator.manual_seed accepts (a request's seed, an engine's)."""
    return _integer(name, value, -2**63, 2**64 - 1, allowed="in [-2**63, 2**64 - 1]")


@dataclass
class SamplingParams:
    n: int = 1  # completions of the prompt (vLLM's parallel sampling), in [1, MAX_N]: LLM.generate / chat
    temperature: float = 1.0  # 0 means greedy (argmax), exactly; else in [0.01, inf)
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p; in (0, 1]
    top_k: int = -1  # keep the k most likely tokens; -1 means all
    max_tokens: int | None = 16  # new tokens to generate at most, >= 1; None: until the context (max_model_len)
    # ends, as vLLM's None (the engine sets it to max_model_len - the prompt's length when the request comes in)
    # per-request generator: same tokens whatever else is in the batch. Under speculative decoding with sampled
    # drafts (draft model, self-speculative, Medusa, EAGLE, MTP) the draws also follow how many drafts each step
    # verified, which the scheduler trims to the step's token budget and free blocks. The same run reproduces;
    # another batch composition, whose verify steps begin elsewhere, gives other (equally distributed) tokens.
    seed: int | None = None
    stop: list[str] | str | None = None  # stop strings (cut out of the output text, unless the flag at the end)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # lower runs first under scheduling_policy="priority". minillm's field: vLLM takes a request's priority beside
    # its SamplingParams (LLM.generate(priority=[...]), which here replaces this field; the server's `priority`)
    priority: int = 0
    # log-probabilities (vLLM's names): of each generated token plus the `logprobs` most likely ones, and of
    # each prompt token after the first plus the `prompt_logprobs` most likely ones; None: not computed; -1: every
    # token of the vocabulary. The engine refuses more than its max_logprobs (EngineConfig; 20 by default).
    # They are log-softmax of the *raw* logits (temperature 1, no top-k/top-p), as vLLM returns by default.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # what the engine's step() returns for this request (vLLM's RequestOutputKind): "cumulative", a snapshot of
    # everything generated so far after every step it took part in (streaming, the server); "final_only", one
    # output when it finishes. LLM.generate asks for final_only: at 256 running requests the per-step snapshots
    # (copies of every prompt and output) were half of the engine's host time per step.
    output_kind: str = "cumulative"
    # Logits processors (vLLM's names; minillm/layers/logits_processors.py, chapter 1), applied before the
    # temperature and so to greedy rows too. Penalties on what the sequence holds already: presence subtracts a
    # constant from every token generated so far, frequency subtracts it once per occurrence (both over the
    # generated tokens only, in [-2, 2]); repetition (> 0; 1 = off) divides a positive logit, multiplies a negative
    # one, of every token in the prompt or the output (CTRL's rule). logit_bias adds {token id: bias in [-100, 100]}.
    # min_tokens bans EOS and stop_token_ids (and holds back stop strings) until that many tokens are out.
    # min_p, after the temperature: drops tokens less likely than min_p times the most likely one, in [0, 1].
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    min_p: float = 0.0
    # vLLM's include_stop_str_in_output: end the text *after* the stop string that stopped it, not before (and
    # after a stop token's text: EOS or a stop_token_ids entry, as vLLM). No text then needs holding back while
    # streaming: nothing already shown can be cut (see StepOutputs._output).
    include_stop_str_in_output: bool = False
    # vLLM's detokenization switches. skip_special_tokens=False keeps special tokens' text (e.g. "<|im_start|>")
    # in the output text, the streamed deltas and the log-prob token texts; stop strings are then matched in that
    # text too. The stop token that ends a request (EOS, "<|im_end|>") adds its text only with
    # include_stop_str_in_output, as in vLLM. spaces_between_special_tokens is accepted for
    # vLLM's API; with minillm's tokenizers it changes nothing (Tokenizer.decode says why).
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # vLLM's detokenize: False leaves the output text empty (token ids only; log-prob tokens' decoded_token None),
    # which saves the detokenizer's work per token (benchmarks, RL rollouts that read the ids). Stop strings are
    # matched in the text, so they need it on.
    detokenize: bool = True
    # Constraints on what may be generated (vLLM's names; minillm/engine/constraints.py). structured_outputs: the
    # output must match a JSON schema, a regex or one of a list of strings (StructuredOutputsParams; a dict of its
    # fields is taken too). allowed_token_ids: only these tokens may be sampled. bad_words: none of these words may
    # be generated (each as the tokenizer writes it, with and without a leading space: the last token of a bad word
    # is banned where the output ends with the rest of it).
    structured_outputs: StructuredOutputsParams | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # vLLM's: keep only the prompt's last k tokens (k >= 1; -1: max_model_len), the start of a too-long document
    # dropped instead of the request refused. The prompt's text is then None in the output (it is not the text)
    truncate_prompt_tokens: int | None = None
    stop_list: list[str] = field(init=False, repr=False)
    # whether any of the processors above is on (checked on the host every step: off costs nothing)
    processes_logits: bool = field(init=False, repr=False)
    penalizes: bool = field(init=False, repr=False)  # ... one of the three penalties: needs the token history

    def __post_init__(self) -> None:
        self.temperature = _number("temperature", self.temperature, ">= 0 (0 = greedy)")
        if self.temperature < 0:
            raise ParamError("temperature", f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.temperature > MAX_TEMPERATURE:
            raise ParamError("temperature", f"temperature must be at most {MAX_TEMPERATURE:.6g} (float32's largest), "
                                            f"got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            warnings.warn(f"temperature={self.temperature!r} is below {MIN_TEMPERATURE} and would overflow the "
                          f"scaled logits; using {MIN_TEMPERATURE} (pass 0 for greedy)", stacklevel=3)
            self.temperature = MIN_TEMPERATURE
        self.top_p = _number("top_p", self.top_p, "in (0, 1]")
        if not 0 < self.top_p <= 1:
            raise ParamError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        self.top_k = _integer("top_k", self.top_k, -1, allowed=f"-1 (disabled) or in [1, {INT64_MAX}]")
        if self.top_k == 0:
            raise ParamError("top_k", f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens, 1,
                                       allowed=f">= 1 (at most {INT64_MAX}), or None (until the context ends)")
        self.n = _integer("n", self.n, 1, MAX_N, allowed=f"in [1, {MAX_N}]")
        if self.seed is not None:
            self.seed = check_seed(self.seed)
        self.priority = _integer("priority", self.priority, -INT64_MAX - 1)
        if self.truncate_prompt_tokens is not None:
            self.truncate_prompt_tokens = _integer("truncate_prompt_tokens", self.truncate_prompt_tokens, -1,
                                                   allowed=">= 1, -1 (max_model_len) or None")
            if self.truncate_prompt_tokens == 0:
                raise ParamError("truncate_prompt_tokens", "truncate_prompt_tokens must be an integer >= 1, -1 "
                                                           "(max_model_len) or None, got 0")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens",
                     "spaces_between_special_tokens", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"{name} must be a bool, got {type(getattr(self, name)).__name__}: "
                                       f"{getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _integer(name, getattr(self, name), -1, allowed=">= 0 (at most the engine's "
                                             "max_logprobs), -1 (the whole vocabulary) or None"))
        if self.output_kind not in OUTPUT_KINDS:
            raise ParamError("output_kind", f"output_kind must be one of {', '.join(map(repr, OUTPUT_KINDS))}, "
                                            f"got {self.output_kind!r}")
        self.stop_list = self._check_stop(self.stop)
        if self.stop_list and not self.detokenize:
            raise ParamError("stop", f"stop strings {self.stop_list!r} are matched in the output text, which "
                                     f"detokenize=False leaves empty; use stop_token_ids, or detokenize=True")
        self.stop_token_ids = self._check_stop_token_ids(self.stop_token_ids)
        self._check_processors()

    def choices(self) -> list["SamplingParams"]:
        """The n single-sequence requests that serve these params (vLLM's parallel sampling, as its engine fans a
        parent request out): n = 1 each, choice i seeded seed + i when a seed is given (reproducible, and the
        choices still differ), every other field the same. With prefix caching on they share the prompt's KV."""
        if self.n == 1:
            return [self]
        return [dataclasses.replace(self, n=1, seed=None if self.seed is None else choice_seed(self.seed, i))
                for i in range(self.n)]

    def _check_processors(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name), f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ParamError(name, f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
            setattr(self, name, value)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty, "> 0 (1 = off)")
        if self.repetition_penalty <= 0:
            raise ParamError("repetition_penalty", f"repetition_penalty must be > 0 (1 = off), got "
                                                   f"{self.repetition_penalty!r}")
        self.min_p = _number("min_p", self.min_p, "in [0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ParamError("min_p", f"min_p must be in [0, 1], got {self.min_p!r}")
        most = INT64_MAX if self.max_tokens is None else self.max_tokens
        self.min_tokens = _integer("min_tokens", self.min_tokens, 0, most, allowed=f"in [0, max_tokens={most}]")
        self.logit_bias = self._check_logit_bias(self.logit_bias)
        self._check_constraints()
        self.penalizes = (self.presence_penalty != 0 or self.frequency_penalty != 0
                          or self.repetition_penalty != 1)
        self.processes_logits = (self.penalizes or bool(self.logit_bias) or self.min_tokens > 0 or self.min_p > 0
                                 or self.constrains)

    @property
    def constrains(self) -> bool:
        """Whether the request restricts which tokens may come (structured outputs, allowed_token_ids, bad_words):
        the engine then reads each step's tokens on the host before the next (no async steps for it)."""
        return self.structured_outputs is not None or self.allowed_token_ids is not None or bool(self.bad_words)

    def _check_constraints(self) -> None:
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as err:  # an unknown field
                raise ParamError("structured_outputs", f"structured_outputs: {err}") from None
        elif self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ParamError("structured_outputs", f"structured_outputs must be a StructuredOutputsParams (or a dict "
                             f"of its fields), got {type(self.structured_outputs).__name__}")
        ids = self.allowed_token_ids
        if ids is not None:
            if (not isinstance(ids, (list, tuple)) or not 1 <= len(ids) <= MAX_ALLOWED_TOKEN_IDS
                    or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t <= INT64_MAX
                           for t in ids)):
                raise ParamError("allowed_token_ids", f"allowed_token_ids must be a non-empty list of token ids "
                                 f"(integers >= 0, at most {MAX_ALLOWED_TOKEN_IDS}), got {_short(ids)}")
            self.allowed_token_ids = [int(t) for t in ids]
        words = self.bad_words
        if words is not None:
            if (not isinstance(words, (list, tuple)) or len(words) > MAX_BAD_WORDS
                    or any(not isinstance(w, str) or not w.strip() for w in words)):
                raise ParamError("bad_words", f"bad_words must be a list of at most {MAX_BAD_WORDS} non-blank "
                                              f"strings, got {_short(words)}")
            self.bad_words = list(words)

    @staticmethod
    def _check_logit_bias(bias: Any) -> dict[int, float] | None:
        """{token id: bias} with int ids >= 0 (the engine checks them against its vocabulary) and biases in
        [-100, 100]. String ids ("50256", as JSON must send them) are read as integers."""
        if bias is None:
            return None
        if not isinstance(bias, dict):
            raise ParamError("logit_bias", f"logit_bias must be a dict {{token id: bias}}, got "
                                           f"{type(bias).__name__}: {bias!r}")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ParamError("logit_bias", f"logit_bias may bias at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got "
                                           f"{len(bias)}")
        checked: dict[int, float] = {}
        for key, value in bias.items():
            token = key
            if isinstance(key, str):
                try:
                    token = int(key)  # "50256" (JSON's keys are strings); "x", "1.5" and "²" stay strings
                except ValueError:
                    pass
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token <= INT64_MAX:
                raise ParamError("logit_bias", f"logit_bias keys must be token ids (integers in [0, {INT64_MAX}]), "
                                               f"got {key!r}")
            value = _number("logit_bias", value, f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ParamError("logit_bias", f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, "
                                               f"{MAX_LOGIT_BIAS:g}], got {value!r} for token {key!r}")
            if int(token) in checked:
                raise ParamError("logit_bias", f"logit_bias names token {int(token)} twice")
            checked[int(token)] = value
        return checked or None

    def checked_copy(self, **changes: Any) -> "SamplingParams":
        """A copy with `changes` applied, checked again as on construction (dataclasses.replace runs
        __post_init__): a value assigned to this object after construction raises ParamError here, naming the
        field, instead of failing a whole engine step and every request in it. A few microseconds."""
        return dataclasses.replace(self, **changes)

    @staticmethod
    def _check_stop(stop: Any) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or any(not isinstance(s, str) or s == "" for s in stops):
            raise ParamError("stop", f"stop must be a non-empty string or a list of them, got {stop!r}")
        return list(stops)

    @staticmethod
    def _check_stop_token_ids(ids: Any) -> list[int]:
        allowed = f"integers in [0, {INT64_MAX}]"  # int64: the ids may go into a tensor
        if ids is None:
            return []
        if not isinstance(ids, (list, tuple)):
            raise ParamError("stop_token_ids", f"stop_token_ids must be a list of {allowed}, got "
                                               f"{type(ids).__name__}: {ids!r}")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t <= INT64_MAX]
        if bad:
            raise ParamError("stop_token_ids", f"stop_token_ids must be {allowed}, got {bad[0]!r} in {ids!r}")
        return [int(t) for t in ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
