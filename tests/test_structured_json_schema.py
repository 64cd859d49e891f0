"""JSON schema -> regex (minillm/structured/json_schema.py): valid instances match, invalid ones do not, and every
string a random walk of the DFA accepts parses and satisfies the schema."""
from __future__ import annotations

import itertools
import json
import random
import re
from collections import deque

import pytest

from minillm.structured.json_schema import SchemaError, choice_regex, json_schema_regex, json_value_regex
from minillm.structured.regex_dfa import DEAD, compile_regex

PERSON = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 20},
    "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string", "format": "email"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "β", "中文"]}, "maxItems": 3}}}
NESTED = {"type": "object", "required": ["point", "ok", "note"], "properties": {
    "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]},
    "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 5}}}
REFS = {"$defs": {"item": {"type": "object", "required": ["id"], "properties": {
            "id": {"type": "integer"}, "when": {"type": "string", "format": "date"}}}},
        "type": "object", "required": ["items", "status"], "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 2},
            "status": {"anyOf": [{"const": "ok"}, {"type": "integer"}], "description": "ignored"}}}
TUPLE = {"type": "array", "prefixItems": [{"type": "string", "format": "uuid"}, {"type": "integer"}],
         "items": False, "minItems": 1}
FORMATS = {"type": "object", "required": ["d", "t", "dt"], "properties": {
    "d": {"type": "string", "format": "date"}, "t": {"type": "string", "format": "time"},
    "dt": {"type": "string", "format": "date-time"}}}
MAP = {"type": "object", "additionalProperties": {"type": "integer"}}
PATTERN = {"type": "object", "properties": {"code": {"type": "string", "pattern": r"^[A-Z]{2}-\d{3}$"}},
           "required": ["code"]}
ENUM = {"enum": ["café", 1, None, {"a": [1, 2]}, 'x"y']}
OPTIONAL = {"type": "object", "properties": {k: {"type": "integer"} for k in "abc"}}
ANY = True

CASES = [  # schema, valid instances, invalid JSON texts
    (PERSON, [{"name": "Zoë"}, {"name": "x", "age": 3, "tags": ["β", "中文"]}, {"name": "a b", "email": "a.b@c.io"}],
     ['{"age": 3}', '{"name": ""}', '{"name": "x", "age": "3"}', '{"name": "x", "extra": 1}',
      '{"name": "x", "tags": ["a", "a", "a", "a"]}', '{"age": 3, "name": "x"}', '{"name": "x", "tags": ["b"]}']),
    (NESTED, [{"point": {"x": 1.5, "y": -2e3}, "ok": True, "note": None}, {"point": {"x": 0, "y": 1}, "ok": False, "note": "hé"}],
     ['{"point": {"x": 1}, "ok": true, "note": null}', '{"point": {"x": 1, "y": 2}, "ok": 1, "note": null}',
      '{"point": {"x": 01, "y": 2}, "ok": true, "note": null}', '{"point": {"x": 1, "y": 2}, "ok": true, "note": "toolong"}']),
    (REFS, [{"items": [{"id": 1}], "status": "ok"}, {"items": [{"id": 1, "when": "2024-02-29"}, {"id": -7}], "status": 3}],
     ['{"items": [], "status": "ok"}', '{"items": [{"id": 1}, {"id": 2}, {"id": 3}], "status": "ok"}',
      '{"items": [{"id": 1}], "status": "bad"}', '{"items": [{"id": 1, "when": "2024-13-01"}], "status": 1}']),
    (TUPLE, [["123e4567-e89b-12d3-a456-426614174000"], ["123e4567-e89b-12d3-a456-426614174000", 5]],
     ['[]', '["123e4567-e89b-12d3-a456-426614174000", 5, 6]', '["not-a-uuid"]', '[5]']),
    (FORMATS, [{"d": "2024-01-31", "t": "23:59:59", "dt": "2024-01-31T08:00:00Z"},
               {"d": "1999-12-01", "t": "00:00:00.5+01:00", "dt": "2024-01-31T08:00:00.123-05:30"}],
     ['{"d": "2024-1-31", "t": "23:59:59", "dt": "2024-01-31T08:00:00Z"}',
      '{"d": "2024-01-31", "t": "24:00:00", "dt": "2024-01-31T08:00:00Z"}',
      '{"d": "2024-01-31", "t": "23:59:59", "dt": "2024-01-31T08:00:00"}']),
    (MAP, [{}, {"a": 1}, {"a": 1, "é": -2, "a\"b": 0}], ['{"a": "1"}', '{1: 1}', '{"a": 1,}', '[]']),
    (PATTERN, [{"code": "AB-123"}], ['{"code": "ab-123"}', '{"code": "AB-1234"}', '{}']),
    (ENUM, ["café", 1, None, {"a": [1, 2]}, 'x"y'], ['"cafe"', "2", '{"a": [2, 1]}', '"x\\u0022y"', '{"a": [1, 2], "b": 1}']),
    (OPTIONAL, [{}], ['{"b": 1, "a": 2}', '{"a": 1, "a": 1}', '{"d": 1}', '{,}']),
    (ANY, [None, 1, "x", [1, {"a": 2}], {"k": [True, None]}, []], ['{"a": [[[]]]}', "[1,]", "'x'", "01"]),
]


def _texts(instance) -> list[str]:
    """json.dumps forms with the chosen canonical separators, compact, and other whitespace within the bound
    (non-ASCII kept as itself, as the enum/const canonical form writes it)."""
    return [json.dumps(instance, ensure_ascii=False), json.dumps(instance, ensure_ascii=False, separators=(",", ":")),
            json.dumps(instance, ensure_ascii=False, separators=(" ,\n", " :\t"))]


def _accepts(dfa, text: str) -> bool:
    return dfa.is_accepting(dfa.walk(dfa.start, text.encode()))


def _max_depth(schema) -> int:
    return 2 if schema is ANY else 4


@pytest.mark.parametrize("schema,valid,invalid", CASES, ids=[str(i) for i in range(len(CASES))])
def test_valid_match_invalid_do_not(schema, valid, invalid):
    regex = json_schema_regex(schema, max_depth=_max_depth(schema))
    dfa = compile_regex(regex)
    python = re.compile(regex)
    for instance in valid:
        for text in _texts(instance):
            assert _accepts(dfa, text) and python.fullmatch(text), text
    for text in invalid:
        assert not _accepts(dfa, text) and not python.fullmatch(text), text


@pytest.mark.parametrize("schema,names", [(OPTIONAL, "abc"), (PERSON, ["age", "email", "tags"])])
def test_every_subset_of_optional_properties_in_order(schema, names):
    dfa = compile_regex(json_schema_regex(schema))
    values = {"a": 1, "b": 2, "c": 3, "age": 4, "email": "x@y.fr", "tags": []}
    base = {"name": "n"} if schema is PERSON else {}
    for k in range(len(names) + 1):
        for chosen in itertools.combinations(names, k):
            instance = dict(base, **{n: values[n] for n in chosen})
            if schema is PERSON:
                instance = {n: instance[n] for n in ["name", "age", "email", "tags"] if n in instance}
            assert _accepts(dfa, json.dumps(instance)), instance
            if len(chosen) > 1:
                swapped = dict(base, **{n: values[n] for n in reversed(chosen)})
                assert not _accepts(dfa, json.dumps(swapped)), swapped


def _completion(dfa, state) -> bytes:
    """The shortest byte string from `state` to an accepting state (BFS)."""
    parent = {state: None}
    queue = deque([state])
    while queue:
        s = queue.popleft()
        if dfa.is_accepting(s):
            out = bytearray()
            while parent[s] is not None:
                s, byte = parent[s]
                out.append(byte)
            return bytes(reversed(out))
        for byte, n in enumerate(dfa.transitions(s)):
            if n != DEAD and n not in parent:
                parent[n] = (s, byte)
                queue.append(n)
    raise AssertionError("a live state with no way to accept")


def random_accepted(dfa, rng: random.Random, soft_limit: int = 80) -> bytes:
    """Random live bytes until accepting; past `soft_limit` bytes, the shortest way to accept."""
    state, out = dfa.start, bytearray()
    while not (dfa.is_accepting(state) and (not dfa.can_continue(state) or rng.random() < 0.25)):
        if len(out) >= soft_limit:
            tail = _completion(dfa, state)
            return bytes(out + tail)
        live = [b for b, n in enumerate(dfa.transitions(state)) if n != DEAD]
        byte = rng.choice(live)
        out.append(byte)
        state = dfa.next_state(state, byte)
    return bytes(out)


_FORMAT_CHECKS = {
    "date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "time": r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d+)?(Z|[+-]([01]\d|2[0-3]):[0-5]\d)?",
    "date-time": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)",
    "uuid": r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}",
    "email": r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}",
}


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def satisfies(value, schema, root, depth_left: int = 4) -> bool:
    """A tiny validator for the keywords json_schema_regex supports (numeric bounds ignored, as there)."""
    if schema is True or schema == {}:
        return _depth(value) <= depth_left
    if "$ref" in schema:
        return satisfies(value, root[schema["$ref"].split("/")[1]][schema["$ref"].split("/")[2]], root, depth_left)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return any(satisfies(value, s, root, depth_left) for s in schema[key])
    if "enum" in schema or "const" in schema:
        allowed = schema.get("enum", [schema.get("const")])
        return json.dumps(value) in [json.dumps(v) for v in allowed]
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return any(_satisfies_type(value, t, schema, root, depth_left) for t in types)


