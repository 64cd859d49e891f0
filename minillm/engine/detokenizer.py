"""Incremental detokenization and stop strings (chapter 10: what a streaming server sends).

Turning tokens back into text one token at a time is subtler than `decode([token])`:

* A byte-level BPE token can hold *part* of a UTF-8 character (an emoji or a CJK character often spans two or
  three tokens). Decoding the prefix alone yields U+FFFD (the replacement character). So we decode a small window
  of recent tokens and only emit text once the window no longer ends in U+FFFD.
* Some tokenizers (SentencePiece) render a token's leading space differently depending on what precedes it, so the
  window always starts a few tokens back ("prefix_offset") and we emit only what lies past the text those
  context tokens already produced ("read_offset"). This is vLLM's scheme, taken from Hugging Face's
  text-generation-inference (HF's TextStreamer instead re-decodes everything and holds text back to a space).
  `next_text` is that rule on the two decoded windows (chapter 10's exercise); `detokenize_incrementally`
  decodes the windows and keeps the offsets.

Stop strings: the engine checks the text after every token; when a stop string appears, the text is cut just
before it and the request finishes with reason "stop" (`find_stop_string`). While streaming, text that *could*
be the start of a stop string is held back (`stream_safe_length`), so a client never receives characters that
are later taken away. All three are chapter 10's exercises; the engine calls them through `dispatch`.

Special tokens (`<|im_end|>`, `<|im_start|>`): decoded text leaves them out unless the request says
`skip_special_tokens=False` (vLLM's switch), kept in `DetokenizerState` so that every decode of that request's
windows, the batched one included, keeps them: then their text is ordinary output text, streamed like the rest
and searched for stop strings like the rest (a stop string may end inside "<|im_start|>"). The stop token that
ends a request (EOS: "<|im_end|>") is not text, unless include_stop_str_in_output (StepOutputs._check_stop).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

from minillm.hooks import dispatch

_CONTEXT_TOKENS = 5  # tokens of left context decoded with each new token


class Decoder(Protocol):
    """What the detokenizer needs: decode(ids) is the text without special tokens. A tokenizer that can keep them
    takes decode(ids, skip_special_tokens=False) too (minillm's Tokenizer and Hugging Face's do)."""

    def decode(self, token_ids: list[int]) -> str: ...


def decode_text(tokenizer: Decoder, token_ids: list[int], skip_special_tokens: bool = True) -> str:
    """tokenizer.decode(token_ids), keeping special tokens' text when skip_special_tokens is False. The default
    calls decode(ids) alone, so a tokenizer without the keyword serves every request that does not ask for it."""
    if skip_special_tokens:
        return tokenizer.decode(token_ids)
    return tokenizer.decode(token_ids, skip_special_tokens=False)


def keeps_special_tokens(tokenizer: Decoder) -> bool:
    """Whether the tokenizer's decode() takes skip_special_tokens, which a request with skip_special_tokens=False
    needs (checked when it comes in, rather than failing it at its first token)."""
    try:
        params = inspect.signature(tokenizer.decode).parameters
    except (TypeError, ValueError):  # a compiled function without a signature: let it try
        return True
    return "skip_special_tokens" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclass
class DetokenizerState:
    """Where one sequence's incremental decoding stands, as offsets into its full token list."""

    prefix_offset: int  # the decode window starts here
    read_offset: int  # tokens before this are already in the output text
    skip_special_tokens: bool = True  # the request's SamplingParams.skip_special_tokens: every window decodes so

    @classmethod
    def for_prompt(cls, num_prompt_tokens: int, skip_special_tokens: bool = True) -> "DetokenizerState":
        return cls(prefix_offset=max(num_prompt_tokens - _CONTEXT_TOKENS, 0), read_offset=num_prompt_tokens,
                   skip_special_tokens=skip_special_tokens)


