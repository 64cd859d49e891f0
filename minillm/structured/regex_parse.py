"""Parsing a regular expression into a tree over code-point sets, and code points into UTF-8 byte ranges
(chapter 10's structured outputs).

The first half of the regex compiler (regex_dfa.py is the second): `parse` turns a pattern in a subset of
Python `re` syntax into a tree of ("set", ranges) / ("cat", [...]) / ("alt", [...]) / ("rep", node, lo, hi)
nodes, where a set is a sorted list of inclusive code-point ranges, and `utf8_sequences` turns a code-point
range into the byte-range sequences that encode exactly it (RE2's construction: split where the UTF-8
length changes, at 0x7F, 0x7FF and 0xFFFF, then where the continuation bytes stop running over their full
0x80-0xBF span). So `[^"]`, which covers about 1.1 million code points, becomes a dozen short byte-range
chains, never an enumeration. Surrogates (D800-DFFF) have no UTF-8 encoding and are left out.

See regex_dfa.py for the supported syntax and what is refused.
"""
from __future__ import annotations

import re

MAX_REPEAT = 1000  # keeps {m,n} expansion (one NFA copy per repetition) bounded
MAX_CODE_POINT = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)

_DIGIT = [(0x30, 0x39)]
_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE = [(0x09, 0x0D), (0x20, 0x20)]  # \t \n \v \f \r and space
_SIMPLE_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B}
_REPEAT = re.compile(r"\{(\d*)(,?)(\d*)\}")
_SPECIAL = set("\\.^$*+?{}[]|()-#&~")


class RegexError(ValueError):
    """A pattern outside the supported subset, or one whose automaton grows past its limits."""


def escape(text: str) -> str:
    """`text` as a pattern matching exactly itself (valid for this module and for Python's `re`)."""
    out = []
    for ch in text:
        if ch in _SPECIAL:
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


# ---- code-point sets: sorted, disjoint, non-adjacent lists of inclusive (lo, hi) ranges ----