def _satisfies_type(value, kind, schema, root, depth_left) -> bool:
    python = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "null": type(None),
              "object": dict, "array": list}[kind]
    if not isinstance(value, python) or (isinstance(value, bool) and kind in ("integer", "number")):
        return False
    if kind == "string":
        fmt = _FORMAT_CHECKS.get(schema.get("format"), schema.get("pattern", "").strip("^$") or None)
        return (schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 10 ** 9)
                and (fmt is None or re.fullmatch(fmt, value, re.ASCII) is not None))
    if kind == "object":
        props = schema.get("properties")
        if props is None:
            extra = schema.get("additionalProperties", True)
            return all(satisfies(v, extra, root, depth_left - 1) for v in value.values())
        order = [k for k in props if k in value]
        return (list(value) == order and all(r in value for r in schema.get("required", []))
                and all(satisfies(value[k], props[k], root, depth_left - 1) for k in value))
    if kind == "array":
        prefix, items = schema.get("prefixItems", []), schema.get("items", True)
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 10 ** 9):
            return False
        return all(satisfies(v, prefix[i] if i < len(prefix) else items, root, depth_left - 1)
                   for i, v in enumerate(value)) and (items is not False or len(value) <= len(prefix))
    return True


@pytest.mark.parametrize("schema", [c[0] for c in CASES], ids=[str(i) for i in range(len(CASES))])
def test_random_walks_accept_only_valid_json(schema):
    dfa = compile_regex(json_schema_regex(schema, max_depth=_max_depth(schema)))
    rng = random.Random(7)
    for _ in range(25):
        text = random_accepted(dfa, rng).decode("utf-8")
        value = json.loads(text)
        root = schema if isinstance(schema, dict) else {}
        assert satisfies(value, schema, root, _max_depth(schema)), text