# >>> exercise ch10.next_text
def next_text(prefix_text: str, full_text: str, prefix_offset: int, read_offset: int,
              num_tokens: int) -> tuple[str, int, int]:
    """One step of incremental detokenization: the text a sequence's newest tokens add, and the next window.

    The caller decoded two windows of the sequence's token ids (prompt included):
        prefix_text = decode(ids[prefix_offset:read_offset])   tokens whose text was already emitted (context)
        full_text   = decode(ids[prefix_offset:num_tokens])    the same context plus the tokens not yet emitted
    Return (new_text, next_prefix_offset, next_read_offset):
    * when full_text is longer than prefix_text and does not end in U+FFFD ("\ufffd", what a decoder returns for
      an incomplete UTF-8 character): new_text is full_text past prefix_text's length, and the window slides:
      the tokens just emitted become the left context (next prefix_offset = read_offset) and everything up to
      num_tokens counts as read (next read_offset = num_tokens);
    * otherwise nothing is emitted and nothing moves: ("", prefix_offset, read_offset). The pending tokens are
      decoded again, with the next token, until their character is complete.
    Example: windows "Hi" / "Hi \ufffd" (half an emoji) -> ("", p, r); next step "Hi" / "Hi 🙂" -> (" 🙂", r, n).
    Raise ValueError unless 0 <= prefix_offset <= read_offset <= num_tokens (integers).
    """
    # >>> solution
    # `type(...) is int` (no bool, no generator): the engine calls this for every token of every request
    if not (type(prefix_offset) is type(read_offset) is type(num_tokens) is int
            and 0 <= prefix_offset <= read_offset <= num_tokens):
        raise ValueError(f"need integers 0 <= prefix_offset <= read_offset <= num_tokens, got {prefix_offset!r}, "
                         f"{read_offset!r}, {num_tokens!r}")
    if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
        return full_text[len(prefix_text):], read_offset, num_tokens
    return "", prefix_offset, read_offset
    # <<< solution
# <<< exercise


def incomplete_tail(data: bytes) -> int:
    """How many bytes at the end of `data` are the first bytes of a UTF-8 character still missing its last ones
    (what a decoder shows as U+FFFD until a later token completes it); 0 when `data` ends complete or with a byte
    no later one can complete (an invalid byte)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: its lead byte is further back
            continue
        length = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return back if length > back else 0
    return 0


def detokenize_incrementally(tokenizer: Decoder, token_ids: list[int], state: DetokenizerState,
                             decoded: tuple[str, str] | None = None) -> str:
    """Text contributed by token_ids[state.read_offset:], or "" while it ends inside a multi-byte character.
    Advances `state` when text is emitted (`next_text`). `decoded`: the two windows' texts (`decode_windows`),
    when the caller decoded them already, with every other sequence of the step in one batch.

    `next_text` holds everything back while the text ends in U+FFFD. Where the tokenizer gives each token's bytes
    (`token_bytes`), only the tokens that hold an unfinished character are held: a U+FFFD no later token can
    complete (an invalid byte: a model can sample lone lead bytes) goes out at once. Held, a stream of them emitted
    nothing until the request ended, a stop string holding U+FFFD never matched before the end, and the decode
    window grew every step. A special token kept as text (state.skip_special_tokens False) counts with its text's
    bytes: "<|im_start|>" after half a character ends that character's hope of completion."""
    skip = state.skip_special_tokens
    if decoded is None:
        decoded = (decode_text(tokenizer, token_ids[state.prefix_offset:state.read_offset], skip),
                   decode_text(tokenizer, token_ids[state.prefix_offset:], skip))
    read_before = state.read_offset
    new_text, state.prefix_offset, state.read_offset = dispatch("ch10.next_text", next_text)(
        decoded[0], decoded[1], state.prefix_offset, state.read_offset, len(token_ids))
    token_bytes = getattr(tokenizer, "token_bytes", None)
    if new_text or state.read_offset != read_before or token_bytes is None or not decoded[1].endswith("\ufffd"):
        return new_text
    # a special token has no bytes of its own: kept as text, its text's bytes stand in for them
    pending = [token_bytes(t) or (b"" if skip else decode_text(tokenizer, [t], False).encode("utf-8"))
               for t in token_ids[read_before:]]
    held, cut = incomplete_tail(b"".join(pending)), len(token_ids)
    while held > 0 and cut > read_before:  # hold back the fewest last tokens holding the unfinished character
        cut -= 1
        held -= len(pending[cut - read_before])
    if cut <= read_before:
        return ""
    text = decoded[1] if cut == len(token_ids) else decode_text(tokenizer, token_ids[state.prefix_offset:cut], skip)
    if len(text) <= len(decoded[0]):
        return ""
    state.prefix_offset, state.read_offset = read_before, cut
    return text[len(decoded[0]):]


