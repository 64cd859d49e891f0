"""Context-free grammars for structured outputs (minillm/structured/grammar.py, pushdown.py): GBNF parsed with errors
that name line and column; the pushdown automaton accepts exactly the grammar's language and kills a byte exactly
where no completion is left; tail calls keep the stack flat; token masks equal a walk token by token."""
from __future__ import annotations

import itertools
import json
import random

import pytest

from minillm.structured import DEAD, GrammarError, TokenIndex, TokenVocabulary, compile_grammar, parse_grammar
from minillm.structured.token_index import token_mask

PARENS = 'root ::= "(" root ")" root | ""'  # balanced parentheses: the language no regex describes
JSON = r'''
root    ::= ws value ws
value   ::= object | array | string | number | "true" | "false" | "null"
object  ::= "{" ws ( member ( ws "," ws member )* ws )? "}"
member  ::= string ws ":" ws value
array   ::= "[" ws ( value ( ws "," ws value )* ws )? "]"
string  ::= "\"" ( [^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number  ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
ws      ::= [ \t\n\r]*
'''


def balanced_prefix(text: str) -> tuple[bool, bool]:
    """(text can still be completed, text is complete) for balanced parentheses."""
    depth = 0
    for c in text:
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False, False
    return True, depth == 0


def accepts(automaton, text: str | bytes) -> bool:
    data = text.encode() if isinstance(text, str) else text
    return automaton.is_accepting(automaton.walk(automaton.start, data))


def test_balanced_parentheses_exactly_every_prefix_and_every_string():
    g = compile_grammar(PARENS)
    for n in range(11):
        for chars in itertools.product("()", repeat=n):
            text = "".join(chars)
            live, complete = balanced_prefix(text)
            state = g.walk(g.start, text.encode())
            assert (state != DEAD) == live and g.is_accepting(state) == complete, text
    assert g.walk(g.start, b"(x") == DEAD


def random_json(rng: random.Random, depth: int):
    if depth == 0 or rng.random() < 0.2:
        return rng.choice([0, -12, 3.5e-7, 1e21, True, False, None, "", "a\"b\\c\n\u00e9\u4e2d\U0001F600", "x" * 5])
    if rng.random() < 0.5:
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}\u00fc": random_json(rng, depth - 1) for i in range(rng.randint(0, 3))}


def loads_strictly(text: str) -> bool:
    def refuse(name):
        raise ValueError(name)
    try:
        json.loads(text, parse_constant=refuse)
        return True
    except ValueError:
        return False


def test_json_nested_deeper_than_any_regex_and_mutations_agree_with_json_loads():
    g = compile_grammar(JSON)
    rng = random.Random(0)
    deep = json.dumps(random_json(rng, 4))
    for _ in range(30):
        deep = f'{{"a": [{deep}, 1]}}'  # 60 more levels
    assert accepts(g, deep)
    samples = [json.dumps(random_json(rng, 5), indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5)
               for _ in range(40)]
    for text in samples:
        data = text.encode()
        state = g.start
        for i in range(len(data)):  # every prefix of a valid document is live
            state = g.next_state(state, data[i])
            assert state != DEAD, (text, i)
        assert g.is_accepting(state), text
    alphabet = '{}[],:"\\ 0123456789-.eEtrufalsn\tab'
    for text in samples:
        for _ in range(25):
            i = rng.randrange(len(text) + 1)
            mutated = text[:i] + rng.choice(["", rng.choice(alphabet)]) + text[i + rng.randint(0, 2):]
            assert accepts(g, mutated) == loads_strictly(mutated), mutated


