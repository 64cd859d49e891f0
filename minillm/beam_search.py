"""Beam search on top of the engine (vLLM's `LLM.beam_search` and `BeamSearchParams`; chapter 1's decoding).

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


def beam_search(llm: Any, prompts: list, params: BeamSearchParams) -> list[BeamSearchOutput]:
    """Beam search for every prompt (a str or a list of token ids), all prompts' beams stepped together: one
    LLM.generate call per step with one single-token request per live beam."""
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
    engine = llm.llm_engine
    eos = set() if params.ignore_eos else set(engine.eos_token_ids)
    prompt_ids = []
    for n, prompt in enumerate(prompts):
        try:
            ids = engine.validate_prompt(prompt)[1]
        except (ValueError, TypeError) as err:
            raise type(err)(f"prompt {n}: {err}") from None
        if len(ids) >= engine.max_model_len:
            raise ValueError(f"prompt {n}: {len(ids)} tokens leave no room for output in max_model_len="
                             f"{engine.max_model_len}")
        prompt_ids.append(ids)
    live = [[BeamSearchSequence([])] for _ in prompts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    ask = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2 * params.beam_width, ignore_eos=True)
    # a prompt's beams grow until max_tokens, or until they fill the context
    limit = [min(params.max_tokens, engine.max_model_len - len(ids)) for ids in prompt_ids]
    for step in range(max(limit, default=0)):
        flat = [(i, beam) for i, beams in enumerate(live) if step < limit[i] for beam in beams]
        if not flat:
            break
        outs = llm.generate([prompt_ids[i] + beam.tokens for i, beam in flat], ask)
        candidates: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, beam), out in zip(flat, outs):
            for token, entry in out.outputs[0].logprobs[0].items():
                grown = BeamSearchSequence(beam.tokens + [token], beam.cum_logprob + entry.logprob)
                if token in eos:
                    grown.finish_reason = "stop"
                    done[i].append(grown)
                else:
                    candidates[i].append(grown)
        live = [sorted(c, key=lambda b: b.cum_logprob, reverse=True)[:params.beam_width] if step < limit[i]
                else live[i] for i, c in enumerate(candidates)]
    results = []
    for i, ids in enumerate(prompt_ids):
        for beam in live[i]:
            beam.finish_reason = "length"
        ranked = done[i] + live[i]
        for beam in ranked:
            beam.score = beam_score(beam, eos, params.length_penalty)
            text_ids = beam.tokens[:-1] if beam.finish_reason == "stop" else beam.tokens
            beam.text = llm.tokenizer.decode(text_ids)
        ranked.sort(key=lambda b: (b.score, b.cum_logprob), reverse=True)
        results.append(BeamSearchOutput(ids, ranked[:params.beam_width]))
    return results


__all__ = ["BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "MAX_BEAM_WIDTH", "beam_score",
           "beam_search"]
