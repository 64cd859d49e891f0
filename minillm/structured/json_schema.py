"""JSON Schema -> regular expression, so that a schema-constrained output is a regex-constrained one (chapter 10).

A JSON document of bounded nesting is a regular language, so the structured-output machinery needs only
one automaton (regex_dfa.py). This module writes the regex; nothing here runs at decode time.

How each part becomes a regex:
- strings: `"`, then characters other than `"`, `\\` and U+0000-U+001F, or the escapes `\\" \\\\ \\/ \\b \\f \\n
  \\r \\t \\uXXXX`, then `"`. `minLength`/`maxLength` count characters, an escape counting as one (a
  `\\uXXXX` surrogate pair counts as two). `format` date, time, date-time, uuid, email use simple forms
  (`_FORMATS`). `pattern` is embedded between the quotes with its own `^`/`$` stripped and is matched in
  full (not searched, unlike JSON Schema) against the string's JSON text *as written*: escapes are not
  decoded first, so a pattern should not admit `"`, `\\` or control characters.
- integer / number: the JSON number grammar. `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`
  are accepted and ignored: a numeric range is regular but its regex is unwieldy in general.
- enum / const: a scalar exactly as `json.dumps(value, ensure_ascii=False)` writes it (non-ASCII characters
  as themselves, not `\\uXXXX`); an object or array with its members in the given order and the
  `whitespace` regex between tokens, so json.dumps' default `", "`/`": "` and compact forms both match.
- objects: the listed properties in the schema's order, any subset of the optional ones. A[i] (nothing
  written yet) = p_i B[i+1] if p_i is required, else (p_i B[i+1] | A[i+1]); B[i] (something written) puts a
  comma before each of p_i, p_i+1, ... making the optional ones `(, p)?`. That is quadratic in the number of
  leading optional properties, not exponential. With `properties`, only listed keys are generated (an
  `additionalProperties` there is ignored; a `required` key not in `properties` comes last, any value);
  without `properties`, any string keys, their values per `additionalProperties`.
- arrays: `prefixItems` then `items`, with `minItems`/`maxItems` as nested optionals and `{m,n}` counts.
- `anyOf`/`oneOf` become alternation (oneOf's exclusivity is not enforced), `allOf` must have one member,
  `$ref` may point to `#/$defs/...` or `#/definitions/...`; a recursive `$ref` is refused here (a recursive
  schema is context-free, not regular: json_grammar.py writes it as a grammar, which the engine runs). `True`
  or `{}` is any JSON value whose objects/arrays nest at most `max_depth` levels, counted from the document's
  root (json_grammar.py: any depth).

Whitespace between tokens follows the `whitespace` regex, by default at most two of space, newline, tab:
with unbounded whitespace a model can fall into emitting newlines forever, since whitespace is always
allowed and often likely; a bound forces it to make progress. Anything else (patternProperties, if, not,
dependentRequired, minProperties, multipleOf, ...) raises SchemaError naming the JSON pointer and keyword.
"""
from __future__ import annotations

import json
from typing import Any

from minillm.structured.regex_parse import MAX_REPEAT, RegexError, anchored_span, escape, parse

WHITESPACE = r"[ \n\t]{0,2}"
_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
STRING = f'"{_CHAR}*"'
INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_DATE = r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
_OFFSET = r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_FORMATS = {
    "date": _DATE,
    "time": f"{_TIME}{_OFFSET}?",
    "date-time": f"{_DATE}T{_TIME}{_OFFSET}",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
}
_SCALARS = {"integer": INTEGER, "number": NUMBER, "boolean": "(?:true|false)", "null": "null"}
_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")
_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "$defs",
                "definitions", "deprecated", "readOnly", "writeOnly"}
_IGNORED = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_BY_TYPE = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "string": {"minLength", "maxLength", "pattern", "format"},
}
_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")
_KEYWORDS = ({"type", "enum", "const", *_COMBINATORS} | _ANNOTATIONS | _IGNORED
             | set().union(*_BY_TYPE.values()))