def test_tail_calls_keep_the_stack_flat_and_the_depth_limit_holds():
    items = compile_grammar('root ::= "[" items? "]"\nitems ::= [0-9] ("," items)?')
    state = items.walk(items.start, ("[" + ",".join("7" * 2000) + "]").encode())
    assert items.is_accepting(state) and items.num_states < 10  # right recursion: no new configuration per item
    g = compile_grammar(PARENS)
    g.walk(g.start, b"()" * 3000)
    assert g.num_states < 10
    nest = compile_grammar('root ::= "(" root ")" | "x"', max_depth=20)
    assert accepts(nest, "(" * 19 + "x" + ")" * 19)
    assert nest.walk(nest.start, b"(" * 20 + b"x") == DEAD  # deeper than max_depth: outside the language
    with pytest.raises(GrammarError, match="max_states=5"):
        small = compile_grammar('root ::= "(" root ")" | "x"', max_states=5)
        small.walk(small.start, b"(((((((((")


@pytest.mark.parametrize("text, message", [
    ('expr ::= "a"', "no rule named 'root'"),
    ("root ::= a", "line 1, column 10: rule 'a' is used but never defined"),
    ('root ::= "a"\nroot ::= "b"', "line 2, column 1: rule 'root' is defined twice"),
    ('root ::= root "a" | "b"', r"left recursion \(root -> root\)"),
    ('root ::= a\na ::= b "x"\nb ::= "y"? a', r"left recursion \(a -> b -> a\)"),
    ('root ::= "a" root', "derives no finite string"),
    ('root ::= "abc', "unterminated string literal"),
    ("root ::= [a-", "unterminated character class"),
    ('root ::= [z-a]', "bad character range"),
    ('root ::= "a"{3,1}', "min repeat greater than max repeat"),
    ('root ::= "a"*?', "two repeat operators"),
    ('root ::= "\\q"', r"bad escape \\q"),
    ('root ::= "\\u12"', "needs 4 hex digits"),
    ('root ::= ("a"', "missing '\\)'"),
    ('root ::= "a" ; "b"', "unexpected ';'"),
    ("  # only a comment\n", "empty"),
    ("root = 'a'", "expected a rule"),
])
def test_bad_grammars_are_refused_with_where_and_why(text, message):
    with pytest.raises(GrammarError, match=message):
        compile_grammar(text)


def test_the_syntax_gbnf_allows():
    g = parse_grammar('root ::= item+ # comment\n  | "x"{2,}\nitem ::=\n  [a-c] . \'\\x41\' "\\u00e9"?')
    assert list(g.rules) == ["root", "item"]
    auto = compile_grammar(g.text)
    assert accepts(auto, "a\nA") and accepts(auto, "b€Aé" + "cxA") and accepts(auto, "xxx")
    assert not accepts(auto, "x") and not accepts(auto, "dxA")


def test_token_masks_equal_a_walk_token_by_token():
    rng = random.Random(1)
    pieces = ["(", ")", "()", "))", "((", "x", "(x", "x)", "(()", "é", "(é)"]
    tokens = [p.encode() for p in pieces] + [bytes([rng.randrange(256)]) for _ in range(20)] + [b"", "é".encode()[:1]]
    eos = len(tokens)
    vocab = TokenVocabulary(tokens + [b""], [eos])
    g = compile_grammar('root ::= "(" root ")" root | "x" root | "é" | ""')
    index = TokenIndex(g, vocab)
    learner = lambda *args: token_mask(*args)  # another rule object: TokenIndex takes the table path
    state, seen = index.start, 0
    for _ in range(40):
        expected = [bool(t) and g.walk(state, t) != DEAD for t in vocab.token_bytes]
        expected[eos] = g.is_accepting(state) or not any(expected)  # a dead end (half a character) may stop
        assert index.allowed(state).tolist() == expected
        assert index._compute(state, learner).tolist() == expected
        choices = [t for t in range(eos) if expected[t]]
        if not choices:
            break
        state = index.next_state(state, rng.choice(choices))
        seen = max(seen, g.depth(state))
    assert seen >= 2  # the walk went into nested calls


