"""Every public entry point validates its input, and a bad request never takes the others down.

Runs on the real bundled model with a short context (max_model_len=64), so over-long prompts are cheap.
"""
from __future__ import annotations

import pytest
import torch

from minillm import LLM, SamplingParams

MAX_LEN = 64


@pytest.fixture(scope="module")
def llm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_api.py: the shared machine is oversubscribed
    try:
        yield LLM(max_model_len=MAX_LEN, max_num_seqs=4)
    finally:
        torch.set_num_threads(threads)


SHORT = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(llm, prompt):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompt, SHORT)
    with pytest.raises(ValueError, match="prompt 1: prompt is empty"):
        llm.generate(["fine", prompt] if prompt == "" else [[1, 2], prompt], SHORT)


def test_prompt_longer_than_context_names_both_numbers(llm):
    with pytest.raises(ValueError, match=r"prompt 0: prompt has 65 tokens, more than max_model_len=64"):
        llm.generate([[5] * 65], SHORT)


def test_prompt_plus_max_tokens_beyond_context_ends_with_length(llm):
    out = llm.generate([[5] * 60], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == MAX_LEN - 60


@pytest.mark.parametrize("bad_id", [-1, 49152, 10**9])
def test_token_id_outside_vocabulary(llm, bad_id):
    with pytest.raises(ValueError, match=rf"token id {bad_id} is outside the vocabulary \[0, 49152\)"):
        llm.generate([1, bad_id, 3], SHORT)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"), (dict(seed="1"), "seed"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-3]), "stop_token_ids"),
    # not finite, bools where numbers belong, ints beyond the int64 tensors the sampler builds, wrong containers
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(temperature="0.5"), "temperature"), (dict(top_k=True), "top_k"),
    (dict(max_tokens=True), "max_tokens"), (dict(top_k=2**63), "top_k"), (dict(seed=2**64), "seed"),
    (dict(priority=1.5), "priority"), (dict(ignore_eos="yes"), "ignore_eos"), (dict(stop=5), "stop"),
    (dict(stop_token_ids=7), "stop_token_ids"), (dict(stop_token_ids=[1, None]), "stop_token_ids"),
    (dict(output_kind="delta"), "output_kind must be one of 'cumulative', 'final_only'"),
    # past float's range (float() raised OverflowError), and past float32's, where the sampler divides by it
    (dict(temperature=10**400), "temperature must be a finite number .* beyond a float's range"),
    (dict(top_p=-10**400), "top_p must be a finite number"),
    (dict(temperature=1e39), r"temperature must be at most 3.40282e\+38 \(float32's largest\), got 1e\+39"),
])
def test_bad_sampling_params(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        SamplingParams(**kwargs)


def test_bad_sampling_params_message_names_value_and_range():
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0 \(0 = greedy\), got nan"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError, match=r"top_k must be an integer -1 \(disabled\) or in \[1, \d+\], got bool: True"):
        SamplingParams(top_k=True)


def test_tiny_temperature_is_raised_to_the_minimum_with_a_warning():
    import numpy as np
    with pytest.warns(UserWarning, match="below 0.01"):
        assert SamplingParams(temperature=1e-300).temperature == 0.01
    assert SamplingParams(temperature=-0.0).greedy
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), max_tokens=np.int32(2))  # numpy scalars
    assert (type(p.temperature), type(p.top_k), type(p.max_tokens)) == (float, int, int)


@pytest.mark.parametrize("prompts", [None, 42, {"text": "hi"}, ["ok", 3.5], [[1, 2], "ok", {"a": 1}]])
def test_wrong_prompt_types(llm, prompts):
    with pytest.raises(TypeError):
        llm.generate(prompts, SHORT)


def test_token_lists_must_hold_ints(llm):
    with pytest.raises(TypeError, match=r"prompt 0: .*ints.*1\.5"):
        llm.generate([[1, 1.5]], SHORT)


