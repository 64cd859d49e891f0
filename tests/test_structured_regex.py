"""The byte-level regex DFA (minillm/structured/regex_dfa.py) against Python's re.fullmatch as the oracle."""
from __future__ import annotations

import random
import re
from collections import deque

import pytest

from minillm.structured.regex_dfa import DEAD, RegexError, compile_regex, escape
from minillm.structured.regex_parse import utf8_sequences

PATTERNS = [
    "", "a", "abc", "a|b|", "(a|bc)*d", "[a-c]+", "[^a-c]*", "[^\n]?", ".*", ".+@.", r"\d+", r"\D{2}", r"\w*",
    r"\W", r"\s?x", r"\S+", "a{2}", "a{2,}", "a{,2}", "a{1,3}b", "(ab){0,2}", "(?:é|€)+", "[é-ü]+", "[^é€]*",
    "😀|a", "[😀-🙏]", r"[\u00e0-\u00ff]{1,2}", r"\x41\u00e9\U0001F600", r"[\d.]+", r"[a\-z]", "[-a]", "[a-]",
    "a*?b+?c??", "(?P<x>a)(?P<y>b)?", r"\$\.\*", "^a+$", "[]a]", "x{", "{a}", r"\n\t", r"[\s\S]", "(a|b)*abb",
    "[^a]", r"(\w+@)?[^\W\d]{1,3}", r"[\0-\x1f]", "(|a)+", "(a*)*b", r"[^\x00-\x7f]+", "é{2,3}",
]
ALPHABET = "ab c1_-.@é€😀\n\tzA9$*üÿ\x00🙏"


def _matches(dfa, text: str) -> bool:
    return dfa.is_accepting(dfa.walk(dfa.start, text.encode()))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_agrees_with_re_fullmatch(pattern):
    dfa = compile_regex(pattern)
    rng = random.Random(pattern)
    texts = ["", "a", "ab", "abb", "aab", "é", "éé", "ééé", "€", "😀", "x{", "{a}", "$.*", "\n\t", "]", "-"]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 6))) for _ in range(300)]
    for text in texts:
        expected = re.fullmatch(pattern, text, re.ASCII) is not None
        assert _matches(dfa, text) == expected, (pattern, text)
        if expected:  # every byte prefix of a match is live, including those inside a character
            data = text.encode()
            assert all(dfa.walk(dfa.start, data[:k]) != DEAD for k in range(len(data) + 1))


def _reachable(dfa) -> list[int]:
    seen, queue = {dfa.start}, deque([dfa.start])
    while queue:
        for nxt in dfa.transitions(queue.popleft()):
            if nxt != DEAD and nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return sorted(seen)


@pytest.mark.parametrize("pattern", ["ab?", "a{2,4}(b|cd)?", "[^a]{1,2}", "(x|y)*z?", ".", r"é\d{0,2}", r"[α-ω]+!?"])
def test_every_live_state_reaches_acceptance_and_can_continue_is_exact(pattern):
    dfa = compile_regex(pattern)
    states = _reachable(dfa)
    accepting = {s for s in states if dfa.is_accepting(s)}
    for s in states:
        successors = [n for n in dfa.transitions(s) if n != DEAD]
        assert dfa.can_continue(s) == bool(successors), (pattern, s)
        # pruning: from every non-DEAD state some byte string reaches an accepting state
        seen, queue = {s}, deque([s])
        while queue and not (seen & accepting):
            for n in dfa.transitions(queue.popleft()):
                if n != DEAD and n not in seen:
                    seen.add(n)
                    queue.append(n)
        assert seen & accepting, (pattern, s)
    assert dfa.num_states == len(states)


def test_accepting_and_continuing_on_a_small_language():
    dfa = compile_regex("ab?")
    a, ab = dfa.walk(dfa.start, b"a"), dfa.walk(dfa.start, b"ab")
    assert (dfa.is_accepting(dfa.start), dfa.can_continue(dfa.start)) == (False, True)
    assert (dfa.is_accepting(a), dfa.can_continue(a)) == (True, True)
    assert (dfa.is_accepting(ab), dfa.can_continue(ab)) == (True, False)
    assert dfa.walk(dfa.start, b"abb") == DEAD and dfa.next_state(ab, ord("b")) == DEAD
    assert not dfa.is_accepting(DEAD) and not dfa.can_continue(DEAD) and dfa.walk(DEAD, b"") == DEAD