def test_json_object_nests_to_any_depth_with_its_whitespace_rule():
    from minillm.structured.grammar import json_value_grammar
    from minillm.structured.json_schema import WHITESPACE
    spaced, tight = compile_grammar(json_value_grammar(WHITESPACE)), compile_grammar(json_value_grammar(""))
    rng = random.Random(2)
    deep = random_json(rng, 3)
    for _ in range(40):
        deep = {"k": [deep, None]}
    assert accepts(spaced, json.dumps(deep)) and accepts(tight, json.dumps(deep, separators=(",", ":")))
    assert not accepts(tight, json.dumps(deep))  # ", " and ": " carry spaces
    assert not accepts(spaced, '{"a":   1}')  # at most two whitespace characters between tokens
    assert not accepts(spaced, " 1") and accepts(spaced, '"\\u00e9"') and not accepts(spaced, "[1,]")


# -- structural tags (minillm/structured/structural_tag.py) -------------------------------------------------------
def tag_automaton(spec):
    from minillm.structured.structural_tag import structural_tag_grammar
    return compile_grammar(structural_tag_grammar(spec))


def test_free_text_avoids_its_words_exactly():
    from minillm.structured.grammar import Grammar
    from minillm.structured.pushdown import MAX_STACK_DEPTH, PushdownAutomaton, _GrammarNFA
    words = ["ab", "bab", "c", "aab"]
    g = PushdownAutomaton(_GrammarNFA(Grammar("", {"root": ("avoid", words)})), 100, MAX_STACK_DEPTH)
    for n in range(8):
        for chars in itertools.product("abc", repeat=n):
            text = "".join(chars)
            ok = not any(w in text for w in words)
            state = g.walk(g.start, text.encode())
            assert g.is_accepting(state) == ok and (state != DEAD) == ok, text


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def test_vllm_structures_switch_the_schema_on_at_a_trigger():
    g = tag_automaton({"type": "structural_tag", "triggers": ["<function="], "structures": [
        {"begin": "<function=get_weather>", "schema": WEATHER, "end": "</function>"},
        {"begin": "<function=noop>", "schema": {"type": "object", "properties": {}}, "end": "</function>"}]})
    call = '<function=get_weather>{"city": "Paris"}</function>'
    for text in ["", "Hello, world", "a < b", f"Let me check. {call} Done.", call + call, "<function=noop>{}</function>",
                 "half a trigger <functio"]:
        assert accepts(g, text), text
    for text in ["<function=other>", f"x {call[:-1]}", '<function=get_weather>{"town": "P"}</function>',
                 f"{call} then <function="]:
        assert not accepts(g, text), text
    assert g.walk(g.start, b"<function=x") == DEAD and g.walk(g.start, b"<function=get") != DEAD


def test_formats_compose():
    think = {"type": "tag", "begin": "<think>", "content": {"type": "any_text"}, "end": "</think>"}
    g = tag_automaton({"type": "structural_tag", "format": {"type": "sequence", "elements": [
        think, {"type": "or", "elements": [{"type": "const_string", "value": "yes"},
                                           {"type": "regex", "pattern": "no+"}]},
        {"type": "repeat", "min": 1, "max": 2, "content": {"type": "grammar", "grammar": PARENS.replace('""', '"x"')}},
        {"type": "optional", "content": {"type": "json_schema", "json_schema": {"type": "integer"}}}]}})
    assert accepts(g, "<think>hmm </think </think>yes(x)x7") and accepts(g, "<think></think>nooo((x)x)x")
    assert not accepts(g, "<think>a</think>b</think>yesx")  # the content may not hold the end string
    assert not accepts(g, "<think></think>maybex") and not accepts(g, "<think></think>yesxxx")
    tags = tag_automaton({"type": "tags_with_separator", "separator": ", ", "at_least_one": True, "tags": [
        {"type": "tag", "begin": "<a>", "content": {"type": "regex", "pattern": "[0-9]"}, "end": "</a>"}]})
    assert accepts(tags, "<a>1</a>, <a>2</a>") and not accepts(tags, "") and not accepts(tags, "<a>1</a>,")
    once = tag_automaton({"type": "triggered_tags", "triggers": ["@"], "stop_after_first": True, "at_least_one": True,
                          "tags": [{"type": "tag", "begin": "@", "content": {"type": "const_string", "value": "go"},
                                    "end": "!"}]})
    assert accepts(once, "text @go!") and not accepts(once, "text") and not accepts(once, "@go! more")


