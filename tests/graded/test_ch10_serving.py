"""Graded tests of chapter 10: incremental detokenization, stop strings across steps, the held-back stream text,
the capacity question, the token mask of structured outputs, a grammar's stack closure, and multi-LoRA's delta.

The text exercises are checked three ways: against the solution on seeded random inputs (short alphabets, so
stop strings and their prefixes really occur), against properties that hold whatever the solution says (a
stream's chunks add up to the whole text and never carry half a character; a stop string is found the step it
completes, at its first occurrence; text once shown is never taken back), and inside the engine's own code through
`dispatch` (detokenize_incrementally, stop_string_at, streamable_length), with two toy tokenizers: a byte-level
one whose tokens split UTF-8 characters, and a SentencePiece-like one whose leading spaces depend on context.
"""
from __future__ import annotations

import copy
import random
import re

import pytest
import torch

from minillm.course.checks import assert_close, assert_equal, assert_rejects, assert_scalar_close, graded_seed
from minillm.engine.detokenizer import (DetokenizerState, detokenize_incrementally, find_stop_string,
                                        stop_string_at, streamable_length)
from minillm.hooks import overriding

pytestmark = pytest.mark.filterwarnings("ignore")
FFFD = "\ufffd"


def rng(seed: int) -> random.Random:
    return random.Random(graded_seed(seed))


class SplitUtf8Tokenizer:
    """Byte-level BPE in miniature: a token is a run of 1-3 UTF-8 bytes, so a character of 2-4 bytes is often
    split between tokens, and decoding a window that ends inside one gives U+FFFD, as real byte-level BPE does."""

    def __init__(self, text: str, r: random.Random):
        data, self.pieces, i = text.encode(), [], 0
        while i < len(data):
            n = r.randint(1, 3)
            self.pieces.append(data[i:i + n])
            i += n

    def decode(self, token_ids: list[int]) -> str:
        return b"".join(self.pieces[t] for t in token_ids).decode("utf-8", errors="replace")


