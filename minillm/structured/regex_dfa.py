"""Regular expression -> byte-level NFA -> lazily built DFA: the automaton structured outputs run on (chapter 10).

A model's tokens are byte strings (a token may hold half of a UTF-8 character), so the automaton reads
**bytes** of the UTF-8 text, not characters. Compiling a pattern takes three steps:

1. Parse (regex_parse.py) a subset of Python `re` syntax into a tree whose leaves are code-point sets,
   and turn each set into the byte-range sequences encoding exactly its code points (RE2's UTF-8 ranges).
2. Thompson's construction over bytes: one NFA state per position, epsilon edges for `|`, `?`, `*` and
   concatenation, byte-range edges for the leaves. `{m,n}` copies its operand n times (n <= 1000).
3. Subset construction, lazily: a DFA state is the frozenset of NFA states the bytes so far can be in, and
   all 256 transitions of a state are computed the first time one is asked for, then cached. Only states
   a decode actually visits are built, which keeps patterns such as `[^"]{0,1000}` usable.

Before step 3 we keep only NFA states from which the accepting state is reachable (co-reachability on the
reversed graph). A DFA state is therefore non-empty exactly when some continuation still matches, and a
byte that could never lead to a match goes to DEAD at once: a token is allowed iff walking its bytes does
not reach DEAD. DFA states hold only the NFA states that matter (those with a live byte edge, and the
accepting one), so two subsets differing in bookkeeping states are one DFA state.

Semantics: `re.fullmatch` on the UTF-8 text, with these differences from Python's str patterns. `\\d`, `\\w`,
`\\s` are ASCII ([0-9], [A-Za-z0-9_], [ \\t\\n\\r\\f\\v], as under `re.ASCII`), since a mask must not depend on
Unicode tables. `^` is accepted only as the first character and `$` only as the last (under full-match both
are no-ops). Lazy quantifiers (`*?`, `{m,n}?`) describe the same language as greedy ones. Supported:
literals (any Unicode), `\\d \\D \\w \\W \\s \\S \\n \\t \\r \\f \\v \\0 \\xhh \\uhhhh \\Uhhhhhhhh`, escaped punctuation,
`.` (any code point but `\\n`), classes `[...]`/`[^...]` with ranges and escapes (`\\b` in a class is
backspace, as in Python), groups `( )`, `(?: )`, `(?P<name> )`, `|`, `* + ? {m} {m,} {m,n} {,n}`.
Refused with RegexError naming the pattern and the 0-based position: backreferences, lookaround, flag
groups, `\\b \\B \\A \\Z`, anchors elsewhere, possessive quantifiers, octal escapes, unbalanced parentheses,
bad ranges, nothing to repeat, `{m,n}` with m > n or a bound over 1000.
"""
from __future__ import annotations

from minillm.structured.regex_parse import RegexError, escape, parse, utf8_sequences

DEAD = -1
MAX_NFA_STATES = 1_000_000

__all__ = ["DEAD", "ByteDFA", "LazyAutomaton", "RegexError", "compile_regex", "escape"]