def test_params_assigned_after_construction_are_checked_again(llm):
    """SamplingParams' fields are plain attributes: a value assigned after construction used to reach the engine
    unchecked. A seed past int64 then failed the whole step (the good request beside it finished with 'error');
    a stop assigned later was ignored. generate, chat and generate_stream check a copy; the caller's is untouched."""
    from minillm.sampling_params import ParamError
    engine = llm.llm_engine
    steps = engine.num_steps
    bad = SamplingParams(max_tokens=2, output_kind="final_only")
    bad.seed = 2**70
    with pytest.raises(ParamError, match=r"sampling_params\[1\]: seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\]"):
        llm.generate(["good", "bad"], [SHORT, bad])
    with pytest.raises(ValueError, match="seed must be an integer"):
        next(llm.generate_stream("bad", bad))
    assert engine.num_steps == steps and not engine.has_unfinished_requests()
    stop = SamplingParams(temperature=0, max_tokens=8, output_kind="final_only")
    unstopped = llm.generate("The capital of France is", stop)[0].outputs[0].text
    stop.stop = [unstopped[3:5]]
    cut = unstopped[:unstopped.index(stop.stop[0])]
    assert llm.generate("The capital of France is", stop)[0].outputs[0].text == cut
    streamed = SamplingParams(temperature=0, max_tokens=8)
    streamed.stop = stop.stop
    assert "".join(o.outputs[0].text for o in llm.generate_stream("The capital of France is", streamed)) == cut
    assert streamed.output_kind == "cumulative"  # the caller's object, as it was


def test_generate_stream_takes_one_prompt(llm):
    with pytest.raises(TypeError, match=r"generate_stream streams one prompt .* got a list of 2 prompts; use "
                                        r"generate\(\) for several"):
        next(llm.generate_stream(["a", "b"], SHORT))
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams, got list"):
        next(llm.generate_stream("a", [SHORT]))


def test_sampling_params_list_length_and_type(llm):
    with pytest.raises(ValueError, match="got 1 sampling_params for 2 prompts"):
        llm.generate(["a", "b"], [SHORT])
    with pytest.raises(TypeError, match=r"sampling_params\[1\]"):
        llm.generate(["a", "b"], [SHORT, {"temperature": 0}])
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate("a", {"temperature": 0})


@pytest.mark.parametrize("messages", [
    [], {"role": "user", "content": "hi"}, [{"role": "user"}], [{"content": "hi"}],
    [{"role": "user", "content": 5}], ["hello"], [[{"role": "user", "content": "ok"}], [{"role": 1, "content": "x"}]],
])
def test_malformed_chat_messages(llm, messages):
    with pytest.raises(ValueError):
        llm.chat(messages, SHORT)


def test_unknown_engine_kwarg_is_named():
    with pytest.raises(TypeError, match="max_batch_size"):
        LLM(max_batch_size=3)
    with pytest.raises(ValueError, match="kv_layout"):
        LLM(kv_layout="ring")


def test_bad_request_rejected_before_any_work(llm):
    engine = llm.llm_engine
    steps = engine.num_steps
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate(["good", [7] * 500, "also good"], SHORT)
    assert engine.num_steps == steps and not engine.has_unfinished_requests()


def test_engine_add_request_isolates_the_bad_one(llm):
    engine = llm.llm_engine
    engine.add_request("v1", "The first", SHORT)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("v2", [3] * 100, SHORT)
    engine.add_request("v3", "The third", SHORT)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("v1", "dup", SHORT)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["v1", "v3"]
    assert all(len(o.outputs[0].token_ids) == 2 for o in done.values())