class SchemaError(ValueError):
    """A schema (or part of one) this module cannot turn into a regex; names the JSON pointer and keyword."""


def _pointer(path: list) -> str:
    return "#" + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _literal(value: Any) -> str:
    return escape(json.dumps(value, ensure_ascii=False))


def json_value_regex(max_depth: int = 2, whitespace: str = WHITESPACE) -> str:
    """Any JSON value whose objects and arrays nest at most `max_depth` deep (0: scalars only)."""
    if not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be an int >= 0, got {max_depth!r}")
    ws, scalars = whitespace, f'{STRING}|{NUMBER}|true|false|null'
    value = f"(?:{scalars})"
    for _ in range(max_depth):
        member = f"{STRING}{ws}:{ws}{value}"
        obj = rf"\{{{ws}(?:{member}(?:{ws},{ws}{member})*)?{ws}\}}"
        arr = rf"\[{ws}(?:{value}(?:{ws},{ws}{value})*)?{ws}\]"
        value = f"(?:{scalars}|{obj}|{arr})"
    return value


def choice_regex(choices: list[str]) -> str:
    """Exactly one of `choices` (escaped literally)."""
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ValueError(f"choices must be a non-empty list of str, got {choices!r}")
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise ValueError(f"choices must all be str, got {bad[0]!r} ({type(bad[0]).__name__})")
    return "(?:" + "|".join(escape(c) for c in choices) + ")"


