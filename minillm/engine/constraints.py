"""Constrained decoding in the engine: structured outputs, allowed_token_ids and bad_words (chapter 10).

A request may restrict what it generates (SamplingParams.structured_outputs / allowed_token_ids / bad_words, vLLM's
names). None of this changes the model; it changes which logits survive before a token is picked:

    structured outputs  the output must match a regular language (a JSON schema, a regex, one of a list of
                        strings) or a context-free grammar. minillm.structured compiles it into a byte-level DFA
                        (a grammar: a pushdown automaton, built lazily into a DFA over its configurations) and,
                        per state, the mask of tokens whose bytes keep it alive (computed once per state, then
                        cached). Each step a row is masked with the mask of the state its output so far has
                        reached; EOS is allowed exactly where the output is complete.
    allowed_token_ids   one fixed mask per request.
    bad_words           each word, tokenized as the text would hold it (alone and after a space), bans its last
                        token wherever the output ends with the rest of it (a one-token word: everywhere).

Where it runs. The masks depend on the tokens generated so far, so the engine computes them on the host when it
builds a step (`constrain_step`, after build_step_input and, for token trees, after the speculative decoder has laid
out the tree): each sampled row gets the mask and the bans of its own path (a verify step's row j follows drafts
0..j-1, a tree node its ancestors). They travel in the step's LogitsProcessing, so workers in other processes need
nothing but the tensors; the sampler applies them with the other processors (minillm/layers/logits_processors.py).
A request with a constraint therefore steps synchronously (its next mask needs its last token on the host): the
engine runs no async step while one is alive, as vLLM computes its grammar bitmasks between steps.

A draft that leaves the language is simply rejected: the row before it masked the draft's token to probability 0.
Rows that follow such a draft are never kept, so their mask does not matter (they get none).

Finishing. A state that is accepting and cannot go on (the JSON object is closed, the choice is complete) allows
only EOS; the engine does not spend a step on it: the request finishes with "stop" after the token that completed
the output (RequestConstraint.finished_at), its last token a token of the text, not EOS. Under ignore_eos, EOS is
kept out of a mask wherever the format can go on (it would not end the request), so the output runs on to the
format's end. A sampled token the constraint does not allow finishes that request with "error": possible where
the sampler itself was overridden, or where min_tokens' ban of stop tokens (or bad_words) leaves none of the tokens
the format allows (RequestConstraint.all_banned: the error names them; at the first token the engine refuses the
request instead, check_sampling_params).
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minillm.layers.logits_processors import row_path
from minillm.sampling_params import ParamError, SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from minillm.engine.sequence import Sequence
    from minillm.engine.step_input import StepInput

MAX_COMPILED = 64  # distinct constraints whose automata and masks an engine keeps (least recently used go first)


class RequestConstraint:
    """One request's constraints: a token index (structured outputs) or None, a static mask (allowed_token_ids)
    or None, and the bad words as token-id tuples. `states[k]` caches the DFA state after k output tokens."""

    def __init__(self, index: Any, allowed: torch.Tensor | None, bad_words: tuple[tuple[int, ...], ...],
                 ignored_eos: tuple[int, ...] = ()) -> None:
        self.index, self.allowed, self.bad_words = index, allowed, bad_words
        self.longest_bad_word = max(map(len, bad_words), default=0)  # how many recent tokens the bans read
        self.states: list[int] = [] if index is None else [index.start]
        # ignore_eos: EOS would not end the request, so where the format may go on it must (EOS stays allowed
        # only where nothing else is); per state, the index's mask without the EOS ids
        self.ignored_eos, self._without_eos = list(ignored_eos), {}

    def state_at(self, token_ids: list[int], first: int, end: int) -> int:
        """The DFA state after the output tokens token_ids[first:end] (DEAD once one is not allowed), walked on from
        the longest cached prefix: each accepted token is walked once in the request's life."""
        from minillm.structured import DEAD
        states, count = self.states, max(end - first, 0)  # a prefill's rows follow no output token
        if len(states) > count + 1:  # the output was cut (a stop inside a multi-token step)
            del states[count + 1:]
        state = states[-1]
        for position in range(first + len(states) - 1, end):
            if state == DEAD:
                return DEAD
            state = self.index.next_state(state, token_ids[position])
            states.append(state)
        return state

    def walk(self, state: int, tokens: Iterable[int]) -> int:
        """The state after `tokens` from `state` (not cached: a step's drafts may yet be rejected)."""
        from minillm.structured import DEAD
        for token in tokens:
            if state == DEAD:
                break
            state = self.index.next_state(state, token)
        return state

    def row_mask(self, state: int | None) -> torch.Tensor | None:
        """bool [V] of the tokens a row may sample from `state` (None: no structured output), with the static
        allowed_token_ids; None where every token may come. Where the two leave nothing, the structured output's
        mask wins (a row must keep a token to sample)."""
        from minillm.structured import DEAD
        grammar = None if state is None or state == DEAD else self.index.allowed(state)
        if grammar is not None and self.ignored_eos:
            if state not in self._without_eos:
                dropped = grammar.numpy().copy()  # (numpy: see row_mask's note on torch's CPU threads)
                dropped[self.ignored_eos] = False
                self._without_eos[state] = torch.from_numpy(dropped) if dropped.any() else grammar
            grammar = self._without_eos[state]
        if self.allowed is None:
            return grammar
        if grammar is None:
            return self.allowed
        # numpy, not torch: torch's CPU ops wake its thread pool, which then slows the tokenizer's threads
        both = np.logical_and(grammar.numpy(), self.allowed.numpy())
        return torch.from_numpy(both) if both.any() else grammar

    def all_banned(self, state: int, outputs: list[int], min_tokens_bans: Iterable[int]) -> list[int] | None:
        """The tokens the constraint allows from `state` (after the output tokens `outputs`) when every one of them
        is banned there (min_tokens' ban of EOS and the stop token ids, bad_words): a request that asked for the
        impossible; None where some token is left to sample."""
        mask = self.row_mask(state)
        if mask is None:
            return None
        allowed = mask.nonzero().flatten().tolist()
        banned = set(min_tokens_bans) | set(self.bans(outputs))
        return allowed if allowed and banned.issuperset(allowed) else None

    def bans(self, outputs: list[int]) -> tuple[int, ...]:
        """Tokens bad_words bans after the output tokens `outputs` (only their last few matter)."""
        banned = []
        for word in self.bad_words:
            prefix = list(word[:-1])
            if not prefix or (len(outputs) >= len(prefix) and outputs[len(outputs) - len(prefix):] == prefix):
                banned.append(word[-1])
        return tuple(banned)

    def finished_at(self, seq: "Sequence", position: int) -> bool:
        """Whether the output up to and including token `position` completes the structured output with nothing
        allowed after it but EOS (the engine then stops the request); ValueError if that token left the language."""
        if self.index is None:
            return False
        from minillm.structured import DEAD, FINISHED
        state = self.state_at(seq.token_ids, seq.num_prompt_tokens, position + 1)
        if state == FINISHED:  # an EOS the output could end with, sampled under ignore_eos
            return True
        if state == DEAD:
            first, outputs = seq.num_prompt_tokens, seq.token_ids[seq.num_prompt_tokens:position]
            bans = seq.min_tokens_stop_ids if position - first < seq.sampling_params.min_tokens else ()
            before = self.state_at(seq.token_ids, first, position)
            left = self.all_banned(before, outputs, bans) if before != DEAD else None
            why = "" if left is None else (f": every token it allows there ({left[:8]}) is banned (min_tokens bans "
                                           f"EOS and stop_token_ids {list(bans)} until then; bad_words)")
            raise ValueError(f"token {seq.token_ids[position]} at position {position} does not fit the request's "
                             f"structured_outputs constraint{why}")
        return self.index.is_accepting(state) and not self.index.dfa.can_continue(state)