def test_schema_as_json_string_and_empty_schema():
    assert json_schema_regex(json.dumps(PERSON)) == json_schema_regex(PERSON)
    assert json_schema_regex({}) == json_schema_regex(True) == json_value_regex(4)


def test_string_escapes_are_json_escapes():
    dfa = compile_regex(json_schema_regex({"type": "string", "maxLength": 3}))
    for text in [r'"Zo\u00eb"', r'"\"\\\/"', r'"\b\f\n"', '"\u2028é😀"']:
        assert _accepts(dfa, text), text
    for text in [r'"\x41"', '"a\nb"', r'"\u12"', '"abcd"', '"\x00"']:
        assert not _accepts(dfa, text), text


def test_numeric_bounds_are_accepted_and_ignored():
    dfa = compile_regex(json_schema_regex({"type": "integer", "minimum": 0, "maximum": 10}))
    assert _accepts(dfa, "-5") and _accepts(dfa, "100") and not _accepts(dfa, "1.5")


def test_json_value_depth():
    flat, deep = compile_regex(json_value_regex(1)), compile_regex(json_value_regex(2))
    assert _accepts(flat, '{"a": 1, "b": [1]}') is False and _accepts(deep, '{"a": 1, "b": [1]}')
    assert _accepts(flat, '[1, "x", null]') and _accepts(flat, "{}")
    scalars = compile_regex(json_value_regex(0))
    assert _accepts(scalars, "-0.5e+3") and not _accepts(scalars, "[]")


def test_choices():
    options = ["yes", "no", "peut-être", "a|b (c)*", ""]
    dfa = compile_regex(choice_regex(options))
    assert all(_accepts(dfa, o) for o in options)
    assert not _accepts(dfa, "ye") and not _accepts(dfa, "a") and not _accepts(dfa, "yesno")
    for bad in ([], ["a", 1], "abc"):
        with pytest.raises(ValueError):
            choice_regex(bad)


@pytest.mark.parametrize("schema,pointer,keyword", [
    ({"type": "object", "patternProperties": {"^a": {}}}, "#/patternProperties", "patternProperties"),
    ({"properties": {"a/b": {"if": {}}}}, "#/properties/a~1b/if", "if"),
    ({"not": {"type": "null"}}, "#/not", "not"),
    ({"type": "object", "dependentRequired": {}}, "#/dependentRequired", "dependentRequired"),
    ({"type": "array", "items": {"multipleOf": 2}}, "#/items/multipleOf", "multipleOf"),
    ({"type": "object", "minProperties": 1}, "#/minProperties", "minProperties"),
    ({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
     "#/$defs/n/properties/next/$ref", "recursive"),
    ({"$ref": "#/$defs/missing"}, "#/$ref", "does not resolve"),
    ({"$ref": "other.json#/x"}, "#/$ref", "$ref"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "#/allOf", "exactly one"),
    ({"type": "string", "format": "hostname"}, "#/format", "hostname"),
    ({"type": "string", "maxLength": 5000}, "#/maxLength", "0..1000"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "#", "minItems"),
    ({"type": "color"}, "#/type", "type"),
    ({"properties": {"a": False}}, "#/properties/a", "nothing"),
    ({"type": "string", "pattern": "a(?=b)"}, "#/pattern", "lookaround"),
    ({"type": "string", "pattern": "a", "maxLength": 2}, "#", "pattern"),
    ({"enum": ["a"], "minLength": 1}, "#", "enum"),
    ({"type": "array", "items": [{"type": "string"}]}, "#/items", "prefixItems"),
])
def test_unsupported_parts_name_their_pointer(schema, pointer, keyword):
    with pytest.raises(SchemaError) as info:
        json_schema_regex(schema)
    assert f"schema at {pointer}:" in str(info.value) and keyword in str(info.value)


def test_bad_schema_text():
    with pytest.raises(SchemaError, match="not valid JSON"):
        json_schema_regex("{type: string}")
