"""What a vLLM user's code reads and passes besides generate(str): the typed prompt dicts (TextPrompt,
TokensPrompt), llm.get_tokenizer(), CompletionOutput.stop_reason, and scheduling_policy="priority" with
generate(prompts, priority=[...]). On the tiny random engine of the serving tests (byte tokens, two layers of
width 32), with logit_bias forcing the tokens a case needs.
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


def _finish_order(llm: LLM, prompts: list[str], **generate_kwargs) -> list[str]:
    """The prompts in the order their requests finished."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = llm.generate(prompts, params, **generate_kwargs)
    assert [o.prompt for o in outs] == prompts  # returned in input order, whatever the finishing order
    return [o.prompt for o in sorted(outs, key=lambda o: o.metrics.finish_time)]


def test_priority_policy_runs_the_lowest_priority_value_first(llm):
    """One slot (max_num_seqs=1): under scheduling_policy="priority" (an LLM option, as in vLLM) the waiting
    request of lowest priority runs next; under the default "fcfs" they run in arrival order."""
    prompts = ["a", "b", "c", "d"]
    by_priority = llm.share_model(max_num_seqs=1, scheduling_policy="priority")
    assert by_priority.llm_engine.engine_config.scheduling_policy == "priority"
    assert _finish_order(by_priority, prompts, priority=[2, 0, -1, 1]) == ["c", "b", "d", "a"]
    assert _finish_order(by_priority, prompts) == prompts  # no priorities: all 0, arrival order
    fcfs = llm.share_model(max_num_seqs=1)
    assert fcfs.llm_engine.engine_config.scheduling_policy == "fcfs"
    assert _finish_order(fcfs, prompts, priority=[0, 0, 0, 0]) == prompts


def test_priority_replaces_sampling_params_priority(llm):
    by_priority = llm.share_model(max_num_seqs=1, scheduling_policy="priority")
    late = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, priority=5)
    outs = by_priority.generate(["a", "b"], late, priority=[1, 0])
    assert outs[1].metrics.finish_time < outs[0].metrics.finish_time
    assert late.priority == 5  # the caller's object is left as it was


@pytest.mark.parametrize("policy, priority, error, words", [
    ("fcfs", [0, 3], ValueError, r"priority\[1\]: priority=3 needs scheduling_policy='priority'; this engine "
                                 r"schedules 'fcfs'"),
    ("priority", [0], ValueError, r"got 1 priorities for 2 prompts; give one per prompt"),
    ("priority", [0, 1, 2], ValueError, r"got 3 priorities for 2 prompts"),
    ("priority", 1, TypeError, r"priority must be a list of integers, one per prompt, got int: 1"),
    ("priority", "01", TypeError, r"priority must be a list of integers, one per prompt, got str"),
    ("priority", [0, 1.5], ValueError, r"priority\[1\]: priority must be an integer .* got float: 1.5"),
    ("priority", [True, 0], ValueError, r"priority\[0\]: priority must be an integer .* got bool: True"),
    ("priority", [0, 2**63], ValueError, r"priority\[1\]: priority must be an integer in \[-9223372036854775808, "),
])
def test_bad_priorities_are_refused_before_anything_is_queued(llm, policy, priority, error, words):
    other = llm.share_model(scheduling_policy=policy)
    with pytest.raises(error, match=words):
        other.generate(["a", "b"], SamplingParams(max_tokens=1), priority=priority)
    assert not other.llm_engine.has_unfinished_requests()


def test_a_priority_the_fcfs_engine_would_ignore_is_refused(llm):
    """SamplingParams.priority too: under "fcfs" nothing would honour it (vLLM refuses it the same way)."""
    from minillm.sampling_params import ParamError
    with pytest.raises(ParamError, match=r"sampling_params 0: priority=-1 needs scheduling_policy='priority'"):
        llm.generate("a", SamplingParams(max_tokens=1, priority=-1))
    with pytest.raises(ParamError, match=r"priority=2 needs scheduling_policy='priority'"):
        llm.llm_engine.add_request(None, "a", SamplingParams(max_tokens=1, priority=2))
    assert not llm.llm_engine.has_unfinished_requests()
