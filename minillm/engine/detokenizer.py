"""Incremental detokenization and stop strings (chapter 2).

Turning tokens back into text one token at a time is subtler than `decode([token])`:

* A byte-level BPE token can hold *part* of a UTF-8 character (an emoji or a CJK character often spans two or
  three tokens). Decoding the prefix alone yields U+FFFD (the replacement character). So we decode a small window
  of recent tokens and only emit text once the window no longer ends in U+FFFD.
* Some tokenizers (SentencePiece) render a token's leading space differently depending on what precedes it, so the
  window always starts a few tokens back ("prefix_offset") and we emit only what lies past the text those
  context tokens already produced ("read_offset"). This is the scheme vLLM and HF's TextStreamer use.

Stop strings: the engine checks the text after every token; when a stop string appears, the text is cut just
before it and the request finishes with reason "stop". While streaming, text that *could* be the start of a stop
string is held back, so a client never receives characters that are later taken away.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"
_CONTEXT_TOKENS = 5  # tokens of left context decoded with each new token


class Decoder(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


@dataclass
class DetokenizerState:
    """Where one sequence's incremental decoding stands, as offsets into its full token list."""

    prefix_offset: int  # the decode window starts here
    read_offset: int  # tokens before this are already in the output text

    @classmethod
    def for_prompt(cls, num_prompt_tokens: int) -> "DetokenizerState":
        return cls(prefix_offset=max(num_prompt_tokens - _CONTEXT_TOKENS, 0), read_offset=num_prompt_tokens)


def detokenize_incrementally(tokenizer: Decoder, token_ids: list[int], state: DetokenizerState,
                             decoded: tuple[str, str] | None = None) -> str:
    """Text contributed by token_ids[state.read_offset:], or "" while it ends inside a multi-byte character.
    Advances `state` when text is emitted. `decoded`: the two windows' texts (`decode_windows`), when the caller
    decoded them already, with every other sequence of the step in one batch."""
    if decoded is None:
        decoded = (tokenizer.decode(token_ids[state.prefix_offset:state.read_offset]),
                   tokenizer.decode(token_ids[state.prefix_offset:]))
    prefix_text, full_text = decoded
    if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
        new_text = full_text[len(prefix_text):]
        # the tokens just emitted become the next window's left context
        state.prefix_offset, state.read_offset = state.read_offset, len(token_ids)
        return new_text
    return ""


def decode_windows(tokenizer: Decoder, windows: list[tuple[list[int], DetokenizerState]]) -> list[tuple[str, str]]:
    """The (prefix text, full text) that `detokenize_incrementally` would decode for each (token_ids, state), all
    in one `decode_batch` call when the tokenizer has one: after a step of 256 sequences that is one call into the
    tokenizer library instead of 512, each with its own Python and argument-conversion overhead."""
    lists = [ids for token_ids, state in windows
             for ids in (token_ids[state.prefix_offset:state.read_offset], token_ids[state.prefix_offset:])]
    batch_decode = getattr(tokenizer, "decode_batch", None)
    texts = batch_decode(lists) if batch_decode is not None else [tokenizer.decode(ids) for ids in lists]
    return list(zip(texts[0::2], texts[1::2]))


def find_stop_string(text: str, stops: list[str], new_text_len: int) -> int:
    """Index where the earliest stop string starts in `text`, or -1. Only the tail that the last
    `new_text_len` characters could have completed is searched, so checking every step stays O(new text)."""
    if not stops:
        return -1
    longest = max(len(s) for s in stops)
    start = max(len(text) - new_text_len - longest + 1, 0)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def stream_safe_length(text: str, stops: list[str]) -> int:
    """How many characters of `text` can be shown now: all of it, minus the longest suffix that is a proper
    prefix of some stop string (it might yet grow into that stop string and be cut)."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return len(text) - held