class _NFA:
    """Thompson NFA over bytes: eps[s] lists epsilon targets, edges[s] lists (lo, hi, target) byte ranges."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int, int]]] = []
        self.start, self.accept = self.build(parse(pattern))

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise RegexError(f"regex {self.pattern[:200]!r}: the NFA needs more than {MAX_NFA_STATES} states "
                             f"(nested or large {{m,n}} repeats?)")
        self.eps.append([])
        self.edges.append([])
        return len(self.eps) - 1

    def build(self, node) -> tuple[int, int]:
        """A fragment for `node`: (entry state, exit state), the exit with no edges yet."""
        kind = node[0]
        if kind == "set":
            start, end = self.new(), self.new()
            for lo, hi in node[1]:
                for seq in utf8_sequences(lo, hi):
                    cur = start
                    for k, (b_lo, b_hi) in enumerate(seq):
                        nxt = end if k == len(seq) - 1 else self.new()
                        self.edges[cur].append((b_lo, b_hi, nxt))
                        cur = nxt
            return start, end
        if kind == "cat":
            start = cur = self.new()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[cur].append(s)
                cur = e
            return start, cur
        if kind == "alt":
            start, end = self.new(), self.new()
            for child in node[1]:
                s, e = self.build(child)
                self.eps[start].append(s)
                self.eps[e].append(end)
            return start, end
        _, child, lo, hi = node
        start = cur = self.new()
        for _ in range(lo):
            s, e = self.build(child)
            self.eps[cur].append(s)
            cur = e
        end = self.new()
        if hi is None:  # cur is the loop's hub: enter the body, come back, or leave
            s, e = self.build(child)
            self.eps[cur] += [s, end]
            self.eps[e].append(cur)
            return start, end
        for _ in range(hi - lo):  # x{0,3} = (x(x(x)?)?)?: every copy may be the last
            s, e = self.build(child)
            self.eps[cur] += [s, end]
            cur = e
        self.eps[cur].append(end)
        return start, end

    def live(self) -> list[bool]:
        """Which states can reach the accepting state (so a match can still complete from them)."""
        rev: list[list[int]] = [[] for _ in self.eps]
        for s, (eps, edges) in enumerate(zip(self.eps, self.edges)):
            for t in eps:
                rev[t].append(s)
            for _, _, t in edges:
                rev[t].append(s)
        live = [False] * len(self.eps)
        live[self.accept] = True
        stack = [self.accept]
        while stack:
            for s in rev[stack.pop()]:
                if not live[s]:
                    live[s] = True
                    stack.append(s)
        return live


class LazyAutomaton:
    """A byte automaton determinized lazily (the base of ByteDFA here and of pushdown.PushdownAutomaton). A state
    is an interned frozenset of *items* (NFA states; a grammar's stacks), and all 256 transitions of a state are
    computed the first time one is asked for, then cached. A subclass says what an item does: `_moves(items)`,
    its byte-range moves (lo, hi, next item); `_closure(seeds)`, the items reached without reading a byte, kept
    to those that matter; `_accepts(items)`; and `_can_read(item)`, whether it has a byte to read."""

    def __init__(self, max_states: int):
        self.max_states = max_states
        self._sets: list[frozenset] = []
        self._ids: dict[frozenset, int] = {}
        self._rows: list[list[int] | None] = []
        self._accepting: list[bool] = []

    def _too_many(self) -> Exception:
        return RegexError(f"regex {self.pattern[:200]!r}: the DFA needs more than max_states={self.max_states} "
                          f"states")

    def _intern(self, items: frozenset) -> int:
        if not items:
            return DEAD
        sid = self._ids.get(items)
        if sid is None:
            if len(self._sets) >= self.max_states:
                raise self._too_many()
            sid = self._ids[items] = len(self._sets)
            self._sets.append(items)
            self._rows.append(None)
            self._accepting.append(self._accepts(items))
        return sid

    def transitions(self, state: int) -> list[int]:
        """All 256 successors of `state` (DEAD where a byte cannot continue a match), built once."""
        row = self._rows[state]
        if row is not None:
            return row
        moves = self._moves(self._sets[state])
        # Bytes between consecutive range boundaries behave alike: one closure per segment, not per byte.
        cuts = sorted({0, 256} | {lo for lo, _, _ in moves} | {hi + 1 for _, hi, _ in moves})
        row = [DEAD] * 256
        for a, b in zip(cuts, cuts[1:]):
            targets = [t for lo, hi, t in moves if lo <= a <= hi]
            if targets:
                row[a:b] = [self._intern(self._closure(targets))] * (b - a)
        self._rows[state] = row
        return row

    def next_state(self, state: int, byte: int) -> int:
        """The state after `byte`; DEAD when no match can continue."""
        if state < 0:
            return DEAD
        row = self._rows[state]
        return (row if row is not None else self.transitions(state))[byte]

    def walk(self, state: int, data: bytes) -> int:
        """The state after all of `data`; DEAD as soon as a byte fails."""
        for byte in data:
            if state < 0:
                return DEAD
            row = self._rows[state]
            state = (row if row is not None else self.transitions(state))[byte]
        return state

    def is_accepting(self, state: int) -> bool:
        """Whether the bytes read so far fully match."""
        return state >= 0 and self._accepting[state]

    def can_continue(self, state: int) -> bool:
        """Whether some non-empty byte string leads on to an accepting state (any live byte edge does)."""
        return state >= 0 and any(self._can_read(item) for item in self._sets[state])

    @property
    def num_states(self) -> int:
        """States built so far (the automaton is built lazily, so this grows as it is used)."""
        return len(self._sets)


class ByteDFA(LazyAutomaton):
    """A lazily determinized byte automaton for one pattern. States are ints; DEAD (-1) is no match."""

    def __init__(self, nfa: _NFA, max_states: int):
        super().__init__(max_states)
        self.pattern = nfa.pattern
        live = nfa.live()
        self._eps, self._accept = nfa.eps, nfa.accept
        self._edges = [[e for e in edges if live[e[2]]] for edges in nfa.edges]  # only edges that can match
        self._keep = [bool(self._edges[s]) or s == nfa.accept for s in range(len(live))]
        self.start = self._intern(self._closure([nfa.start]))

    def _closure(self, seeds) -> frozenset[int]:
        seen, stack = set(seeds), list(seeds)
        while stack:
            for t in self._eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        return frozenset(s for s in seen if self._keep[s])

    def _moves(self, states: frozenset[int]) -> list[tuple[int, int, int]]:
        return [e for s in states for e in self._edges[s]]

    def _accepts(self, states: frozenset[int]) -> bool:
        return self._accept in states

    def _can_read(self, s: int) -> bool:
        return bool(self._edges[s])


def compile_regex(pattern: str, max_states: int = 20_000) -> ByteDFA:
    """The byte DFA of `pattern` (full-match semantics over its UTF-8 text); RegexError if unsupported."""
    if not isinstance(pattern, str):
        raise RegexError(f"regex must be a str, got {type(pattern).__name__}")
    if max_states < 1:
        raise ValueError(f"max_states must be >= 1, got {max_states}")
    return ByteDFA(_NFA(pattern), max_states)
