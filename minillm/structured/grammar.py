"""Context-free grammars in GBNF, parsed into rule trees (chapter 10's structured outputs; pushdown.py runs them).

A regular expression cannot count: no regex accepts exactly the balanced parentheses, or JSON nested to any depth.
A context-free grammar can, because a rule may refer to itself. vLLM takes grammars in GBNF, the EBNF dialect of
llama.cpp that xgrammar reads too; minillm reads the same text:

    root   ::= expr
    expr   ::= term (("+" | "-") term)*
    term   ::= factor (("*" | "/") factor)*
    factor ::= [0-9]+ | "(" expr ")"      # a comment runs to the end of the line

A grammar is a list of rules `name ::= body`; the output must match the rule named `root`. A body is built from
    "text" or 'text'   a literal (escapes \\n \\r \\t \\\\ \\" \\' \\xHH \\uHHHH \\UHHHHHHHH, any Unicode),
    [a-z0-9_] [^"\\\\]   a character class, as in a regex (regex_parse.py reads it),
    .                  any character,
    name               another rule (defined anywhere in the grammar),
    ( ... )            a group; `|` between alternatives; `*` `+` `?` `{m}` `{m,}` `{m,n}` `{,n}` after an item.
Names are letters, digits, `-` and `_`. Line breaks are spaces: a rule ends where the next `name ::=` begins.

`parse_grammar` returns each rule as the tree regex_parse.py builds for a regex, ("set", ranges) / ("cat", [...]) /
("alt", [...]) / ("rep", node, lo, hi), plus one new leaf, ("ref", name): a call of another rule. A rule is checked
for what a pushdown automaton cannot run (pushdown.py checks left recursion); here: syntax (GrammarError names the
line and column), rules used but never defined, rules defined twice, and a missing `root`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from minillm.structured.regex_parse import MAX_REPEAT, RegexError, _Parser

MAX_GRAMMAR_CHARS = 200_000  # a grammar's text; its automaton has its own limits (pushdown.py)

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DEFINES = re.compile(r"[A-Za-z0-9_-]+[ \t\r\n]*::=")
_REPEAT = re.compile(r"\{[ \t]*(\d*)[ \t]*(,?)[ \t]*(\d*)[ \t]*\}")
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "[": "[", "]": "]", "/": "/"}
ANY_CHARACTER = ("set", [(0, 0xD7FF), (0xE000, 0x10FFFF)])  # every code point UTF-8 can encode


class GrammarError(RegexError):
    """A grammar outside GBNF as minillm reads it, or one a pushdown automaton cannot run."""


@dataclass
class Grammar:
    """A parsed grammar: rule name -> tree (module docstring), in the order the text defines them."""
    text: str
    rules: dict[str, tuple]
    root: str = "root"


def literal_tree(text: str) -> tuple:
    """The rule tree of exactly `text`."""
    return ("cat", [("set", [(ord(c), ord(c))]) for c in text])


def rename_rules(node: tuple, names: dict[str, str]) -> tuple:
    """A rule tree with its rule references renamed by `names` (to put two grammars' rules side by side)."""
    kind = node[0]
    if kind == "ref":
        return ("ref", names[node[1]])
    if kind in ("cat", "alt"):
        return (kind, [rename_rules(child, names) for child in node[1]])
    if kind == "rep":
        return ("rep", rename_rules(node[1], names), node[2], node[3])
    return node


def json_value_grammar(whitespace: str) -> Grammar:
    """Any JSON value, nested to any depth (`json_object`), with `whitespace` (a regex) between its tokens: the
    JSON grammar below, its string, number and whitespace rules the regexes json_schema.py writes them with."""
    from minillm.structured.json_schema import NUMBER, STRING
    from minillm.structured.regex_parse import parse
    grammar = parse_grammar(_JSON_VALUE)
    grammar.rules.update(string=parse(STRING), number=parse(NUMBER), ws=parse(whitespace))
    return grammar


_JSON_VALUE = """
root   ::= value
value  ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" ws ( member ( ws "," ws member )* )? ws "}"
member ::= string ws ":" ws value
array  ::= "[" ws ( value ( ws "," ws value )* )? ws "]"
string ::= ""
number ::= ""
ws     ::= ""
"""  # string, number and ws are replaced by regex trees


def parse_grammar(text: str) -> Grammar:
    """The rules of a GBNF grammar; GrammarError (naming line and column) for anything this reader refuses."""
    if not isinstance(text, str):
        raise GrammarError(f"grammar must be a str, got {type(text).__name__}")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"grammar is {len(text)} characters long; at most {MAX_GRAMMAR_CHARS} are read")
    return _GrammarParser(text).parse()