def test_partial_utf8_is_live_only_when_it_can_complete():
    dot = compile_regex(".")
    assert dot.walk(dot.start, b"\xf0\x9f\x98") != DEAD  # 3 of the 4 bytes of U+1F600
    assert dot.is_accepting(dot.walk(dot.start, b"\xf0\x9f\x98\x80"))
    for bad in (b"\x80", b"\xc0", b"\xc1", b"\xf5", b"\xed\xa0", b"\xf4\x90", b"\xe0\x80", b"\xf0\x80", b"\n"):
        assert dot.walk(dot.start, bad) == DEAD, bad  # stray continuation, overlong, surrogate, past U+10FFFF
    e_acute = compile_regex("é")
    assert e_acute.walk(e_acute.start, b"\xc3") != DEAD and e_acute.walk(e_acute.start, b"\xc3\xa8") == DEAD
    neg = compile_regex("[^€]")
    assert neg.walk(neg.start, b"\xe2\x82") != DEAD  # still \xe2\x82\xad etc.
    assert neg.walk(neg.start, b"\xe2\x82\xac") == DEAD  # exactly €


def test_utf8_sequences_cover_exactly_the_range():
    rng = random.Random(0)
    cases = [(0, 0x7F), (0x7F, 0x80), (0x7FF, 0x800), (0xD7F0, 0xE010), (0xFFF0, 0x10010), (0x10FF00, 0x10FFFF)]
    cases += [(lo, lo + rng.randint(0, 3000)) for lo in (rng.randint(0, 0x10F000) for _ in range(20))]
    for lo, hi in cases:
        seqs = utf8_sequences(lo, hi)
        covered = sum(_prod(b - a + 1 for a, b in seq) for seq in seqs)
        expected = [cp for cp in range(lo, hi + 1) if not 0xD800 <= cp <= 0xDFFF]
        assert covered == len(expected), (lo, hi)
        for cp in expected[:: max(1, len(expected) // 200)]:
            data = chr(cp).encode()
            assert any(len(seq) == len(data) and all(a <= x <= b for x, (a, b) in zip(data, seq)) for seq in seqs)


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def test_negated_class_is_not_enumerated():
    dfa = compile_regex(r"[^\x00-\x1f\"\\]{0,1000}")  # ~1.1M code points, 1000 copies: builds at once
    assert _matches(dfa, "héllo 😀 " * 50) and not _matches(dfa, 'a"')
    assert not _matches(dfa, "x" * 1001)


def test_escape_round_trips():
    for text in ["a.b*c", "(x|y)", "[]{}^$\\", "tab\tnl\n\x00", "é😀-#&~ "]:
        pattern = escape(text)
        assert re.fullmatch(pattern, text) and _matches(compile_regex(pattern), text)


@pytest.mark.parametrize("pattern,position,words", [
    (r"(a)\1", 3, "backreference"), ("(?P<n>a)(?P=n)", 8, "backreference"), ("a(?=b)", 1, "lookaround"),
    ("(?<!a)b", 0, "lookaround"), ("(?i)a", 0, "not supported"), (r"\bword", 0, "\\b"), (r"a\B", 1, "\\B"),
    (r"\Aa", 0, "\\A"), (r"a\Z", 1, "\\Z"), ("a^b", 1, "anchor"), ("a$b", 1, "anchor"), ("(a", 0, "missing ')'"),
    ("a)", 1, "unbalanced"), ("[z-a]", 1, "bad character range"), (r"[\d-z]", 1, "bad character range"),
    ("*a", 0, "nothing to repeat"), ("a|+", 2, "nothing to repeat"), ("(?:{2})", 3, "nothing to repeat"),
    ("a{3,2}", 1, "min repeat greater"), ("a{1001}", 1, "exceeds 1000"), ("a{2,1001}", 1, "exceeds 1000"),
    ("a**", 1, "multiple repeat"), ("a*+", 2, "possessive"), ("[abc", 0, "unterminated"), (r"\q", 0, "bad escape"),
    (r"\x4", 0, "hex digits"), (r"\01", 0, "octal"), ("a\\", 1, "bad escape"), (r"\ud800", 0, "surrogate"),
])
def test_refusals_name_the_position(pattern, position, words):
    with pytest.raises(RegexError) as info:
        compile_regex(pattern)
    message = str(info.value)
    assert f"position {position}:" in message and words in message and repr(pattern) in message


def test_max_states_is_enforced():
    dfa = compile_regex("(a|b)*a(a|b){8}", max_states=50)  # "a 9th from the end" needs 2^9 states
    with pytest.raises(RegexError, match="max_states=50"):
        _reachable(dfa)