class ConstraintCompiler:
    """An engine's compiled constraints: the vocabulary's byte trie (built on first use, a few seconds for a 49k
    vocabulary) and a cache of token indexes by constraint, so that n choices of one request, or many requests with
    the same schema, share one automaton and its masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_token_ids = tokenizer, vocab_size, tuple(sorted(eos_token_ids))
        self._vocabulary = None
        self._indexes: dict[str, Any] = {}
        self._lock = threading.Lock()  # the server checks requests on its event loop while the engine steps

    def for_request(self, params: SamplingParams) -> RequestConstraint | None:
        """The request's RequestConstraint (None when it has none); ParamError naming the field for a constraint
        this engine cannot enforce (a bad regex or schema, a token id outside the vocabulary, no tokenizer)."""
        if not params.constrains:
            return None
        index = None if params.structured_outputs is None else self._index(params.structured_outputs)
        allowed = None
        if params.allowed_token_ids is not None:
            outside = [t for t in params.allowed_token_ids if t >= self.vocab_size]
            if outside:
                raise ParamError("allowed_token_ids", f"allowed_token_ids holds {outside[0]}, outside the vocabulary "
                                                      f"[0, {self.vocab_size})")
            allowed = torch.zeros(self.vocab_size, dtype=torch.bool)
            allowed[params.allowed_token_ids] = True
        ignored = tuple(t for t in self.eos_token_ids if t < self.vocab_size) if params.ignore_eos else ()
        return RequestConstraint(index, allowed, self._bad_words(params.bad_words or []), ignored)

    def _tokenizer(self, field: str) -> Any:
        if self.tokenizer is None or not callable(getattr(self.tokenizer, "token_bytes", None)):
            raise ParamError(field, f"{field} needs a tokenizer that gives each token's bytes (Tokenizer.token_bytes); "
                                    f"this engine has {type(self.tokenizer).__name__}")
        return self.tokenizer

    def _index(self, spec: StructuredOutputsParams) -> Any:
        from minillm.structured import (RegexError, SchemaError, TokenIndex, TokenVocabulary, choice_regex,
                                        compile_grammar, compile_regex)
        from minillm.structured.json_grammar import json_schema_automaton
        from minillm.structured.grammar import json_value_grammar
        from minillm.structured.structural_tag import structural_tag_grammar
        from minillm.structured.json_schema import WHITESPACE
        tokenizer = self._tokenizer("structured_outputs")
        whitespace = "" if spec.disable_any_whitespace else spec.whitespace_pattern
        ws = {} if whitespace is None else {"whitespace": whitespace}
        kind = spec.kind
        key = json.dumps([kind, getattr(spec, kind), whitespace], sort_keys=True, default=str)
        if kind != "regex" and kind != "choice":  # may run on a pushdown automaton, which keeps the stack_closure
            from minillm.structured.pushdown import closure_rule  # it was built under (a learner's: chapter 10)
            key += f"/{id(closure_rule())}"
        with self._lock:
            index = self._indexes.pop(key, None)
        if index is None:
            try:
                if kind == "grammar":
                    dfa = compile_grammar(spec.grammar)
                elif kind == "structural_tag":
                    dfa = compile_grammar(structural_tag_grammar(spec.structural_tag, whitespace))
                elif kind == "json_object":  # any depth: a grammar (a regex would stop at a few levels)
                    dfa = compile_grammar(json_value_grammar(WHITESPACE if whitespace is None else whitespace))
                elif kind == "json":  # a regular schema: a DFA; a recursive one, or any-values: a grammar
                    dfa = json_schema_automaton(spec.json, **ws)
                elif kind == "choice":
                    dfa = compile_regex(choice_regex(list(spec.choice)))
                else:
                    dfa = compile_regex(spec.regex)
            except (RegexError, SchemaError) as err:
                raise ParamError("structured_outputs", f"structured_outputs {kind}: {err}") from None
            except RecursionError:  # groups or schemas nested thousands deep: the parsers recurse
                raise ParamError("structured_outputs", f"structured_outputs {kind} is nested too deeply to "
                                                       f"compile") from None
            with self._lock:
                if self._vocabulary is None:
                    self._vocabulary = TokenVocabulary.from_tokenizer(tokenizer, self.vocab_size, self.eos_token_ids)
            index = TokenIndex(dfa, self._vocabulary)
        with self._lock:
            if len(self._indexes) >= MAX_COMPILED:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[key] = index  # most recently used last
        return index

    def _bad_words(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """Each bad word's token ids as the text would hold it: alone, and after a space (vLLM's two forms), each
        distinct form once."""
        if not words:
            return ()
        tokenizer = self._tokenizer("bad_words")
        found: dict[tuple[int, ...], None] = {}
        for word in words:
            for ids in (_encode(tokenizer, word.lstrip()), _encode(tokenizer, " " + word.lstrip())):
                if ids:
                    found[ids] = None
        return tuple(found)


def _encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    """The tokens of `text` alone (no BOS): a word as the output would hold it."""
    try:
        return tuple(tokenizer.encode(text, add_special_tokens=False))
    except TypeError:  # a tokenizer whose encode adds nothing and takes no such switch
        return tuple(tokenizer.encode(text))


def constrain_step(step: "StepInput", seqs: list["Sequence"]) -> None:
    """Give every sampled row of a constrained sequence its mask and bans (the module docstring): seqs[i] is the
    step's sequence i, whose LogitsProcessing is replaced by one carrying `allowed` and `bans` per sampled row."""
    starts = 0
    for i, seq in enumerate(seqs):
        n, k = step.query_lens[i], step.num_sampled[i]
        first, starts = starts, starts + n
        constraint = getattr(seq, "constraint", None)
        if constraint is None or k == 0:
            continue
        spec = step.sampling[i]
        inputs = step.input_ids[first:first + n]
        if min(inputs) < 0:
            raise RuntimeError(f"sequence {seq.request_id!r}: a constrained step holds a token the host has not read")
        start = step.seq_lens[i] - n  # position of the step's first input
        first_output = seq.num_prompt_tokens
        state = None if constraint.index is None else constraint.state_at(seq.token_ids, first_output, start)
        recent = seq.token_ids[max(first_output, start - constraint.longest_bad_word):start]
        masks, bans = [], []
        tree = step.tree_masks[i] if step.tree_masks is not None else None
        for row in range(n - k, n):
            path = row_path(row, -1 if tree is None else tree[row])
            new = [inputs[j] for j in path if start + j >= first_output]  # the prompt's last token is no output
            masks.append(constraint.row_mask(None if state is None else constraint.walk(state, new)))
            bans.append(constraint.bans(recent + new) if constraint.bad_words else ())
        step.sampling[i] = spec._replace(processing=spec.processing._replace(allowed=tuple(masks), bans=tuple(bans)))