@pytest.mark.parametrize("field, value, pattern", [
    ("seed", 2**70, r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got 1180591620717411303424"),
    ("temperature", float("nan"), r"temperature must be a finite number >= 0 \(0 = greedy\), got nan"),
    ("max_tokens", "5", r"max_tokens must be an integer >= 1 .* got str: '5'"),
])
def test_engine_add_request_checks_params_assigned_after_construction(llm, field, value, pattern):
    """A direct engine user's SamplingParams are checked again at add_request (fields are plain attributes):
    the bad request raises there, naming the field, and the good ones queued beside it finish as usual. A value
    assigned after add_request does not reach the queued request (the engine keeps its own checked copy)."""
    from minillm.sampling_params import ParamError
    engine = llm.llm_engine
    good = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request("p1", "The first", good)
    bad = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    setattr(bad, field, value)
    with pytest.raises(ParamError, match=pattern):
        engine.add_request("p2", "The second", bad)
    engine.add_request("p3", "The third", good)
    good.max_tokens = "2"  # assigned after the requests were queued: theirs are copies
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert sorted(done) == ["p1", "p3"]
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 2 for o in done.values())


def test_bad_overrides_fail_eagerly():
    pytest.importorskip("minillm.course.overrides")
    with pytest.raises(TypeError, match="ch99.nothing"):
        LLM(overrides={"ch99.nothing": lambda x: x})


# -- engine options that used to reach torch (or be ignored) before anything named them -------------------
@pytest.mark.parametrize("kwargs, pattern", [
    (dict(device="tpu"), r"device='tpu' is not a device; allowed: 'auto', 'cpu', 'cuda'"),
    (dict(device=3), r"device=3 \(int\) is not a device"),
    (dict(scheduling_policy="lifo"), r"EngineConfig.scheduling_policy='lifo'; allowed: 'fcfs', 'priority'"),
    (dict(scheduling_policy=None), r"EngineConfig.scheduling_policy=None; allowed: 'fcfs', 'priority'"),
    (dict(seed="x"), r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got str: 'x'"),
    (dict(seed=2**70), r"seed must be an integer .* got 1180591620717411303424"),
    (dict(gpu_memory_utilization=True), r"gpu_memory_utilization must be a number in \(0, 1\], got bool: True"),
    (dict(gpu_memory_utilization="0.5"), r"got str: '0.5'"),
    (dict(scheduling="static", enable_prefix_caching=True), r"scheduling='static' cannot honour enable_prefix"),
    (dict(scheduling="static", enable_chunked_prefill=True, preemption_mode="swap"),
     r"cannot honour enable_chunked_prefill=True, preemption_mode='swap'"),
    (dict(scheduling="static", scheduling_policy="priority"), r"scheduling='static' cannot honour "
                                                              r"scheduling_policy='priority'"),
    # these were accepted: swap without space recomputed every time, a block past the context held one sequence,
    # a dense model ignored the MoE option
    (dict(preemption_mode="swap", swap_space=0), r"preemption_mode='swap' needs swap_space > 0 bytes"),
    (dict(max_model_len=64, block_size=10**6), r"block_size=1000000 exceeds max_model_len=64: a paged block"),
    (dict(moe_capacity_factor=1.5), r"moe_capacity_factor=1.5 is only read by mixture-of-experts models; 'llama'"),
])
def test_bad_engine_options_fail_before_loading(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LLM(**kwargs)


def test_engine_option_types_are_named():
    # extra={"policy": ...} was the scheduling policy's only spelling; it is scheduling_policy= now, the one way
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) extra; engine options are: "
                                        r".*scheduling_policy"):
        LLM(extra={"policy": "priority"})
    with pytest.raises(TypeError, match=r"model must be a path .* got int: 5"):
        LLM(model=5)


def test_quantization_options_refuse_unknown_keys():
    from minillm.config import ModelConfig
    from minillm.quant.checkpoint import load_time_quantization
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'bitz' for quantization='rtn'; allowed: bits, group"):
        load_time_quantization(ModelConfig(), "rtn", {"bitz": 4})
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'bits' for quantization='fp8'"):
        load_time_quantization(ModelConfig(), "fp8", {"bits": 4})
    assert load_time_quantization(ModelConfig(), "rtn", {"bits": 4, "group_size": 32}).quantization == "rtn"


def test_a_kv_pool_that_cannot_be_allocated_names_its_size():
    from minillm.config import ModelConfig
    from minillm.engine.kv_cache import KVCache
    with pytest.raises(ValueError, match=r"KV pool of 1000000000000 blocks of 16 tokens needs .* GiB on cpu"):
        KVCache(ModelConfig(), 10**12, 16, torch.float32, torch.device("cpu"))