def json_schema_regex(schema: dict | bool | str, whitespace: str = WHITESPACE, max_depth: int = 4) -> str:
    """A regex matching JSON texts valid under `schema` (a dict, True, or a JSON string of one)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SchemaError(f"schema is not valid JSON: {e}") from None
    if not isinstance(max_depth, int) or max_depth < 0:
        raise ValueError(f"max_depth must be an int >= 0, got {max_depth!r}")
    return _Builder(schema, whitespace, max_depth).value(schema, [], 0)


class _Builder:
    def __init__(self, root: Any, whitespace: str, max_depth: int):
        self.root, self.ws, self.max_depth = root, whitespace, max_depth
        self.resolving: list[str] = []  # the $refs being expanded, to catch recursion

    def error(self, path: list, keyword: str, msg: str) -> SchemaError:
        return SchemaError(f"schema at {_pointer(path)}: {f'{keyword!r}: ' if keyword else ''}{msg}")

    def any_value(self, depth: int) -> str:
        return json_value_regex(max(self.max_depth - depth, 0), self.ws)

    def value(self, schema: Any, path: list, depth: int) -> str:
        """The regex for one value described by `schema`, at `path`, inside `depth` objects/arrays."""
        if schema is True:
            return self.any_value(depth)
        if not isinstance(schema, dict):
            what = "false matches nothing" if schema is False else f"a schema is a dict or bool, not {schema!r}"
            raise self.error(path, "", what)
        unknown = [k for k in schema if k not in _KEYWORDS]
        if unknown:
            raise self.error(path + [unknown[0]], unknown[0], "unsupported keyword")
        present = [k for k in schema if k not in _ANNOTATIONS and k not in _IGNORED]
        for key in ("enum", "const", *_COMBINATORS):
            if key in schema:
                others = [k for k in present if k != key and k != "type"]
                if others:
                    raise self.error(path, key, f"cannot be combined with {others[0]!r}")
        if "$ref" in schema:
            return self.ref(schema["$ref"], path + ["$ref"], depth)
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            if not isinstance(values, list) or not values:
                raise self.error(path, "enum", f"must be a non-empty list, got {values!r}")
            return "(?:" + "|".join(self.constant(v) for v in values) + ")"
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                members = schema[key]
                if not isinstance(members, list) or not members or (key == "allOf" and len(members) != 1):
                    need = "exactly one schema" if key == "allOf" else "a non-empty list of schemas"
                    raise self.error(path + [key], key, f"must be {need}, got {members!r}")
                return "(?:" + "|".join(self.value(m, path + [key, i], depth) for i, m in enumerate(members)) + ")"
        types = schema.get("type")
        if types is None:
            types = [t for t in ("object", "array", "string") if _BY_TYPE[t] & set(schema)]
            if not types:
                return self.any_value(depth)
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
            raise self.error(path + ["type"], "type", f"must be one of {list(_TYPES)} or a list of them, got {types!r}")
        branches = [self.typed(t, schema, path, depth) for t in types]
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    def constant(self, value: Any) -> str:
        ws = self.ws
        if isinstance(value, dict):
            members = f"{ws},{ws}".join(f"{_literal(k)}{ws}:{ws}{self.constant(v)}" for k, v in value.items())
            return rf"\{{{ws}{members}{ws}\}}"
        if isinstance(value, list):
            return rf"\[{ws}{f'{ws},{ws}'.join(self.constant(v) for v in value)}{ws}\]"
        return _literal(value)

    def definition(self, ref: Any, path: list) -> tuple[Any, list]:
        """The schema a `$ref` points to, and its path; SchemaError if it is not one minillm resolves."""
        parts = ref.split("/") if isinstance(ref, str) else []
        if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
            raise self.error(path, "$ref", f"only '#/$defs/<name>' and '#/definitions/<name>' are supported, got {ref!r}")
        name = parts[2].replace("~1", "/").replace("~0", "~")
        defs = self.root.get(parts[1]) if isinstance(self.root, dict) else None
        if not isinstance(defs, dict) or name not in defs:
            raise self.error(path, "$ref", f"{ref!r} does not resolve")
        return defs[name], [parts[1], name]

    def ref(self, ref: Any, path: list, depth: int) -> str:
        schema, where = self.definition(ref, path)
        if ref in self.resolving:
            raise self.error(path, "$ref", f"{ref!r} is recursive; a recursive schema is not a regular language")
        self.resolving.append(ref)
        try:
            return self.value(schema, where, depth)
        finally:
            self.resolving.pop()

    def count(self, schema: dict, key: str, path: list, default: int | None) -> int | None:
        value = schema.get(key, default)
        if value is not default and (not isinstance(value, int) or isinstance(value, bool)
                                     or not 0 <= value <= MAX_REPEAT):
            raise self.error(path + [key], key, f"must be an int in 0..{MAX_REPEAT}, got {value!r}")
        return value

    def typed(self, kind: str, schema: dict, path: list, depth: int) -> str:
        if kind in _SCALARS:
            return _SCALARS[kind]
        if kind == "object":
            return self.object(schema, path, depth)
        if kind == "array":
            return self.array(schema, path, depth)
        return self.string(schema, path)

    def string(self, schema: dict, path: list) -> str:
        given = [k for k in ("pattern", "format") if k in schema]
        if given:
            others = [k for k in ("pattern", "format", "minLength", "maxLength") if k in schema and k != given[0]]
            if others:
                raise self.error(path, given[0], f"cannot be combined with {others[0]!r}")
            text = schema[given[0]]
            if given[0] == "format":
                if text not in _FORMATS:
                    raise self.error(path + ["format"], "format", f"{text!r} unsupported; supported: {sorted(_FORMATS)}")
                return f'"{_FORMATS[text]}"'
            if not isinstance(text, str):
                raise self.error(path + ["pattern"], "pattern", f"must be a str, got {text!r}")
            start, end = anchored_span(text)
            text = text[start:end]
            try:
                parse(text)
            except RegexError as e:
                raise self.error(path + ["pattern"], "pattern", str(e)) from None
            return f'"(?:{text})"'
        lo = self.count(schema, "minLength", path, 0)
        hi = self.count(schema, "maxLength", path, None)
        if hi is not None and lo > hi:
            raise self.error(path, "minLength", f"minLength {lo} > maxLength {hi}")
        if lo == 0 and hi is None:
            return STRING
        return f'"{_CHAR}{{{lo},{"" if hi is None else hi}}}"'

    def object(self, schema: dict, path: list, depth: int) -> str:
        ws = self.ws
        props = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(props, dict):
            raise self.error(path + ["properties"], "properties", f"must be an object, got {props!r}")
        if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
            raise self.error(path + ["required"], "required", f"must be a list of str, got {required!r}")
        names = list(props) + [r for r in dict.fromkeys(required) if r not in props]
        if names:
            members = []
            for name in names:
                sub = props.get(name, True)
                value = self.value(sub, path + ["properties", name], depth + 1)
                members.append((f"{_literal(name)}{ws}:{ws}{value}", name in required))
            return rf"\{{{ws}{self.members(members)}{ws}\}}"
        extra = schema.get("additionalProperties", True)
        if extra is False:
            return rf"\{{{ws}\}}"
        value = self.value(extra, path + ["additionalProperties"], depth + 1)
        member = f"{STRING}{ws}:{ws}{value}"
        return rf"\{{{ws}(?:{member}(?:{ws},{ws}{member})*)?{ws}\}}"

    def members(self, members: list[tuple[str, bool]]) -> str:
        """Any in-order subset of `members` (regex, required) that holds every required one, comma-separated."""
        sep = f"{self.ws},{self.ws}"
        after = [""] * (len(members) + 1)  # B[i]: members i.. when something came before (each after a comma)
        for i in range(len(members) - 1, -1, -1):
            regex, req = members[i]
            after[i] = (f"{sep}{regex}" if req else f"(?:{sep}{regex})?") + after[i + 1]
        first = ""  # A[i]: members i.. when nothing came before (the first one written has no comma)
        for i in range(len(members) - 1, -1, -1):
            regex, req = members[i]
            first = f"{regex}{after[i + 1]}" if req else f"(?:{regex}{after[i + 1]}|{first})"
        return first

    def array(self, schema: dict, path: list, depth: int) -> str:
        ws = self.ws
        prefix_schemas = schema.get("prefixItems", [])
        if not isinstance(prefix_schemas, list):
            raise self.error(path + ["prefixItems"], "prefixItems", f"must be a list of schemas, got {prefix_schemas!r}")
        items = schema.get("items", True)
        if isinstance(items, list):
            raise self.error(path + ["items"], "items", "a list of schemas is the old tuple form; use prefixItems")
        prefix = [self.value(s, path + ["prefixItems", i], depth + 1) for i, s in enumerate(prefix_schemas)]
        item = None if items is False else self.value(items, path + ["items"], depth + 1)
        lo = self.count(schema, "minItems", path, 0)
        hi = self.count(schema, "maxItems", path, None)
        if item is None:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        if hi is not None and lo > hi:
            raise self.error(path, "minItems", f"minItems {lo} > the most items allowed ({hi})")
        sep = f"{ws},{ws}"

        def tail(i: int) -> str:  # elements i.. each after a comma
            if hi is not None and i >= hi:
                return ""
            if i < len(prefix):
                part = f"{sep}{prefix[i]}{tail(i + 1)}"
                return part if i < lo else f"(?:{part})?"
            need = max(lo - i, 0)
            out = f"(?:{sep}{item}){{{need}}}" if need else ""
            if hi is None:
                return out + f"(?:{sep}{item})*"
            return out + (f"(?:{sep}{item}){{0,{hi - i - need}}}" if hi - i - need else "")

        if hi == 0:
            return rf"\[{ws}\]"
        body = (prefix[0] if prefix else item) + tail(1)
        return rf"\[{ws}{body if lo >= 1 else f'(?:{body})?'}{ws}\]"