class SentencePieceLike:
    """Words carry their leading space as "▁", and a decoded text drops the space of its very first word, as
    SentencePiece does: a token's text depends on what is decoded before it."""

    def __init__(self, words: list[str]):
        self.pieces = ["▁" + w for w in words]

    def decode(self, token_ids: list[int]) -> str:
        text = "".join(self.pieces[t] for t in token_ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


TEXTS = ["Hi 🙂, café au lait — 東京 at 5°C 🚀!", "naïve résumé: 3×4=12 ✓ ünïcödé 日本語 🎉🎉",
         "plain ascii only, then ½ and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 at the end 🙂"]


def _stream(tokenizer, num_tokens: int, num_prompt: int) -> list[str]:
    """Every step's new text, through the engine's detokenize_incrementally (whatever next_text is active)."""
    state, chunks = DetokenizerState.for_prompt(num_prompt), []
    ids = list(range(num_tokens))
    for n in range(num_prompt + 1, num_tokens + 1):
        chunks.append(detokenize_incrementally(tokenizer, ids[:n], state))
    return chunks


# ---- ch10.next_text ----------------------------------------------------------------------------------

def _window_case(r: random.Random) -> tuple[str, str, int, int, int]:
    prefix = "".join(r.choice("ab é") for _ in range(r.randint(0, 5)))
    tail = "".join(r.choice(["x", " y", "🙂", FFFD, "", "é"]) for _ in range(r.randint(0, 3)))
    full = prefix + tail if r.random() < 0.85 else prefix[:max(len(prefix) - 1, 0)]
    p = r.randint(0, 6)
    rd = p + r.randint(0, 4)
    return prefix, full, p, rd, rd + r.randint(0, 4)


@pytest.mark.exercise("ch10.next_text")
@pytest.mark.points(3)
def test_next_text_matches_solution(impl, ref):
    r = rng(101)
    cases = [("Hi", "Hi " + FFFD, 3, 5, 6), ("Hi", "Hi 🙂", 3, 5, 7), ("", "Hello", 0, 0, 2), ("ab", "ab", 1, 4, 4),
             ("a", "a" + FFFD + "b", 0, 2, 5)] + [_window_case(r) for _ in range(40)]
    for args in cases:
        got, want = impl(*args), ref(*args)
        assert isinstance(got, tuple) and len(got) == 3, f"next_text{args!r} must return (text, prefix_offset, " \
                                                         f"read_offset), got {got!r}"
        assert tuple(got) == want, f"next_text{args!r}: got {got!r}, expected {want!r}"


@pytest.mark.exercise("ch10.next_text")
@pytest.mark.points(3)
def test_next_text_streams_whole_characters_only(impl):
    """Byte tokens that split characters: the chunks add up to the text, none holds U+FFFD, and a character is
    sent the step its last byte arrives (not later)."""
    r = rng(102)
    with overriding({"ch10.next_text": impl}):
        for text in TEXTS:
            tok = SplitUtf8Tokenizer(text, r)
            # a prompt is text, so it ends on a whole character (its window may still start inside one)
            whole = [n for n in range(1, len(tok.pieces) - 3) if not tok.decode(list(range(n))).endswith(FFFD)]
            for num_prompt in r.sample(whole, 3):
                chunks = _stream(tok, len(tok.pieces), num_prompt)
                sent = "".join(chunks)
                want = tok.decode(list(range(len(tok.pieces))))[len(tok.decode(list(range(num_prompt)))):]
                assert sent == want, f"the streamed chunks join to {sent!r}, expected {want!r}"
                bad = [c for c in chunks if FFFD in c]
                assert not bad, f"a chunk holds half a character (U+FFFD): {bad[0]!r}"
                for n, chunk in enumerate(chunks, start=num_prompt + 1):
                    complete = not tok.decode(list(range(n))).endswith(FFFD)
                    assert bool(chunk) == complete, f"after token {n} of {len(tok.pieces)} the text " + (
                        "is complete but nothing was sent" if complete
                        else f"ends mid-character, yet {chunk!r} was sent")


@pytest.mark.exercise("ch10.next_text")
@pytest.mark.points(2)
def test_next_text_keeps_context_dependent_spaces(impl):
    """SentencePiece-like pieces: the window must start at tokens already sent, or each word loses its space."""
    words = "the quick brown fox jumps over the lazy dog again".split()
    tok = SentencePieceLike(words)
    with overriding({"ch10.next_text": impl}):
        for num_prompt in (1, 2, 6):
            chunks = _stream(tok, len(words), num_prompt)
            want = " " + " ".join(words[num_prompt:])
            assert "".join(chunks) == want, f"prompt of {num_prompt} words: streamed {''.join(chunks)!r}, " \
                                            f"expected {want!r}"


@pytest.mark.exercise("ch10.next_text")
@pytest.mark.points(2)
def test_next_text_rejects_bad_offsets(impl, ref):
    valid = ("Hi", "Hi there", 2, 4, 5)
    assert_rejects(impl, valid, ref(*valid), [("a", "ab", 3, 2, 5), ("a", "ab", 0, 4, 3), ("a", "ab", -1, 0, 1),
                                              ("a", "ab", 0, 1.5, 2)], "next_text")


# ---- ch10.find_stop_string ---------------------------------------------------------------------------

def _stop_case(r: random.Random) -> tuple[str, list[str], int]:
    text = "".join(r.choice("ab c") for _ in range(r.randint(1, 14)))
    stops = ["".join(r.choice("abc") for _ in range(r.randint(1, 4))) for _ in range(r.randint(1, 3))]
    return text, stops, r.randint(0, len(text))


@pytest.mark.exercise("ch10.find_stop_string")
@pytest.mark.points(2)
def test_find_stop_string_matches_solution(impl, ref):
    r = rng(111)
    cases = [("abc STOP def", ["STOP"], 12), ("abc STOP def", ["STOP"], 6), ("abc STOP def", ["STOP", "def"], 1),
             ("xxST", ["STOP"], 2), ("hello", [], 3), ("xxSTOP", ["STOP", "P"], 2), ("abc STOP", ["OP", "STOP"], 2),
             ("b ab", ["b", "ab"], 2)] + [_stop_case(r) for _ in range(60)]
    for text, stops, new in cases:
        got, want = impl(text, list(stops), new), ref(text, list(stops), new)
        assert got == want, f"find_stop_string({text!r}, {stops!r}, {new}): got {got!r}, expected {want}"


@pytest.mark.exercise("ch10.find_stop_string")
@pytest.mark.points(2)
def test_find_stop_string_catches_stops_split_across_steps(impl):
    """Text arrives in chunks of 1-4 characters, as a stream's steps deliver it, checked by the engine's
    stop_string_at after each chunk: nothing is found until a stop string completes, and then it is found at
    its first occurrence (the smallest start among the stop strings present)."""
    r = rng(112)
    with overriding({"ch10.find_stop_string": impl}):
        for _ in range(40):
            full = "".join(r.choice("ab c") for _ in range(r.randint(4, 30)))
            stops = ["".join(r.choice("abc") for _ in range(r.randint(2, 4))) for _ in range(r.randint(1, 3))]
            text, seen = "", -1
            while len(text) < len(full) and seen < 0:
                chunk = full[len(text):len(text) + r.randint(1, 4)]
                text += chunk
                seen = stop_string_at(text, stops, len(chunk))
                hits = [i for i in (text.find(s) for s in stops) if i >= 0]
                want = min(hits) if hits else -1
                assert seen == want, f"stops {stops!r}: after the chunk {chunk!r} the text is {text!r}; " \
                                     f"got {seen}, expected {want}"


@pytest.mark.exercise("ch10.find_stop_string")
@pytest.mark.points(1)
def test_find_stop_string_rejects_bad_input(impl, ref):
    valid = ("abc STOP def", ["STOP"], 6)
    assert_rejects(impl, valid, ref(*valid), [("abc", ["b"], -1), ("abc", ["b"], 4), ("abc", ["", "b"], 2)],
                   "find_stop_string")


# ---- ch10.stream_safe_length -------------------------------------------------------------------------

@pytest.mark.exercise("ch10.stream_safe_length")
@pytest.mark.points(2)
def test_stream_safe_length_matches_solution(impl, ref):
    r = rng(121)
    cases = [("hello ST", ["STOP"]), ("hello S", ["STOP", "Sx"]), ("a S", ["Sx"]), ("hello", []), ("ab", ["abab"]),
             ("hello STO", ["STOP"]), ("xab", ["b", "abc"])]
    cases += [("".join(r.choice("ab c") for _ in range(r.randint(0, 10))),
               ["".join(r.choice("abc") for _ in range(r.randint(1, 5))) for _ in range(r.randint(1, 3))])
              for _ in range(60)]
    for text, stops in cases:
        got, want = impl(text, list(stops)), ref(text, list(stops))
        assert got == want, f"stream_safe_length({text!r}, {stops!r}): got {got!r}, expected {want}"


@pytest.mark.exercise("ch10.stream_safe_length")
@pytest.mark.points(2)
def test_stream_shows_nothing_it_takes_back(impl):
    """A stream with stop strings, step by step through the engine's streamable_length: what is shown only grows,
    is always a prefix of the final (cut) text, and whatever is held back could still become a stop string
    (holding back more than that delays the user for nothing)."""
    r = rng(122)
    with overriding({"ch10.stream_safe_length": impl}):
        for _ in range(40):
            full = "".join(r.choice("ab c") for _ in range(r.randint(4, 24)))
            stops = ["".join(r.choice("abc") for _ in range(r.randint(2, 4))) for _ in range(r.randint(1, 3))]
            hits = [i for i in (full.find(s) for s in stops) if i >= 0]
            final = full[:min(hits)] if hits else full
            shown, text = "", ""
            for ch in full:
                text += ch
                if find_stop_string(text, stops, 1) >= 0:
                    break
                safe = streamable_length(text, stops)
                assert isinstance(safe, int) and 0 <= safe <= len(text), \
                    f"stream_safe_length({text!r}, {stops!r}) = {safe!r}: not a length of the text"
                now = text[:safe]
                assert now.startswith(shown) and final.startswith(now), \
                    f"stops {stops!r}: after {text!r} the stream shows {now!r}, but it showed {shown!r} before " \
                    f"and the request will end with {final!r}"
                held = text[safe:]
                assert held == "" or any(s.startswith(held) and len(held) < len(s) for s in stops), \
                    f"stream_safe_length({text!r}, {stops!r}) holds back {held!r}, which begins no stop string"
                shown = now


@pytest.mark.exercise("ch10.stream_safe_length")
@pytest.mark.points(1)
def test_stream_safe_length_rejects_empty_stops(impl, ref):
    valid = ("hello ST", ["STOP"])
    assert_rejects(impl, valid, ref(*valid), [("hello", [""]), ("hello", ["ST", ""])], "stream_safe_length")


# ---- ch10.max_request_rate ---------------------------------------------------------------------------

@pytest.mark.exercise("ch10.max_request_rate")
@pytest.mark.points(2)
def test_max_request_rate_matches_solution(impl, ref):
    r = rng(131)
    cases = [(64, 200, 0.02), (1, 1, 1.0)] + [(r.randint(1, 512), r.uniform(1, 2000), r.uniform(1e-3, 0.2))
                                              for _ in range(10)]
    for args in cases:
        assert_scalar_close(impl(*args), ref(*args), f"max_request_rate{args!r}", rtol=1e-6)


@pytest.mark.exercise("ch10.max_request_rate")
@pytest.mark.points(2)
def test_max_request_rate_is_a_full_server_s_throughput(impl):
    """Simulated: requests that never stop coming keep all seats busy; count how many finish per second."""
    r = rng(132)
    for _ in range(6):
        seats, tokens, step = r.randint(1, 16), r.randint(1, 12), r.uniform(0.005, 0.05)
        remaining, finished, steps = [tokens] * seats, 0, seats * tokens * 20
        for _ in range(steps):
            remaining = [n - 1 for n in remaining]
            finished += sum(n == 0 for n in remaining)
            remaining = [n if n > 0 else tokens for n in remaining]  # a waiting request takes the seat
        assert_scalar_close(impl(seats, tokens, step), finished / (steps * step),
                            f"max_request_rate({seats}, {tokens}, {step:.4f}) against a simulated full server",
                            rtol=1e-6)


@pytest.mark.exercise("ch10.max_request_rate")
@pytest.mark.points(1)
def test_max_request_rate_rejects_bad_input(impl, ref):
    valid = (64, 200, 0.02)
    assert_rejects(impl, valid, ref(*valid), [(0, 200, 0.02), (64, 0, 0.02), (64, 200, -1.0), (2.5, 200, 0.02)],
                   "max_request_rate")


# ---- ch10.token_mask -----------------------------------------------------------------------------------------

def dfa_table(pattern: str) -> tuple[list[list[int]], list[bool], "object"]:
    """Every reachable state of the pattern's byte automaton as plain lists: (transitions, accepting, dfa)."""
    from minillm.structured import compile_regex
    from minillm.structured.token_index import dfa_tables
    dfa = compile_regex(pattern)
    return (*dfa_tables(dfa), dfa)


def toy_vocabulary(r: random.Random) -> list[bytes]:
    """Single bytes, runs of ASCII, whole and split UTF-8 characters, and special tokens with no bytes."""
    words = [bytes([b]) for b in range(256)]
    words += [bytes(r.choice(b'abcdefxyz019-_" :{}[],') for _ in range(r.randint(2, 6))) for _ in range(300)]
    for ch in "é東🍵ñ":
        data = ch.encode()
        words += [data, data[:1], data[1:], data + b'"', b"a" + data]
    words += [b""] * 5
    r.shuffle(words)
    return words


PATTERNS = [r"[a-f]{2}-\d{1,3}", r'\{"k":"(?:[^"\\]|\\.){0,4}"\}', r"(yes|no)!?", r"[éñ]+東?", r"x*"]


@pytest.mark.exercise("ch10.token_mask")
@pytest.mark.points(3)
def test_token_mask_matches_solution_at_every_state(impl, ref):
    r = rng(141)
    for pattern in PATTERNS:
        transitions, accepting, _ = dfa_table(pattern)
        words = toy_vocabulary(r)
        eos = [r.randrange(len(words)), len(words) + 7]  # an id past the vocabulary is ignored
        for state in range(len(transitions)):
            if all(t < 0 for t in transitions[state]) and not accepting[state]:
                continue  # not a state the walk can be in
            want = ref(transitions, accepting, state, words, eos)
            assert_equal(impl(transitions, accepting, state, list(words), list(eos)), want,
                         f"token_mask for {pattern!r} at state {state}")


@pytest.mark.exercise("ch10.token_mask")
@pytest.mark.points(2)
def test_token_mask_walks_every_byte_and_allows_eos_only_at_a_match(impl):
    """Pattern "ab": tokens by hand; then inside the engine's TokenIndex (through dispatch): constrained random walks
    with the learner's masks always end in a full match."""
    transitions, accepting, dfa = dfa_table("ab")
    words = [b"a", b"ab", b"b", b"abc", b"", b"x", b"a\x00"]
    eos = [4]
    start = dfa.start
    got = impl(transitions, accepting, start, words, eos)
    assert_equal(got, torch.tensor([True, True, False, False, False, False, False]), 'token_mask("ab") at the start '
                 '(a and ab may come; b, abc, EOS, x and a followed by a zero byte may not)')
    after = dfa.walk(start, b"ab")
    assert_equal(impl(transitions, accepting, after, words, eos),
                 torch.tensor([False, False, False, False, True, False, False]), 'token_mask("ab") after "ab" (EOS only)')
    from minillm.structured import TokenIndex, TokenVocabulary, compile_regex
    r = rng(142)
    words = toy_vocabulary(r) + [b""]
    eos_id = len(words) - 1
    for pattern in PATTERNS[:4]:
        index = TokenIndex(compile_regex(pattern), TokenVocabulary(words, [eos_id]))
        with overriding({"ch10.token_mask": impl}):
            for _ in range(3):
                state, text = index.start, b""
                for _ in range(40):
                    allowed = index.allowed(state).nonzero().flatten().tolist()
                    assert allowed, f"token_mask left no token allowed for {pattern!r} after {text!r}"
                    token = r.choice(allowed)
                    if token == eos_id:
                        break
                    text += words[token]
                    state = index.next_state(state, token)
                    assert state >= 0, f"token_mask allowed {words[token]!r} after {text!r} under {pattern!r}"
                if token == eos_id:  # (a walk may also run out of its 40 tokens mid-way: then it is only alive)
                    assert re.fullmatch(pattern, text.decode()), \
                        f"a walk with your masks under {pattern!r} ended with {text!r}"


# ---- ch10.stack_closure --------------------------------------------------------------------------------------

GRAMMARS = ['root ::= "(" root ")" root | "x" root | ""',
            'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+ | "(" expr ")"',
            'root ::= "[" items? "]"\nitems ::= value ("," items)?\nvalue ::= [a-c] | root | "{" items? "}"',
            'root ::= a b\na ::= "x"? b\nb ::= ("y" a)?']


def closure_cases(r: random.Random):
    """(seeds, eps, calls, exits, tail, max_depth): the NFAs of real grammars with stacks they reach, and random
    graphs with epsilon cycles, calls into the middle of them and tail flags anywhere."""
    from minillm.structured import compile_grammar
    for text in GRAMMARS:
        auto = compile_grammar(text)
        stacks = [stack for states in auto._sets for stack in states]
        for depth in (1, 2, 3, 6, 64):
            seeds = r.sample(stacks, min(3, len(stacks))) + [(auto._eps.index(auto._eps[0]),)]
            yield [s for s in seeds if len(s) <= depth], auto._eps, auto._calls, auto._is_exit, auto._tail, depth
    for _ in range(40):
        n = r.randint(2, 12)
        eps = [[r.randrange(n) for _ in range(r.choice([0, 0, 1, 2]))] for _ in range(n)]
        calls = [[(r.randrange(n), r.randrange(n)) for _ in range(r.choice([0, 0, 0, 1, 2]))] for _ in range(n)]
        exits = [r.random() < 0.3 for _ in range(n)]
        tail = [r.random() < 0.3 for _ in range(n)]
        depth = r.randint(1, 5)
        seeds = [tuple(r.randrange(n) for _ in range(r.randint(1, depth))) for _ in range(r.randint(1, 3))]
        yield seeds, eps, calls, exits, tail, depth


@pytest.mark.exercise("ch10.stack_closure")
@pytest.mark.points(3)
def test_stack_closure_matches_solution(impl, ref):
    for seeds, eps, calls, exits, tail, depth in closure_cases(rng(161)):
        want = set(ref(list(seeds), eps, calls, exits, tail, depth))
        got = impl(list(seeds), copy.deepcopy(eps), copy.deepcopy(calls), list(exits), list(tail), depth)
        assert isinstance(got, (list, tuple)) and all(isinstance(x, tuple) for x in got), \
            f"stack_closure must return a list of tuples, got {type(got).__name__}"
        assert len(got) == len(set(got)), f"stack_closure from {seeds}: a stack comes back twice"
        assert set(got) == want, (f"stack_closure from {seeds} (max_depth {depth}): missing {sorted(want - set(got))[:5]}"
                                  f", extra {sorted(set(got) - want)[:5]}")


@pytest.mark.exercise("ch10.stack_closure")
@pytest.mark.points(2)
def test_stack_closure_runs_a_grammar_exactly(impl):
    """Inside the pushdown automaton (through dispatch): balanced brackets accepted exactly, every prefix alive
    exactly when it can still be completed; tail calls keep a long list at one depth; nesting stops at max_depth."""
    import itertools
    from minillm.structured import DEAD, compile_grammar
    with overriding({"ch10.stack_closure": impl}):
        auto = compile_grammar(GRAMMARS[0])
        for n in range(9):
            for chars in itertools.product("()x", repeat=n):
                text, depth, live = "".join(chars), 0, True
                for c in text:
                    depth += {"(": 1, ")": -1}.get(c, 0)
                    live = live and depth >= 0
                state = auto.walk(auto.start, text.encode())
                assert (state != DEAD) == live, f"{text!r} is {'' if live else 'not '}a prefix of balanced brackets"
                assert auto.is_accepting(state) == (live and depth == 0), f"{text!r}: accepted wrongly"
        items = compile_grammar(GRAMMARS[2])
        state = items.walk(items.start, ("[" + ",".join("abc" * 100) + "]").encode())
        assert items.is_accepting(state) and items.num_states < 40, \
            f"300 list items took {items.num_states} configurations: a tail call must not push"
        nest = compile_grammar(GRAMMARS[2], max_depth=9)
        deepest = max(d for d in range(1, 10) if nest.is_accepting(nest.walk(nest.start, b"[" * d + b"a" + b"]" * d)))
        assert 1 <= deepest < 9 and nest.walk(nest.start, b"[" * 9) == DEAD, \
            "stacks may not grow past max_depth states"


# ---- ch10.lora_delta -----------------------------------------------------------------------------------------

def lora_case(r: random.Random, dtype=torch.float32):
    """A batch of packed rows cut into segments: some with an adapter slot, some with none (-1), a gap of rows in
    no segment, and an empty segment."""
    g = torch.Generator().manual_seed(r.randrange(1 << 30))
    num_slots, rank, k, n = r.randint(1, 4), r.choice([1, 4, 8]), r.randint(3, 40), r.randint(2, 40)
    segments, start = [], 0
    for _ in range(r.randint(1, 6)):
        start += r.choice([0, 0, 2])  # sometimes rows between segments
        length = r.choice([0, 1, 1, 3, 9])
        segments.append((start, length, r.randrange(-1, num_slots)))
        start += length
    rows = start + r.randint(0, 3)
    x = torch.randn(rows, k, generator=g).to(dtype)
    a = torch.randn(num_slots, rank, k, generator=g).to(dtype)
    b = torch.randn(num_slots, n, rank, generator=g).to(dtype)
    y = torch.randn(rows, n, generator=g).to(dtype)
    return x, a, b, segments, y


@pytest.mark.exercise("ch10.lora_delta")
@pytest.mark.points(3)
def test_lora_delta_matches_solution_on_random_batches(impl, ref):
    r = rng(151)
    for case in range(40):
        x, a, b, segments, y = lora_case(r, torch.float32 if case % 4 else torch.bfloat16)
        want = ref(x, a, b, list(segments), y.clone())
        got_y = y.clone()
        got = impl(x, a, b, list(segments), got_y)
        assert got is not None and got.dtype == y.dtype, "lora_delta returns y (in its own dtype)"
        tol = 1e-4 if y.dtype == torch.float32 else 2e-2
        assert_close(got, want, f"lora_delta on segments {segments} ({y.dtype})", atol=tol, rtol=tol)
        assert_close(got_y, want, "lora_delta must update y in place", atol=tol, rtol=tol)
        covered = torch.zeros(y.shape[0], dtype=torch.bool)
        for start, length, slot in segments:
            covered[start:start + length] |= slot >= 0
        assert_equal(got_y[~covered], y[~covered], "rows of slot -1 segments and rows in no segment stay as they are")


@pytest.mark.exercise("ch10.lora_delta")
@pytest.mark.points(2)
def test_lora_delta_serves_each_request_its_own_adapter(impl, tmp_path):
    """Inside the engine (through dispatch): requests with two adapters and none, in one batch, each generate what
    the base model with its adapter merged into the weights generates."""
    from minillm.config import EngineConfig, ModelConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.lora import LoRARequest
    from minillm.lora.adapter import random_adapter, save_adapter
    from minillm.models.llama import LlamaForCausalLM
    from minillm.sampling_params import SamplingParams

    class Bytes:
        eos_token_id = 257

        def decode(self, token_ids, skip_special_tokens=True):
            return bytes(t for t in token_ids if t < 256).decode("utf-8", "replace")

    config = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=257)
    torch.manual_seed(graded_seed(152))
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.5 if "embed" in name else p.shape[-1] ** -0.5)
    adapters = []
    for i, targets in enumerate([("q_proj", "v_proj", "down_proj"), ("k_proj", "o_proj", "gate_proj", "up_proj")]):
        adapter = random_adapter(config, 4, targets=targets, seed=graded_seed(153 + i), std=0.3)
        save_adapter(adapter, tmp_path / f"a{i}")
        adapters.append((LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}")), adapter))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[5, 9, 200], [17] * 7, list(range(40, 52)), [3, 4]]
    loras = [adapters[0][0], None, adapters[1][0], adapters[0][0]]

    def generate(m, requests, **options):
        engine = LLMEngine(m, Bytes(), config, EngineConfig(max_model_len=32, max_num_seqs=4, num_kv_blocks=32,
                                                               block_size=4, **options))
        ids = [engine.add_request(None, p, params, lora_request=q) for p, q in zip(prompts, requests)]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        return [done[i] for i in ids]

    with overriding({"ch10.lora_delta": impl}):
        got = generate(model, loras, enable_lora=True, max_loras=2, max_lora_rank=4)
    packed = {"q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
              "v_proj": ("self_attn.qkv_proj", "v"), "o_proj": ("self_attn.o_proj", None),
              "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
              "down_proj": ("mlp.down_proj", None)}
    for which in (None, 0, 1):
        merged = copy.deepcopy(model)
        if which is not None:
            layers = dict(merged.named_modules())
            with torch.no_grad():
                for (layer, name), module in adapters[which][1].modules.items():
                    linear = layers[f"model.layers.{layer}.{packed[name][0]}"]
                    shard = packed[name][1]
                    offset, size = (0, linear.output_size) if shard is None else linear.shard_slice(shard)
                    linear.weight[offset:offset + size] += module.delta_weight()
        want = generate(merged, [None] * len(prompts))
        for i, request in enumerate(loras):
            if (request is None and which is None) or (request is not None and which is not None
                                                       and request.lora_int_id == which + 1):
                assert got[i] == want[i], (f"request {i} ({'no adapter' if request is None else request.lora_name}) "
                                           f"generated {got[i]}, the merged model {want[i]}")
