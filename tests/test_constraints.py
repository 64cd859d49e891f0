"""Constrained decoding in the engine (minillm/engine/constraints.py): structured outputs (regex, choice, JSON schema,
any JSON), allowed_token_ids and bad_words, on a tiny random Llama with byte tokens, through every step path that
changes what a row sees (sync, async scheduling, chunked prefill, preemption, speculative verify steps)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from minillm.sampling_params import ParamError, SamplingParams, StructuredOutputsParams
from test_engine import make_engine, model_and_config  # noqa: F401  (fixture)
from tiny import EOS, one_thread  # noqa: F401  (one_thread: autouse fixture)

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "XL"]},
                                           "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "size"]}


def outputs(engine, prompts, params):
    """Each request's final RequestOutput's first completion, in prompt order."""
    per = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(None, p, sp) for p, sp in zip(prompts, per)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[i] for i in ids]


def structured(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


PROMPTS = [[5, 9, 200], [17] * 11, list(range(40, 59)), [3]]


# -- the parameters ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    ({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"), ({"structural_tag": 5}, "JSON object"),
    ({"grammar": ["root ::= 'a'"]}, "GBNF"),
    ({"regex": 3}, "regex must be a string"), ({"choice": []}, "non-empty list"), ({"choice": ["a", 1]}, "strings"),
    ({"json": 3}, "JSON schema"), ({"regex": "a", "disable_any_whitespace": "no"}, "bool"),
])
def test_structured_outputs_params_refuse_what_they_cannot_enforce(kw, message):
    with pytest.raises(ParamError, match=message) as err:
        StructuredOutputsParams(**kw)
    assert err.value.param == "structured_outputs"


@pytest.mark.parametrize("kw, param", [
    (dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(allowed_token_ids=[1, -2]), "allowed_token_ids"),
    (dict(allowed_token_ids=[True]), "allowed_token_ids"), (dict(bad_words=["ok", " "]), "bad_words"),
    (dict(bad_words="word"), "bad_words"), (dict(structured_outputs={"regex": "a", "bogus": 1}), "structured_outputs"),
    (dict(structured_outputs="a+"), "structured_outputs"),
])
def test_sampling_params_check_the_constraint_fields(kw, param):
    with pytest.raises(ParamError) as err:
        SamplingParams(**kw)
    assert err.value.param == param


def test_a_dict_of_fields_becomes_structured_outputs_params():
    p = SamplingParams(structured_outputs={"choice": ["yes", "no"]})
    assert isinstance(p.structured_outputs, StructuredOutputsParams) and p.structured_outputs.kind == "choice"
    assert p.processes_logits and p.constrains and not SamplingParams().constrains


def test_the_engine_refuses_a_bad_pattern_or_token_for_that_request_only(model_and_config):
    engine = make_engine(model_and_config)
    for kw, param, message in [(dict(structured_outputs=structured(regex="(a")), "structured_outputs", "regex"),
                               (dict(structured_outputs=structured(json={"type": "object", "not": {}})),
                                "structured_outputs", "not"),
                               (dict(structured_outputs=structured(regex="(" * 3000 + ")" * 3000)),
                                "structured_outputs", "nested too deeply"),
                               (dict(allowed_token_ids=[1, 300]), "allowed_token_ids", "300")]:
        with pytest.raises(ParamError, match=message) as err:
            engine.add_request(None, [1, 2], SamplingParams(**kw))
        assert err.value.param == param
    assert not engine.has_unfinished_requests()
    assert outputs(engine, [[1, 2]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids  # still serves


def test_a_constraint_whose_tokens_min_tokens_bans_is_refused_or_named(model_and_config):
    """A JSON object must open with "{"; stop_token_ids [123] ("{") with min_tokens 1 bans it until then: nothing
    could be sampled. Refused at admission (ParamError naming min_tokens: the server's 400), not a failed generation
    with a message about token 0. Deeper in the output the same contradiction ends the request with "error" and a
    message that says what banned the allowed tokens."""
    engine = make_engine(model_and_config)
    obj = structured(json={"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
                     disable_any_whitespace=True)
    with pytest.raises(ParamError, match=r"min_tokens=1 bans EOS and the stop_token_ids \[123\] until then, and "
                                         r"every token the structured output allows first \(\[123\]\)") as err:
        engine.add_request(None, [1, 2], SamplingParams(max_tokens=4, min_tokens=1, stop_token_ids=[123],
                                                        structured_outputs=obj))
    assert err.value.param == "min_tokens" and not engine.has_unfinished_requests()
    # '{' then '"' ... : a stop on '"' (34) with min_tokens 2 bans the second token the object needs
    out = outputs(engine, [[1, 2]], SamplingParams(temperature=0, max_tokens=6, min_tokens=2, stop_token_ids=[34],
                                                  structured_outputs=obj))[0]
    assert out.finish_reason == "error" and "every token it allows there ([34]) is banned (min_tokens bans EOS and " \
        "stop_token_ids" in out.error, out.error


# -- what comes out ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_output_matches_the_regex_and_stops_where_nothing_can_follow(model_and_config, seed):
    engine = make_engine(model_and_config, max_num_seqs=4)
    pattern = r"[a-c]{2}-\d{2,4}"
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=30, structured_outputs=structured(regex=pattern))
    for out in outputs(engine, PROMPTS, params):
        assert re.fullmatch(pattern, out.text), out.text
        assert out.finish_reason == "stop"
        assert len(out.token_ids) == len(out.text) or out.token_ids[-1] == EOS  # byte tokens, an EOS at most


def test_choice_and_json_schema_give_valid_outputs_greedy_and_sampled(model_and_config):
    engine = make_engine(model_and_config, max_num_seqs=4, max_model_len=128)
    choices = ["red", "green", "blue", "gré"]
    for temperature in (0.0, 1.0):
        got = outputs(engine, PROMPTS, SamplingParams(temperature=temperature, seed=3, max_tokens=20,
                                                      structured_outputs=structured(choice=choices)))
        assert all(out.text in choices for out in got), [out.text for out in got]
        schema = structured(json=SCHEMA, disable_any_whitespace=temperature > 0)
        got = outputs(engine, PROMPTS, SamplingParams(temperature=temperature, seed=3, max_tokens=100,
                                                      structured_outputs=schema))
        for out in got:
            assert out.finish_reason == "stop", out
            value = json.loads(out.text)
            assert isinstance(value["ok"], bool) and value["size"] in ("S", "M", "XL"), out.text
            assert set(value) <= {"ok", "size", "n"}


def test_json_object_and_no_whitespace(model_and_config):
    engine = make_engine(model_and_config, max_num_seqs=4)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=40,
                            structured_outputs=structured(json={"type": "array", "items": {"type": "integer"},
                                                                "maxItems": 3}, disable_any_whitespace=True))
    for out in outputs(engine, PROMPTS, params):
        assert re.fullmatch(r"\[(-?\d+(,-?\d+)*)?\]", out.text), out.text
    params = SamplingParams(temperature=1.0, seed=6, max_tokens=200, structured_outputs=structured(json_object=True))
    for out in outputs(engine, PROMPTS, params):
        if out.finish_reason == "stop":  # a random model may ramble inside a string until max_tokens
            json.loads(out.text)
        else:
            assert out.finish_reason == "length"


def test_allowed_token_ids_and_bad_words(model_and_config):
    engine = make_engine(model_and_config, max_num_seqs=4)
    allowed = [ord(c) for c in "xyz"] + [EOS]
    for out in outputs(engine, PROMPTS, SamplingParams(temperature=1.0, seed=1, max_tokens=12,
                                                       allowed_token_ids=allowed)):
        assert set(out.token_ids) <= set(allowed)
    # a bias makes greedy decoding write "qqqq...", "z" its second choice: banning "qq" gives "qzqz..."
    bias = {ord("q"): 100.0, ord("z"): 50.0}
    plain = outputs(engine, PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias=bias))
    assert all(out.text == "q" * 8 for out in plain)
    banned = outputs(engine, PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias=bias,
                                                     bad_words=["qq", "zqz"]))
    # q; "qq" bans q: z; then q; now "qq" bans q and "zqz" bans z: the model's third choice
    assert all(out.token_ids[:3] == [ord("q"), ord("z"), ord("q")] and out.token_ids[3] not in bias for out in banned)
    assert all("qq" not in out.text and "zqz" not in out.text for out in banned), [o.text for o in banned]


def test_a_grammar_nests_without_limit_greedy_and_sampled(model_and_config):
    engine = make_engine(model_and_config, max_num_seqs=4, max_model_len=128)
    grammar = 'root ::= "[" (root ("," root)*)? "]" | [0-9]'  # lists of lists of digits, any depth
    done = 0
    for temperature, seed in ((0.0, 0), (1.0, 1), (1.0, 2)):
        for out in outputs(engine, PROMPTS, SamplingParams(temperature=temperature, seed=seed, max_tokens=60,
                                                           structured_outputs=structured(grammar=grammar))):
            if out.finish_reason == "length":  # a random model may nest on until max_tokens: a live prefix
                assert re.fullmatch(r"[\[\],0-9]*", out.text) and out.text.count("[") > out.text.count("]")
                continue
            assert out.finish_reason == "stop"
            assert json.dumps(json.loads(out.text), separators=(",", ":")) == out.text
            done += 1
    assert done >= 6


def test_a_recursive_json_schema_gives_valid_trees(model_and_config):
    """A schema whose $ref reaches itself (json_grammar.py) through the engine: every finished output is a tree."""
    from test_structured_grammar import TREE, tree_ok
    engine = make_engine(model_and_config, max_num_seqs=4, max_model_len=128)
    got = outputs(engine, PROMPTS, SamplingParams(temperature=1.0, seed=9, max_tokens=100, structured_outputs=structured(
        json=TREE, disable_any_whitespace=True)))
    for out in got:
        assert out.finish_reason == "length" or tree_ok(json.loads(out.text)), out.text
    assert any(out.finish_reason == "stop" for out in got)


ITEMS = 'root ::= item+ [0-9]{3}\nitem ::= "ab" | "cd" | "(" item+ ")"'


def items_ok(text: str) -> bool:
    """Whether text is in ITEMS' language: balanced parentheses around ab / cd runs, then three digits."""
    body, depth = text[:-3], 0
    if not re.fullmatch(r"[0-9]{3}", text[-3:]) or not re.fullmatch(r"(ab|cd|\(|\))+", body):
        return False
    for c in body:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0 and "()" not in body


# -- the same tokens whatever path the step takes --------------------------------------------------------------------
def constrained_params(seed: int) -> list[SamplingParams]:
    """A mixed batch: greedy and seeded, constrained and plain, so masks travel beside unmasked rows."""
    return [SamplingParams(temperature=0, max_tokens=24, structured_outputs=structured(grammar=ITEMS)),
            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
            SamplingParams(temperature=1.0, seed=seed, max_tokens=60,
                           structured_outputs=structured(json=SCHEMA, disable_any_whitespace=True)),
            SamplingParams(temperature=1.0, seed=seed + 1, max_tokens=10, allowed_token_ids=list(range(97, 123)))]


@pytest.mark.parametrize("options", [
    dict(scheduling="continuous", kv_layout="paged", block_size=4),
    dict(scheduling="continuous", kv_layout="paged", block_size=4, async_scheduling=True),
    dict(scheduling="continuous", kv_layout="paged", block_size=4, enable_chunked_prefill=True,
         max_num_batched_tokens=8),
    dict(scheduling="continuous", kv_layout="paged", block_size=4, num_kv_blocks=14),  # preemption
    dict(scheduling="continuous", kv_layout="paged", block_size=4,
         speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}),
    dict(scheduling="continuous", kv_layout="paged", block_size=4,
         speculative_config={"method": "ngram_tree", "num_speculative_tokens": 3}),
], ids=["sync", "async", "chunked", "preempt", "ngram", "ngram_tree"])
def test_every_step_path_gives_the_static_engines_tokens(model_and_config, options):
    want = outputs(make_engine(model_and_config, max_model_len=128), PROMPTS, constrained_params(7))
    got = outputs(make_engine(model_and_config, max_model_len=128, **options), PROMPTS, constrained_params(7))
    # seeded rows of a speculative engine draw through the rejection rule: another (equally distributed) sample
    same = [0, 1] if "speculative_config" in options else range(len(PROMPTS))
    assert [got[i].token_ids for i in same] == [want[i].token_ids for i in same]
    assert items_ok(got[0].text), got[0].text
    assert set(json.loads(got[2].text)) >= {"ok", "size"} and set(got[3].token_ids) <= set(range(97, 123))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_constraints_under_cuda_graphs_async_and_verify_steps():
    """On the GPU decode steps replay CUDA graphs; constrained rows are sampled again from the graph's logits with
    their masks (uploaded each step), async scheduling steps synchronously while they live, and prompt lookup's
    chain and tree verify steps mask each row along its path. fp32 greedy: every variant gives the eager
    synchronous engine's tokens."""
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.engine.worker import RandomWeights
    from test_engine import tiny_config
    from tiny import ByteTokenizer

    config = tiny_config(num_hidden_layers=2, hidden_size=128, intermediate_size=256, max_position_embeddings=256)
    model = RandomWeights(seed=3)(config, torch.device("cuda"), torch.float32)
    params = [SamplingParams(temperature=0, max_tokens=40, **kw) for kw in (
        dict(structured_outputs=structured(regex=r"(ab|cd)+[0-9]{3}")),
        dict(structured_outputs=structured(json=SCHEMA, disable_any_whitespace=True)),
        dict(structured_outputs=structured(choice=["north", "south", "east", "west"])),
        dict(allowed_token_ids=list(range(97, 123)), bad_words=["ee", "aa"], ignore_eos=True),
        dict(ignore_eos=True), dict(structured_outputs=structured(grammar=ITEMS)))] * 2
    prompts = [[5, 9, 200], [17] * 11, list(range(40, 59)), [3], [7, 7, 7, 8], [100, 101], [42] * 5, [1, 2, 3, 4]]
    prompts = prompts + prompts[:4]

    def run(**options):
        engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(
            block_size=16, kv_cache_memory=16 << 20, max_model_len=128, max_num_seqs=8, **options),
            device="cuda", dtype=torch.float32)
        return engine, outputs(engine, prompts, params)

    _, want = run(enforce_eager=True, async_scheduling=False)
    assert re.fullmatch(r"(ab|cd)+[0-9]{3}", want[0].text) and set(json.loads(want[1].text)) >= {"ok", "size"}
    assert items_ok(want[5].text) or want[5].finish_reason == "length", want[5].text
    assert want[2].text in ("north", "south", "east", "west") and "ee" not in want[3].text
    for options in (dict(async_scheduling=False), dict(async_scheduling=True),
                    dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}),
                    dict(speculative_config={"method": "ngram_tree", "num_speculative_tokens": 3})):
        engine, got = run(**options)
        assert engine.runner.forward_counts["graph"] > 0
        assert [o.token_ids for o in got] == [o.token_ids for o in want], options


def test_ignore_eos_runs_on_to_the_formats_end(model_and_config):
    """With EOS pushed to the top, the format's first accepting state ends a request with EOS; under ignore_eos EOS
    would not end it, so the mask leaves EOS out wherever the format may go on and the output reaches its end."""
    engine = make_engine(model_and_config)
    regex = structured(regex=r"no!?")
    base = dict(temperature=0, max_tokens=10, logit_bias={EOS: 100.0}, structured_outputs=regex)
    stops, runs_on = outputs(engine, [[5, 9, 200]] * 2, [SamplingParams(**base), SamplingParams(**base, ignore_eos=True)])
    assert (stops.text, stops.token_ids[-1], stops.finish_reason) == ("no", EOS, "stop")
    assert (runs_on.text, runs_on.token_ids, runs_on.finish_reason) == ("no!", [ord(c) for c in "no!"], "stop")