def decode_windows(tokenizer: Decoder, windows: list[tuple[list[int], DetokenizerState]]) -> list[tuple[str, str]]:
    """The (prefix text, full text) that `detokenize_incrementally` would decode for each (token_ids, state), all
    in one `decode_batch` call when the tokenizer has one: after a step of 256 sequences that is one call into the
    tokenizer library instead of 512, each with its own Python and argument-conversion overhead. Requests that keep
    special tokens and requests that drop them can share a step: one call for each kind present."""
    batch_decode = getattr(tokenizer, "decode_batch", None)
    texts: list[tuple[str, str]] = [("", "")] * len(windows)
    for skip in (True, False):
        picked = [i for i, (_, state) in enumerate(windows) if state.skip_special_tokens == skip]
        if not picked:
            continue
        lists = []
        for token_ids, state in (windows[i] for i in picked):
            lists += [token_ids[state.prefix_offset:state.read_offset], token_ids[state.prefix_offset:]]
        if batch_decode is None:
            decoded = [decode_text(tokenizer, ids, skip) for ids in lists]
        else:
            decoded = batch_decode(lists) if skip else batch_decode(lists, skip_special_tokens=False)
        for i, pair in zip(picked, zip(decoded[0::2], decoded[1::2])):
            texts[i] = pair
    return texts


# >>> exercise ch10.find_stop_string
def find_stop_string(text: str, stops: list[str], new_text_len: int) -> int:
    """Where the earliest stop string starts in `text`, or -1, counting only occurrences that END inside the last
    `new_text_len` characters (the text this step added).

    The text before them was searched when it arrived, so only a stop string that the new characters complete is
    news; it may START before them (a stop string split across two steps: "...ST" then "OP"). So stop string s is
    looked for from position len(text) - new_text_len - len(s) + 1 on (its last character is then new), which
    keeps the check O(new text) per step however long the output grows.
    Example: text "abc STOP def", stops ["STOP"]: new_text_len 12 -> 4; new_text_len 6 ("OP def" is new) -> 4;
    new_text_len 1 ("f" is new) -> -1 (STOP ends in the old text). Several stop strings: the smallest start
    among those found. No stop strings -> -1.
    Raise ValueError if new_text_len is not an integer in [0, len(text)] or a stop string is empty.
    """
    # >>> solution
    if isinstance(new_text_len, bool) or not isinstance(new_text_len, int) or not 0 <= new_text_len <= len(text):
        raise ValueError(f"new_text_len must be an integer in [0, {len(text)}] (the text's length), got "
                         f"{new_text_len!r}")
    if any(not s for s in stops):
        raise ValueError(f"stop strings must be non-empty, got {stops!r}")
    first_new = len(text) - new_text_len  # index of the first new character
    hits = [i for i in (text.find(s, max(first_new - len(s) + 1, 0)) for s in stops) if i >= 0]
    return min(hits) if hits else -1
    # <<< solution
# <<< exercise


# >>> exercise ch10.stream_safe_length
def stream_safe_length(text: str, stops: list[str]) -> int:
    """How many characters of a running request's `text` a stream may send now.

    A suffix of the text that is a proper prefix of some stop string ("ST" when "STOP" is a stop string) might
    grow into that stop string with the next tokens, and then be cut: a client must never see characters that
    are later taken away. So hold back the LONGEST suffix that is a proper prefix (shorter than the whole) of any
    stop string, and send the rest. Nothing to hold back (or no stop strings) -> len(text).
    Example: "hello ST", ["STOP"] -> 6; "hello S", ["STOP", "Sx"] -> 6; "a S", ["Sx"] -> 2; "hello", [] -> 5;
    "ab", ["abab"] -> 0 (all of "ab" may become the stop string).
    Raise ValueError if a stop string is empty.
    """
    # >>> solution
    if any(not s for s in stops):
        raise ValueError(f"stop strings must be non-empty, got {stops!r}")
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):  # longest first, only longer than held so far
            if text.endswith(stop[:k]):
                held = k
                break
    return len(text) - held
    # <<< solution
# <<< exercise


def stop_string_at(text: str, stops: list[str], new_text_len: int) -> int:
    """The engine's call of `find_stop_string` (a learner's version when one is active); -1 at once for a
    request without stop strings, the common case, so it costs nothing per token."""
    return dispatch("ch10.find_stop_string", find_stop_string)(text, stops, new_text_len) if stops else -1


def streamable_length(text: str, stops: list[str]) -> int:
    """The engine's call of `stream_safe_length`: how much of a running request's text its stream may show."""
    return dispatch("ch10.stream_safe_length", stream_safe_length)(text, stops) if stops else len(text)