# -- prompts -------------------------------------------------------------------------------------------------
def test_text_that_is_not_unicode_is_named(llm):
    with pytest.raises(ValueError, match=r"prompt 1: text is not valid Unicode: '\\udc00' at character 1 is a lone "
                                         r"surrogate"):
        llm.generate(["fine", "x\udc00"], SHORT)
    with pytest.raises(ValueError, match="lone surrogate"):
        llm.chat([{"role": "user", "content": "\ud83d"}], SHORT)


def test_token_id_prompts_are_judged_as_token_ids(llm):
    import numpy as np
    with pytest.raises(TypeError, match=r"prompt 0: a token-id prompt must hold ints .* got 2.0 \(float\)"):
        llm.generate([1, 2.0], SHORT)
    out = llm.generate([np.int64(5), 7], SHORT)[0]  # numpy integers, as a tokenizer's array gives them
    assert out.prompt_token_ids == [5, 7] and all(type(t) is int for t in out.prompt_token_ids)


def test_add_request_range_checks_given_token_ids(llm):
    """A text prompt's tokens given alongside it (the server's path) are not trusted: one id past the vocabulary
    would fail the whole step, and every other request in it."""
    engine = llm.llm_engine
    engine.add_request("ok", "The first", SHORT)
    with pytest.raises(ValueError, match=r"token id 1000000000 is outside the vocabulary \[0, 49152\)"):
        engine.add_request("bad", "hi", SHORT, prompt_token_ids=[1, 10**9])
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(done) == ["ok"] and done["ok"].outputs[0].finish_reason == "length"


def test_a_swap_pool_larger_than_the_machine_fails_at_start():
    """The CPU pool is allocated at the first preemption, mid-serving: swap_space=10**15 used to build a free list
    of 10**12 block ids (the process was killed); now it is refused up front."""
    from minillm.config import EngineConfig, ModelConfig
    from minillm.engine.cache_config import make_cache_config, resolve_engine_config
    config = resolve_engine_config(EngineConfig(preemption_mode="swap", swap_space=10**15, num_kv_blocks=8),
                                   ModelConfig(), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"swap_space=1000000000000000 bytes .* more than 70% of this machine's"):
        make_cache_config(config, 8, 1024)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(tensor_parallel_size=2), r"share_model shares the model in this process, so tensor/pipeline/expert_"
                                   r"parallel_size must be 1, got 2/1/1"),
    (dict(pipeline_parallel_size=2), r"must be 1, got 1/2/1"),
    (dict(quantization="fp8"), r"share_model reuses this LLM's loaded weights, so quantization cannot change"),
    (dict(device="cpu", dtype="float16"), r"so dtype, device cannot change \(this LLM: device=cpu"),
])
def test_share_model_refuses_what_it_cannot_honour(llm, kwargs, pattern):
    """Parallel sizes were accepted and ignored (one in-process engine ran); load-time options were refused as
    unknown keywords of LLM(), which has them."""
    with pytest.raises(ValueError, match=pattern):
        llm.share_model(**kwargs)


def test_max_tokens_none_generates_until_the_context_ends(llm):
    """vLLM's max_tokens=None: the request may run to max_model_len (it was refused as not an integer)."""
    out = llm.generate([[5] * 60], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == MAX_LEN - 60 and out.outputs[0].finish_reason == "length"
    with pytest.raises(ValueError, match=r"max_tokens=None generates until max_model_len=64, but the 64-token "
                                         r"prompt leaves room for 0"):
        llm.generate([[5] * 64], SamplingParams(max_tokens=None))
    with pytest.raises(ValueError, match=r"leaves room for 4 \(min_tokens=6\)"):
        llm.generate([[5] * 60], SamplingParams(max_tokens=None, min_tokens=6))
    assert llm.llm_engine.scheduler.block_manager.num_used_blocks == 0
