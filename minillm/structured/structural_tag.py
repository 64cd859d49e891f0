"""Structural tags: free text with constrained parts switched on by what the model writes (chapter 10).

A model that calls tools writes prose, then `<function=get_weather>{"city": "Paris"}</function>`, then perhaps more
prose. A JSON schema cannot say that; XGrammar's *structural tags* can, and vLLM takes them as
`structured_outputs={"structural_tag": ...}` or `response_format={"type": "structural_tag", ...}`. A structural tag
is a tree of *formats*; minillm compiles the tree into one grammar (grammar.py's rule trees) and runs it on the
pushdown automaton like any other (pushdown.py). The formats read, by their "type":

    const_string {value}                   exactly that text
    json_schema {json_schema}              JSON valid under the schema (json_schema.py's regex)
    regex {pattern} / grammar {grammar}    a regex, or a GBNF grammar (its rules renamed apart from the others')
    any_text                               any text; inside a tag, any text without the tag's end string
    sequence {elements} / or {elements}    one after the other / one of them
    optional / star / plus {content}, repeat {content, min, max}
    tag {begin, content, end}              begin, the content, end
    triggered_tags {triggers, tags, at_least_one, stop_after_first}
                                           free text in which a trigger may appear only as the start of one of the
                                           tags (each tag's begin starts with a trigger): the model chooses when
                                           to call a tool, and once it writes "<function=" the call must be whole
    tags_with_separator {tags, separator, at_least_one, stop_after_first}
                                           tags one after another, the separator between them

and vLLM's first spelling, {"type": "structural_tag", "structures": [{begin, schema, end}], "triggers": [...]},
is the triggered_tags of those structures. "Free text without a string" is the new automaton piece: an Aho-Corasick
automaton over the strings' bytes with the states that complete one left out (grammar tree node ("avoid", [...]),
built in pushdown.py). Token-level formats (token, exclude_token, token_triggered_tags, ...) are refused: minillm's
grammars read bytes, not token ids.
"""
from __future__ import annotations

import json
from typing import Any

from minillm.structured.grammar import (ANY_CHARACTER, Grammar, GrammarError, literal_tree, parse_grammar,
                                       rename_rules)
from minillm.structured.regex_parse import RegexError, parse

MAX_FORMAT_DEPTH = 64  # format objects nested inside each other

_ANY = ("rep", ANY_CHARACTER, 0, None)  # any text


def structural_tag_grammar(spec: dict | str, whitespace: str | None = None) -> Grammar:
    """The grammar of a structural tag (a dict, or its JSON text); GrammarError naming the format at fault."""
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise GrammarError(f"structural_tag is not valid JSON: {err}") from None
    if not isinstance(spec, dict):
        raise GrammarError(f"structural_tag must be a JSON object, got {type(spec).__name__}")
    if spec.get("type", "structural_tag") == "structural_tag" and "structures" in spec:  # vLLM's first spelling
        fmt = {"type": "triggered_tags", "triggers": spec.get("triggers"),
               "tags": [{"type": "tag", "begin": s.get("begin"), "end": s.get("end"),
                         "content": {"type": "json_schema", "json_schema": s.get("schema", True)}}
                        if isinstance(s, dict) else s for s in _list(spec, "structures")]}
    elif spec.get("type", "structural_tag") == "structural_tag":
        fmt = spec.get("format")
        if fmt is None:
            raise GrammarError('structural_tag needs "format" (a format object) or vLLM\'s "structures" and '
                               '"triggers"')
    else:
        fmt = spec  # a bare format object
    return _Builder(whitespace).grammar(fmt)


def _list(fmt: dict, key: str, min_len: int = 1) -> list:
    value = fmt.get(key)
    if not isinstance(value, list) or len(value) < min_len:
        raise GrammarError(f"structural_tag {fmt.get('type', 'format')}: {key!r} must be a list of at least "
                           f"{min_len}, got {value!r}"[:300])
    return value


def _text(fmt: dict, key: str, allow_empty: bool = True) -> str:
    value = fmt.get(key)
    if not isinstance(value, str) or (not allow_empty and not value):
        raise GrammarError(f"structural_tag {fmt.get('type', 'format')}: {key!r} must be a "
                           f"{'' if allow_empty else 'non-empty '}string, got {value!r}"[:300])
    return value


