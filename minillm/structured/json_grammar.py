"""JSON schemas that recurse, as grammars (chapter 10's structured outputs).

json_schema.py writes a schema as a regex, which is exact while the schema is regular. Two things are not: a
`$ref` that reaches itself (a tree, a linked list, a Pydantic model that holds its own type) and a value of any
shape (`{}`, `true`, a property without a schema), whose objects and arrays may nest without bound. json_schema.py
refuses the first and cuts the second at a few levels; here both become rules of a grammar (grammar.py), run on
the pushdown automaton (pushdown.py):

- the schema's regex is written as before, except that a recursive `$ref` (to `#/$defs/<name>`,
  `#/definitions/<name>` or `#`, the whole schema) and an any-value write a *placeholder*, one private-use
  character per rule (U+F0000 up), where the rule is used;
- each placeholder's rule body is written the same way (a definition's regex, with its own recursion a
  placeholder again), and any-values share one JSON value grammar (grammar.json_value_grammar);
- every regex is parsed into a tree (regex_parse.py) and each placeholder leaf becomes a call of its rule.

A schema that needs no rule stays a regex and runs on the DFA, as before (`json_schema_automaton` picks).
"""
from __future__ import annotations

import json
from typing import Any

from minillm.structured.grammar import Grammar, json_value_grammar, rename_rules
from minillm.structured.json_schema import WHITESPACE, SchemaError, _Builder
from minillm.structured.regex_parse import parse

PLACEHOLDER = 0xF0000  # Supplementary Private Use Area-A: the first rule's placeholder character


def json_schema_automaton(schema: dict | bool | str, whitespace: str = WHITESPACE, max_states: int = 20_000):
    """The automaton of a JSON schema: a ByteDFA (regex_dfa.py) when the schema is regular, else a
    PushdownAutomaton (pushdown.py) of its grammar. SchemaError / RegexError as json_schema_regex."""
    from minillm.structured.pushdown import compile_grammar
    from minillm.structured.regex_dfa import compile_regex
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SchemaError(f"schema is not valid JSON: {e}") from None
    builder = _RuleBuilder(schema, whitespace)
    root = builder.value(schema, [], 0)
    if not builder.rule_names:
        return compile_regex(root, max_states)
    return compile_grammar(builder.grammar(root), max_states)


class _RuleBuilder(_Builder):
    """json_schema's regex writer, with rules where a regex cannot go on (the module docstring)."""

    def __init__(self, root: Any, whitespace: str):
        super().__init__(root, whitespace, max_depth=0)
        if any(ord(c) >= PLACEHOLDER for c in json.dumps(root, ensure_ascii=False) + whitespace):
            raise SchemaError(f"schema: characters U+{PLACEHOLDER:X} and up are reserved for the schema grammar's "
                              f"rules (Supplementary Private Use Areas)")
        self.rule_names: list[str] = []  # placeholder k stands for rule rule_names[k]
        self.targets: dict[str, str] = {}  # rule name -> the $ref it expands ("" for the any-value rule)

    def placeholder(self, name: str, ref: str) -> str:
        if name not in self.targets:
            self.targets[name] = ref
            self.rule_names.append(name)
        return f"\\U{PLACEHOLDER + self.rule_names.index(name):08X}"

    def any_value(self, depth: int) -> str:
        return self.placeholder("any_root", "")  # the root of the JSON value grammar, renamed below

    def ref(self, ref: Any, path: list, depth: int) -> str:
        if ref == "#":
            return self.placeholder("root", "#")
        if ref in self.resolving:  # recursion: a call of the definition's rule
            return self.placeholder("ref " + ref, ref)  # (the whole pointer: $defs/x and definitions/x differ)
        return super().ref(ref, path, depth)

    def grammar(self, root: str) -> Grammar:
        """The root regex and every rule it (transitively) uses, as one grammar."""
        regexes, done = {"root": root}, 0
        while done < len(self.rule_names):
            name, ref = self.rule_names[done], self.targets[self.rule_names[done]]
            done += 1
            if ref in ("", "#"):
                continue
            self.resolving = [ref]  # inside its own body, the definition calls itself
            regexes[name] = self.value(*self.definition(ref, []), 0)
        calls = {PLACEHOLDER + k: name for k, name in enumerate(self.rule_names)}
        rules = {name: _calls(parse(regex), calls) for name, regex in regexes.items()}
        if "any_root" in self.targets:  # one JSON value grammar, its rules renamed apart ("root" -> "any_root")
            values = json_value_grammar(self.ws)
            names = {name: "any_" + name for name in values.rules}
            rules.update({names[n]: rename_rules(t, names) for n, t in values.rules.items()})
        return Grammar(text=json.dumps(self.root)[:200], rules=rules)


def _calls(node: tuple, calls: dict[int, str]) -> tuple:
    """A regex tree with each placeholder character replaced by a call of its rule."""
    kind = node[0]
    if kind == "set":
        ranges = node[1]
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1] and ranges[0][0] in calls:
            return ("ref", calls[ranges[0][0]])
        return node
    if kind in ("cat", "alt"):
        return (kind, [_calls(child, calls) for child in node[1]])
    return ("rep", _calls(node[1], calls), node[2], node[3])