class _GrammarParser:
    def __init__(self, text: str):
        self.text, self.i = text, 0
        self.rules: dict[str, tuple] = {}
        self.used: dict[str, int] = {}  # rule name -> where it is first used

    def error(self, message: str, pos: int | None = None) -> GrammarError:
        pos = self.i if pos is None else pos
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return GrammarError(f"grammar: line {line}, column {column}: {message}")

    def skip(self) -> None:
        """Past spaces, line breaks and # comments."""
        while self.i < len(self.text):
            c = self.text[self.i]
            if c in " \t\r\n":
                self.i += 1
            elif c == "#":
                end = self.text.find("\n", self.i)
                self.i = len(self.text) if end < 0 else end + 1
            else:
                return

    def at_rule_start(self) -> bool:
        return _DEFINES.match(self.text, self.i) is not None

    def parse(self) -> Grammar:
        self.skip()
        if self.i >= len(self.text):
            raise self.error("the grammar is empty: define at least `root ::= ...`")
        while self.i < len(self.text):
            start = self.i
            name = _NAME.match(self.text, self.i)
            if name is None or not self.at_rule_start():
                raise self.error("expected a rule: `name ::= ...`")
            if name[0] in self.rules:
                raise self.error(f"rule {name[0]!r} is defined twice", start)
            self.i = self.text.index("::=", self.i) + 3
            self.skip()
            self.rules[name[0]] = self.alternation()
            self.skip()
        for name, pos in self.used.items():
            if name not in self.rules:
                raise self.error(f"rule {name!r} is used but never defined", pos)
        if "root" not in self.rules:
            raise GrammarError("grammar: no rule named 'root' (the rule the whole output must match)")
        return Grammar(self.text, self.rules)

    def alternation(self) -> tuple:
        branches = [self.sequence()]
        while self.i < len(self.text) and self.text[self.i] == "|":
            self.i += 1
            self.skip()
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def sequence(self) -> tuple:
        items = []
        while self.i < len(self.text) and self.text[self.i] not in "|)" and not self.at_rule_start():
            items.append(self.quantified(self.atom()))
            self.skip()
        return items[0] if len(items) == 1 else ("cat", items)

    def quantified(self, node: tuple) -> tuple:
        bounds = self.repeat_bounds()
        if bounds is None:
            return node
        if self.repeat_bounds() is not None:
            raise self.error("two repeat operators in a row: group the item first, e.g. (x*)?")
        return ("rep", node, *bounds)

    def repeat_bounds(self) -> tuple[int, int | None] | None:
        c = self.text[self.i] if self.i < len(self.text) else ""
        if c in ("*", "+", "?") and c:
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        m = _REPEAT.match(self.text, self.i)
        if m is None or not (m[1] or m[3]):
            raise self.error("a repeat is {m}, {m,}, {m,n} or {,n}")
        lo = int(m[1]) if m[1] else 0
        hi = lo if not m[2] else (int(m[3]) if m[3] else None)
        if max(lo, hi or 0) > MAX_REPEAT:
            raise self.error(f"repeat bound in {m[0]} exceeds {MAX_REPEAT}")
        if hi is not None and lo > hi:
            raise self.error(f"min repeat greater than max repeat in {m[0]}")
        self.i = m.end()
        return lo, hi

    def atom(self) -> tuple:
        c, start = self.text[self.i], self.i
        if c in "\"'":
            return self.literal(c)
        if c == "[":
            return self.char_class()
        if c == ".":
            self.i += 1
            return ANY_CHARACTER
        if c == "(":
            self.i += 1
            self.skip()
            node = self.alternation()
            if self.i >= len(self.text) or self.text[self.i] != ")":
                raise self.error("unbalanced parenthesis: missing ')'", start)
            self.i += 1
            return node
        name = _NAME.match(self.text, self.i)
        if name is None:
            raise self.error(f"unexpected {c!r}: expected a literal, a class, '.', '(' or a rule name")
        self.i = name.end()
        self.used.setdefault(name[0], start)
        return ("ref", name[0])

    def literal(self, quote: str) -> tuple:
        start, self.i, chars = self.i, self.i + 1, []
        while True:
            if self.i >= len(self.text) or self.text[self.i] == "\n":
                raise self.error("unterminated string literal", start)
            c = self.text[self.i]
            if c == quote:
                self.i += 1
                break
            if c == "\\":
                chars.append(self.escape())
            else:
                chars.append(c)
                self.i += 1
        for ch in chars:
            if 0xD800 <= ord(ch) <= 0xDFFF:
                raise self.error(f"surrogate U+{ord(ch):04X} has no UTF-8 encoding", start)
        return literal_tree("".join(chars))

    def escape(self) -> str:
        pos, c = self.i, self.text[self.i + 1:self.i + 2]
        if c in _ESCAPES:
            self.i += 2
            return _ESCAPES[c]
        digits = {"x": 2, "u": 4, "U": 8}.get(c)
        code = self.text[self.i + 2:self.i + 2 + digits] if digits else ""
        if not digits or len(code) != digits or any(d not in "0123456789abcdefABCDEF" for d in code):
            raise self.error(f"bad escape \\{c}" + (f" (needs {digits} hex digits)" if digits else ""), pos)
        if int(code, 16) > 0x10FFFF:
            raise self.error(f"code point {code} is past U+10FFFF", pos)
        self.i += 2 + digits
        return chr(int(code, 16))

    def char_class(self) -> tuple:
        """A [...] class: its text, up to the first unescaped `]` after the first item, read as a regex class."""
        start, j = self.i, self.i + 1
        j += self.text.startswith("^", j)
        first = True
        while j < len(self.text) and (self.text[j] != "]" or first):
            if self.text[j] == "\n":
                break
            j += 2 if self.text[j] == "\\" else 1
            first = False
        if j >= len(self.text) or self.text[j] != "]":
            raise self.error("unterminated character class", start)
        try:
            ranges = _Parser(self.text[start:j + 1]).char_class()
        except RegexError as err:
            raise self.error(f"character class {self.text[start:j + 1]}: {err}", start) from None
        self.i = j + 1
        return ("set", ranges)