@pytest.mark.parametrize("spec, message", [
    ('{"type": ', "not valid JSON"),
    ({"type": "structural_tag"}, '"format"'),
    ({"type": "structural_tag", "format": {"type": "token", "token": 3}}, "token-level"),
    ({"type": "triggered_tags", "triggers": ["<f="], "tags": [{"type": "tag", "begin": "<g>", "content":
                                                               {"type": "any_text"}, "end": "</g>"}]}, "start with"),
    ({"type": "sequence", "elements": []}, "'elements' must be a list"),
    ({"type": "repeat", "min": 3, "max": 1, "content": {"type": "any_text"}}, "max -1 or >= min"),
    ({"type": "regex", "pattern": "(a"}, "regex"),
    ({"type": "grammar", "grammar": "root ::= root 'a'"}, "left recursion"),
    ({"type": "json_schema", "json_schema": {"type": "integer"}, "style": "qwen_xml"}, "style"),
])
def test_bad_structural_tags_are_refused(spec, message):
    with pytest.raises(GrammarError, match=message):
        tag_automaton(spec)


# -- JSON schemas that recurse (minillm/structured/json_grammar.py) -----------------------------------------------
TREE = {"$defs": {"node": {"type": "object", "required": ["value", "children"], "properties": {
    "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3}}}},
        "$ref": "#/$defs/node"}
LINKED = {"type": "object", "required": ["head", "tail"], "properties": {
    "head": {"type": "string", "maxLength": 3}, "tail": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}}


def tree_ok(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"value", "children"} and type(value["value"]) is int
            and isinstance(value["children"], list) and len(value["children"]) <= 3
            and all(tree_ok(c) for c in value["children"]))


def random_tree(rng: random.Random, depth: int):
    kids = [random_tree(rng, depth - 1) for _ in range(rng.randint(0, 3))] if depth else []
    return {"value": rng.randint(-99, 99), "children": kids}


def test_recursive_schemas_run_as_grammars_and_regular_ones_stay_regexes():
    from minillm.structured import ByteDFA, PushdownAutomaton
    from minillm.structured.json_grammar import json_schema_automaton
    assert isinstance(json_schema_automaton({"type": "object", "properties": {"a": {"type": "integer"}}}), ByteDFA)
    tree = json_schema_automaton(TREE, whitespace="")
    assert isinstance(tree, PushdownAutomaton)
    rng = random.Random(3)
    for _ in range(30):
        text = json.dumps(random_tree(rng, rng.randint(0, 6)), separators=(",", ":"))
        assert accepts(tree, text), text
        i = rng.randrange(len(text))
        mutated = text[:i] + rng.choice('{}[],:"0a-') + text[i + 1:]
        try:
            valid = tree_ok(json.loads(mutated))  # (one character changed cannot reorder keys or add spaces)
        except ValueError:
            valid = False
        assert accepts(tree, mutated) == valid, mutated
    linked, value = json_schema_automaton(LINKED), None
    for i in range(60):  # "#": the whole schema, 60 levels deep
        value = {"head": str(i % 1000), "tail": value}
    assert accepts(linked, json.dumps(value)) and not accepts(linked, json.dumps({"head": "abcd", "tail": None}))
    anything = json_schema_automaton({"type": "object", "required": ["meta"], "properties": {"meta": {}}})
    assert accepts(anything, json.dumps({"meta": [[[[[[{"deep": [1, {"er": None}]}]]]]]]}))  # any depth
    with pytest.raises(ValueError, match="reserved"):
        json_schema_automaton({"enum": ["\U000F0001"]})