def _normalize(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _negate(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, nxt = [], 0
    for lo, hi in _normalize(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODE_POINT:
        out.append((nxt, MAX_CODE_POINT))
    return out


def utf8_sequences(lo: int, hi: int) -> list[tuple[tuple[int, int], ...]]:
    """The code points lo..hi (surrogates excluded) as byte-range sequences, one per encoding shape."""
    out: list[tuple[tuple[int, int], ...]] = []
    s_lo, s_hi = _SURROGATES
    if lo <= s_hi and hi >= s_lo:
        if lo < s_lo:
            _split_utf8(lo, s_lo - 1, out)
        if hi > s_hi:
            _split_utf8(s_hi + 1, hi, out)
    else:
        _split_utf8(lo, hi, out)
    return out


def _split_utf8(lo: int, hi: int, out: list) -> None:
    for bound in (0x7F, 0x7FF, 0xFFFF):  # a sequence may not mix encodings of different lengths
        if lo <= bound < hi:
            _split_utf8(lo, bound, out)
            _split_utf8(bound + 1, hi, out)
            return
    if hi <= 0x7F:
        out.append(((lo, hi),))
        return
    for i in (1, 2, 3):
        # Once the leading bytes differ, every trailing continuation byte must span its full 0x80-0xBF,
        # else the byte ranges' cross product would hold code points outside lo..hi: split until it does.
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                _split_utf8(lo, lo | m, out)
                _split_utf8((lo | m) + 1, hi, out)
                return
            if hi & m != m:
                _split_utf8(lo, (hi & ~m) - 1, out)
                _split_utf8(hi & ~m, hi, out)
                return
    out.append(tuple(zip(chr(lo).encode(), chr(hi).encode())))


# ---- parsing ----

def parse(pattern: str):
    """The pattern's tree; RegexError names the position of anything unsupported."""
    return _Parser(pattern).parse()


def anchored_span(pattern: str) -> tuple[int, int]:
    """(start, end) of `pattern` without a leading `^` and an unescaped trailing `$` (no-ops under full-match)."""
    start, end = int(pattern.startswith("^")), len(pattern)
    if pattern.endswith("$") and end > start:
        backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
        if backslashes % 2 == 0:  # an escaped "\$" is a literal dollar
            end -= 1
    return start, end


class _Parser:
    def __init__(self, pattern: str):
        self.p = pattern
        self.i, self.end = anchored_span(pattern)

    def error(self, msg: str, pos: int | None = None) -> RegexError:
        return RegexError(f"regex {self.p!r}: position {self.i if pos is None else pos}: {msg}")

    def parse(self):
        node = self.alternation()
        if self.i < self.end:
            raise self.error("unbalanced parenthesis: ')' without '('")
        return node

    def alternation(self):
        branches = [self.concat()]
        while self.i < self.end and self.p[self.i] == "|":
            self.i += 1
            branches.append(self.concat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concat(self):
        items = []
        while self.i < self.end and self.p[self.i] not in "|)":
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else ("cat", items)

    def repeat_bounds(self) -> tuple[int, int | None] | None:
        """The quantifier at self.i as (min, max or None), consuming it; None when there is none."""
        c = self.p[self.i] if self.i < self.end else ""
        if c in ("*", "+", "?") and c:
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        m = _REPEAT.match(self.p, self.i, self.end) if c == "{" else None
        if m is None or not (m[1] or m[2]):  # "{" that is no quantifier is a literal, as in Python
            return None
        start, self.i = self.i, m.end()
        lo = int(m[1]) if m[1] else 0
        hi = lo if not m[2] else (int(m[3]) if m[3] else None)
        if max(lo, hi or 0) > MAX_REPEAT:
            raise self.error(f"repeat bound in {m[0]} exceeds {MAX_REPEAT}", start)
        if hi is not None and lo > hi:
            raise self.error(f"min repeat greater than max repeat in {m[0]}", start)
        return lo, hi

    def quantified(self, node):
        pos = self.i
        bounds = self.repeat_bounds()
        if bounds is None:
            return node
        if self.i < self.end and self.p[self.i] == "?":
            self.i += 1  # lazy: same language
        elif self.i < self.end and self.p[self.i] == "+":
            raise self.error("possessive quantifiers are not supported")
        if self.repeat_bounds() is not None:
            raise self.error("multiple repeat", pos)
        return ("rep", node, bounds[0], bounds[1])

    def atom(self):
        c, pos = self.p[self.i], self.i
        if c == "(":
            return self.group()
        if c == "[":
            return ("set", self.char_class())
        if c == ".":
            self.i += 1
            return ("set", _negate([(0x0A, 0x0A)]))
        if c == "\\":
            item = self.escape(in_class=False)
            return ("set", item if isinstance(item, list) else [(item, item)])
        if c in "^$":
            raise self.error(f"anchor {c!r} is only supported as the pattern's very "
                             f"{'first' if c == '^' else 'last'} character")
        if self.repeat_bounds() is not None:
            raise self.error("nothing to repeat", pos)
        self.i += 1
        return ("set", [(self.code_point(c, pos),) * 2])

    def code_point(self, ch: str, pos: int) -> int:
        cp = ord(ch)
        if _SURROGATES[0] <= cp <= _SURROGATES[1]:
            raise self.error(f"surrogate U+{cp:04X} has no UTF-8 encoding", pos)
        return cp

    def group(self):
        start = self.i
        self.i += 1
        if self.p.startswith("?", self.i):
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.p.startswith("?P<", self.i):
                close = self.p.find(">", self.i)
                if close < 0 or not self.p[self.i + 3:close].isidentifier():
                    raise self.error("bad group name", start)
                self.i = close + 1
            else:
                what = ("lookaround" if self.p.startswith(("?=", "?!", "?<=", "?<!"), self.i) else
                        "backreference" if self.p.startswith("?P=", self.i) else "this group syntax (flags?)")
                raise self.error(f"{what} is not supported", start)
        node = self.alternation()
        if self.i >= self.end or self.p[self.i] != ")":
            raise self.error("unbalanced parenthesis: missing ')'", start)
        self.i += 1
        return node

    def hex_escape(self, digits: int, pos: int) -> int:
        text = self.p[self.i:self.i + digits]
        if len(text) != digits or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise self.error(f"escape needs {digits} hex digits", pos)
        self.i += digits
        cp = int(text, 16)
        if cp > MAX_CODE_POINT:
            raise self.error(f"code point {cp:#x} is past U+10FFFF", pos)
        return self.code_point(chr(cp), pos)

    def escape(self, in_class: bool) -> int | list[tuple[int, int]]:
        """The escape at self.i: a code point, or a list of ranges for \\d \\D \\w \\W \\s \\S."""
        pos = self.i
        if self.i + 1 >= self.end:
            raise self.error("bad escape (end of pattern)")
        c = self.p[self.i + 1]
        self.i += 2
        classes = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
        if c.lower() in classes:
            ranges = classes[c.lower()]
            return ranges if c.islower() else _negate(ranges)
        if c in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[c]
        if c == "b" and in_class:
            return 0x08
        if c == "0":
            if self.i < self.end and self.p[self.i].isdigit():
                raise self.error("octal escapes are not supported", pos)
            return 0
        if c in "xuU":
            return self.hex_escape({"x": 2, "u": 4, "U": 8}[c], pos)
        if c.isdigit():
            raise self.error(f"backreference \\{c} is not supported", pos)
        if c in "bBAZ":
            raise self.error(f"\\{c} (an anchor or word boundary) is not supported", pos)
        if c.isascii() and c.isalnum():
            raise self.error(f"bad escape \\{c}", pos)
        return self.code_point(c, pos + 1)

    def class_item(self) -> int | list[tuple[int, int]]:
        if self.p[self.i] == "\\":
            return self.escape(in_class=True)
        self.i += 1
        return self.code_point(self.p[self.i - 1], self.i - 1)

    def char_class(self) -> list[tuple[int, int]]:
        start = self.i
        self.i += 1
        negate = self.i < self.end and self.p[self.i] == "^"
        self.i += negate
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.i >= self.end:
                raise self.error("unterminated character set", start)
            if self.p[self.i] == "]" and not first:
                self.i += 1
                break
            first, pos = False, self.i
            lo = self.class_item()
            if self.p.startswith("-", self.i) and self.i + 1 < self.end and self.p[self.i + 1] != "]":
                self.i += 1
                hi = self.class_item()
                if isinstance(lo, list) or isinstance(hi, list) or lo > hi:
                    raise self.error(f"bad character range {self.p[pos:self.i]}", pos)
                ranges.append((lo, hi))
            else:
                ranges.extend(lo if isinstance(lo, list) else [(lo, lo)])
        return _negate(ranges) if negate else _normalize(ranges)
