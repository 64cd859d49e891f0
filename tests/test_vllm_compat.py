"""What a vLLM user's code reads and passes besides generate(str): the typed prompt dicts (TextPrompt,
TokensPrompt), llm.get_tokenizer(), and CompletionOutput.stop_reason. On the tiny random engine of the serving
tests (byte tokens, two layers of width 32), with logit_bias forcing the tokens a case needs.
"""
from __future__ import annotations

import pytest

from minillm import LLM, SamplingParams
from serve_tiny import tiny_engine
from tiny import EOS, one_thread  # noqa: F401  (one_thread: autouse fixture)

FORCE_X = {ord("x"): 100.0}  # every step samples "x"


@pytest.fixture(scope="module")
def llm():
    return LLM.from_engine(tiny_engine())


def test_get_tokenizer_is_the_engines(llm):
    assert llm.get_tokenizer() is llm.tokenizer


def test_prompt_dicts_are_the_plain_prompts(llm):
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = llm.tokenizer.encode("abc")
    plain = [o.outputs[0].token_ids for o in llm.generate(["abc", ids], params)]
    typed = llm.generate([{"prompt": "abc"}, {"prompt_token_ids": ids}], params)
    assert [o.outputs[0].token_ids for o in typed] == plain
    assert typed[0].prompt == "abc" and typed[1].prompt_token_ids == ids
    assert llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids == plain[1]
    streamed = [t for out in llm.generate_stream({"prompt": "abc"}, params) for t in out.outputs[0].token_ids]
    assert streamed == plain[0]


@pytest.mark.parametrize("prompt, error, words", [
    ({"prompt": "a", "multi_modal_data": {}}, ValueError, "multi_modal_data"),
    ({}, TypeError, "prompt_token_ids"),
    ({"text": "hi"}, TypeError, r"got keys \['text'\]"),
    ({"prompt": "a", "prompt_token_ids": [1]}, ValueError, "exactly one"),
    ({"prompt": 5}, TypeError, "must be a str"),
    ([{"prompt_token_ids": "abc"}], TypeError, "prompt 0: a TokensPrompt"),
])
def test_bad_prompt_dicts_are_refused_by_name(llm, prompt, error, words):
    with pytest.raises(error, match=words):
        llm.generate(prompt, SamplingParams(max_tokens=1))


@pytest.mark.parametrize("params, reason, token_ids", [
    (dict(stop=["zz", "xx"]), "xx", [120, 120]),  # the stop string that matched, not the first listed
    (dict(stop_token_ids=[120]), 120, [120]),  # the stop token's id (it ends token_ids, as in vLLM)
    (dict(logit_bias={EOS: 100.0}), None, [EOS]),  # EOS: no stop_reason
    (dict(max_tokens=2), None, [120, 120]),  # "length": none
])
def test_stop_reason_names_what_stopped(llm, params, reason, token_ids):
    sampling = SamplingParams(temperature=0, **{"max_tokens": 6, "logit_bias": FORCE_X, **params})
    out = llm.generate("a", sampling)[0].outputs[0]
    assert (out.token_ids, out.stop_reason) == (token_ids, reason)
    assert out.finish_reason == ("length" if "max_tokens" in params else "stop")
    last = list(llm.generate_stream("a", sampling))[-1].outputs[0]
    assert (last.finish_reason, last.stop_reason) == (out.finish_reason, reason)