class _Builder:
    def __init__(self, whitespace: str | None):
        self.rules: dict[str, tuple] = {}
        self.whitespace = whitespace

    def grammar(self, fmt: Any) -> Grammar:
        self.rules["root"] = self.node(fmt, stops=(), depth=0)
        return Grammar(text=json.dumps(fmt)[:200], rules=self.rules)

    def node(self, fmt: Any, stops: tuple[str, ...], depth: int) -> tuple:
        """The rule tree of one format object. `stops`: the end strings of the tags around it, which text of
        unlimited length (any_text, triggered_tags' free text) may not contain."""
        if depth > MAX_FORMAT_DEPTH:
            raise GrammarError(f"structural_tag: formats nested more than {MAX_FORMAT_DEPTH} deep")
        if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
            raise GrammarError(f'structural_tag: a format must be an object with a "type", got {fmt!r}'[:300])
        kind, down = fmt["type"], depth + 1
        if kind == "const_string":
            return literal_tree(_text(fmt, "value"))
        if kind == "any_text":
            return ("avoid", list(stops)) if stops else _ANY
        if kind == "json_schema":
            return self.json_schema(fmt)
        if kind == "regex":
            try:
                return parse(_text(fmt, "pattern"))
            except RegexError as err:
                raise GrammarError(f"structural_tag regex: {err}") from None
        if kind == "grammar":
            return self.sub_grammar(_text(fmt, "grammar"))
        if kind in ("sequence", "or"):
            children = [self.node(e, stops, down) for e in _list(fmt, "elements")]
            return ("cat" if kind == "sequence" else "alt", children)
        if kind in ("optional", "star", "plus", "repeat"):
            lo, hi = {"optional": (0, 1), "star": (0, None), "plus": (1, None)}.get(kind, (None, None))
            if kind == "repeat":
                lo, hi = fmt.get("min", 0), fmt.get("max", -1)
                if not isinstance(lo, int) or not isinstance(hi, int) or lo < 0 or (hi != -1 and hi < lo):
                    raise GrammarError(f"structural_tag repeat: min must be an int >= 0 and max -1 or >= min, got "
                                       f"{lo!r} and {hi!r}")
                hi = None if hi == -1 else hi
            return ("rep", self.node(fmt.get("content"), stops, down), lo, hi)
        if kind == "tag":
            return self.tag(fmt, down)
        if kind == "triggered_tags":
            return self.triggered_tags(fmt, stops, down)
        if kind == "tags_with_separator":
            tags = ("alt", [self.tag(t, down) for t in _list(fmt, "tags")])
            separator = literal_tree(_text(fmt, "separator"))
            if fmt.get("stop_after_first"):
                return tags if fmt.get("at_least_one") else ("rep", tags, 0, 1)
            more = ("cat", [tags, ("rep", ("cat", [separator, tags]), 0, None)])
            return more if fmt.get("at_least_one") else ("rep", more, 0, 1)
        raise GrammarError(f"structural_tag format type {kind!r} is not supported: give const_string, "
                           f"json_schema, regex, grammar, any_text, sequence, or, optional, star, plus, repeat, "
                           f"tag, triggered_tags or tags_with_separator (token-level formats need token ids)")

    def tag(self, fmt: Any, depth: int) -> tuple:
        if not isinstance(fmt, dict) or fmt.get("type", "tag") != "tag":
            raise GrammarError(f'structural_tag: expected a {{"type": "tag", ...}} format, got {fmt!r}'[:300])
        begin, end = _text(fmt, "begin"), _text(fmt, "end")
        content = self.node(fmt.get("content"), (end,) if end else (), depth)
        return ("cat", [literal_tree(begin), content, literal_tree(end)])

    def triggered_tags(self, fmt: dict, stops: tuple[str, ...], depth: int) -> tuple:
        triggers = [t for t in _list(fmt, "triggers") if isinstance(t, str) and t]
        if len(triggers) != len(fmt["triggers"]):
            raise GrammarError(f"structural_tag triggered_tags: triggers must be non-empty strings, got "
                               f"{fmt['triggers']!r}"[:300])
        tags = []
        for t in _list(fmt, "tags"):
            begin = t.get("begin") if isinstance(t, dict) else None
            if not isinstance(begin, str) or not any(begin.startswith(trigger) for trigger in triggers):
                raise GrammarError(f"structural_tag triggered_tags: every tag's begin must start with one of the "
                                   f"triggers {triggers}, got {begin!r}")
            tags.append(self.tag(t, depth))
        text = ("avoid", triggers + list(stops))  # a trigger in the free text is the start of a tag, nothing else
        tag = ("alt", tags)
        if fmt.get("stop_after_first"):
            return ("cat", [text, tag if fmt.get("at_least_one") else ("rep", tag, 0, 1)])
        rest = ("rep", ("cat", [tag, text]), 1 if fmt.get("at_least_one") else 0, None)
        return ("cat", [text, rest])

    def json_schema(self, fmt: dict) -> tuple:
        from minillm.structured.json_schema import SchemaError, json_schema_regex
        if fmt.get("style", "json") != "json":
            raise GrammarError(f"structural_tag json_schema style {fmt.get('style')!r} is not supported: only "
                               f"'json'")
        schema = fmt.get("json_schema")
        ws = {} if self.whitespace is None else {"whitespace": self.whitespace}
        try:
            return parse(json_schema_regex(schema if schema is not None else True, **ws))
        except (SchemaError, RegexError) as err:
            raise GrammarError(f"structural_tag json_schema: {err}") from None

    def sub_grammar(self, text: str) -> tuple:
        """A GBNF grammar's root, its rules renamed apart from the rules already built."""
        sub = parse_grammar(text)
        prefix = f"g{len(self.rules)}_"
        names = {name: prefix + name for name in sub.rules}
        for name, tree in sub.rules.items():
            self.rules[names[name]] = rename_rules(tree, names)
        return ("ref", names[sub.root])
