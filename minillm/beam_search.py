"""Beam search on top of the engine (vLLM's `LLM.beam_search` and `BeamSearchParams`). No chapter builds it; it
reads best after chapter 1's sampling (greedy, top-k, top-p), whose alternative it is.

Greedy decoding keeps one sequence and takes the likeliest token each step; beam search keeps `beam_width` of them
and, each step, every extension of every kept sequence competes: the `beam_width` with the highest total log-
probability survive. It finds likelier whole sequences than greedy (which can be trapped by one good-looking token),
at beam_width times the work, and it is deterministic, which is why translation and captioning used it and why
chat serving, which wants diverse and cheap answers, rarely does.

How it runs here (vLLM builds it the same way, outside its engine): each step, one engine request per live beam
asks for a single token with the top 2 x beam_width log-probabilities (SamplingParams(max_tokens=1, logprobs=...)):
enough candidates that beam_width of them survive even when some end in EOS. Every candidate is a beam extended by
one token, scored by its cumulative log-probability; one ending in EOS (unless ignore_eos) is complete and leaves
the race; the best beam_width of the rest go on. After max_tokens steps (or when no beam is live) the complete and
the live beams are ranked by the length-normalised score

    score = cumulative_logprob / (generated tokens, EOS not counted) ** length_penalty

(length_penalty 0: raw log-probability, which favours short outputs; 1: the mean per token) and the best
beam_width come back, best first. Each step re-reads a beam's whole prefix unless the engine caches prefixes:
build the LLM with enable_prefix_caching=True and only the last, partly filled block is computed again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minillm.sampling_params import MAX_LOGPROBS, ParamError, SamplingParams, _integer, _number

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # 2 x beam_width candidates per beam come from the top log-probabilities


@dataclass
class BeamSearchParams:
    """vLLM's names: beam_width beams, max_tokens new tokens at most, EOS ignored or not, the length_penalty of
    the final ranking (the module docstring), and the temperature the candidates' log-probabilities are read at
    (0 and 1 both mean the model's own distribution here: log-probabilities are of the raw logits)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        self.beam_width = _integer("beam_width", self.beam_width, 1, MAX_BEAM_WIDTH)
        self.max_tokens = _integer("max_tokens", self.max_tokens, 1)
        if not isinstance(self.ignore_eos, bool):
            raise ParamError("ignore_eos", f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        self.temperature = _number("temperature", self.temperature, ">= 0")
        if self.temperature < 0:
            raise ParamError("temperature", f"temperature must be >= 0, got {self.temperature!r}")
        self.length_penalty = _number("length_penalty", self.length_penalty, "(any finite number)")


@dataclass
class BeamSearchSequence:
    """One beam: its generated tokens (an EOS that completed it included), their log-probabilities' sum, its text
    and, once ranked, its score; finish_reason "stop" (EOS) or "length"."""

    tokens: list[int]
    cum_logprob: float = 0.0
    text: str = ""
    score: float = 0.0
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first."""

    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence] = field(default_factory=list)


def beam_score(beam: BeamSearchSequence, eos_token_ids: set[int], length_penalty: float) -> float:
    """cum_logprob / length ** length_penalty, the length counting generated tokens but a final EOS."""
    length = len(beam.tokens) - (1 if beam.tokens and beam.tokens[-1] in eos_token_ids else 0)
    return beam.cum_logprob / max(length, 1) ** length_penalty


class BeamSearch:
    """The search for a batch of prompts as a state machine, so that a synchronous LLM (beam_search) and the async
    server (serve/beam_fields.py) drive the same rule: `prompts()` gives the token ids to extend this step (one
    request per live beam), `advance()` takes each one's top log-probabilities, `results()` ranks the beams."""

    def __init__(self, prompt_ids: list[list[int]], params: BeamSearchParams, eos_token_ids: set[int],
                 max_model_len: int) -> None:
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        for n, ids in enumerate(prompt_ids):
            if len(ids) >= max_model_len:
                raise ValueError(f"prompt {n}: {len(ids)} tokens leave no room for output in max_model_len="
                                 f"{max_model_len}")
        self.prompt_ids, self.params = prompt_ids, params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        # a prompt's beams grow until max_tokens, or until they fill the context
        self.limit = [min(params.max_tokens, max_model_len - len(ids)) for ids in prompt_ids]
        self.live = [[BeamSearchSequence([])] for _ in prompt_ids]
        self.done: list[list[BeamSearchSequence]] = [[] for _ in prompt_ids]
        self.step, self._flat = 0, []
        # what each step asks of a beam: one token, with 2 x beam_width candidates among its top log-probabilities
        self.ask = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * params.beam_width, ignore_eos=True)

    def prompts(self) -> list[list[int]]:
        """The token ids of every live beam that still grows (empty: the search is over)."""
        self._flat = [(i, beam) for i, beams in enumerate(self.live) if self.step < self.limit[i] for beam in beams]
        return [self.prompt_ids[i] + beam.tokens for i, beam in self._flat]

    def advance(self, top_logprobs: list[dict[int, float]]) -> None:
        """Each prompt() request's {token id: log-probability} of its candidates: extend, complete, prune."""
        width = self.params.beam_width
        candidates: list[list[BeamSearchSequence]] = [[] for _ in self.prompt_ids]
        for (i, beam), found in zip(self._flat, top_logprobs):
            for token, logprob in found.items():
                grown = BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + logprob)
                if token in self.eos:
                    grown.finish_reason = "stop"
                    self.done[i].append(grown)
                else:
                    candidates[i].append(grown)
        self.live = [sorted(c, key=lambda b: b.cum_logprob, reverse=True)[:width] if self.step < self.limit[i]
                     else self.live[i] for i, c in enumerate(candidates)]
        self.step += 1

    def results(self, decode: Any) -> list[BeamSearchOutput]:
        """The best beam_width beams of each prompt, best first, their text from `decode(token ids)`."""
        results = []
        for i, ids in enumerate(self.prompt_ids):
            for beam in self.live[i]:
                beam.finish_reason = "length"
            ranked = self.done[i] + self.live[i]
            for beam in ranked:
                beam.score = beam_score(beam, self.eos, self.params.length_penalty)
                beam.text = decode(beam.tokens[:-1] if beam.finish_reason == "stop" else beam.tokens)
            ranked.sort(key=lambda b: (b.score, b.cum_logprob), reverse=True)
            results.append(BeamSearchOutput(ids, ranked[:self.params.beam_width]))
        return results


def beam_search(llm: Any, prompts: list, params: BeamSearchParams, lora_request: Any = None) -> list[BeamSearchOutput]:
    """Beam search for every prompt (a str or a list of token ids), all prompts' beams stepped together: one
    LLM.generate call per step with one single-token request per live beam (each with `lora_request`, one LoRA
    adapter for the whole search, as vLLM's argument)."""
    engine = llm.llm_engine
    engine.check_lora_request(lora_request)
    prompt_ids = []
    for n, prompt in enumerate(prompts):
        try:
            prompt_ids.append(engine.validate_prompt(prompt)[1])
        except (ValueError, TypeError) as err:
            raise type(err)(f"prompt {n}: {err}") from None
    search = BeamSearch(prompt_ids, params, set(engine.eos_token_ids), engine.max_model_len)
    while batch := search.prompts():
        outs = llm.generate(batch, search.ask, lora_request=lora_request)
        search.advance([{t: e.logprob for t, e in out.outputs[0].logprobs[0].items()} for out in outs])
    return search.results(llm.tokenizer.decode)


__all__ = ["BeamSearch", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "MAX_BEAM_WIDTH", "beam_score",
           "beam_search"]
