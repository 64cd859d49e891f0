"""The public API on the real bundled model (SmolLM2-135M-Instruct): LLM.generate / chat / generate_stream.

One LLM is loaded for the module. The shared development machine is oversubscribed; torch's two OpenMP threads
then spin against each other (a decode step is ~10x slower), so this module runs torch on one thread and restores
the setting afterwards.
"""
from __future__ import annotations

import pytest
import torch

from minillm import LLM, SamplingParams
from minillm.engine.detokenizer import DetokenizerState, detokenize_incrementally

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield LLM(max_model_len=256, max_num_seqs=6, seed=0)
    finally:
        torch.set_num_threads(threads)


def greedy_reference(llm: LLM, prompt: str, n: int) -> list[int]:
    """The model's own greedy continuation: a full forward over the whole sequence per token, no KV cache."""
    model = llm.llm_engine.runner.model
    tokens = llm.tokenizer.encode(prompt)
    start = len(tokens)
    with torch.inference_mode():
        for _ in range(n):
            hidden = model(torch.tensor(tokens), torch.arange(len(tokens)))
            tokens.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return tokens[start:]


def test_greedy_batch_matches_full_forward_loop(llm):
    prompts = ["The capital of France is", "Hi", "List three colours of the rainbow, separated by commas, then "
               "explain in one sentence why the sky looks blue during the day:"]
    outs = llm.generate(prompts, GREEDY)
    assert [o.prompt for o in outs] == prompts  # input order
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == greedy_reference(llm, prompt, 8), prompt
        assert out.outputs[0].finish_reason == "length" and out.finished
        assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)


def test_prompt_forms_agree(llm):
    ids = llm.tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    by_text = llm.generate("Once upon a time", params)
    by_ids = llm.generate(ids, params)
    by_lists = llm.generate([ids, "Once upon a time"], [params, params])
    tokens = by_text[0].outputs[0].token_ids
    assert by_ids[0].outputs[0].token_ids == tokens and by_ids[0].prompt is None
    assert [o.outputs[0].token_ids for o in by_lists] == [tokens, tokens]
    assert by_text[0].prompt_token_ids == ids


def test_stop_string_truncates(llm):
    prompt = "Write a short poem about the sea."
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0].text
    words = [w for w in free.split() if len(w) >= 3]
    assert words, free
    stop = words[min(2, len(words) - 1)]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].text == free[:free.index(stop)]


def test_stream_concatenation_equals_final_text(llm):
    prompt = "Say 'très bien, café au lait' in a sentence:"
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[" milk"])
    final = llm.generate(prompt, params)[0].outputs[0]
    deltas = list(llm.generate_stream(prompt, params))
    assert "".join(d.outputs[0].text for d in deltas) == final.text
    assert sum((d.outputs[0].token_ids for d in deltas), []) == final.token_ids
    assert all("\ufffd" not in d.outputs[0].text for d in deltas)
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == final.finish_reason


def test_incremental_detokenization_of_split_characters(llm):
    tok = llm.tokenizer
    text = "Ünïcödé 😀 日本語 — ok"
    prompt = tok.encode("Text:")
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters really are split over several tokens
    state, pieces = DetokenizerState.for_prompt(len(prompt)), []
    for i in range(len(ids)):
        pieces.append(detokenize_incrementally(tok, prompt + ids[:i + 1], state))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_seeded_request_same_tokens_in_any_batch(llm):
    seeded = SamplingParams(temperature=0.8, top_k=50, max_tokens=6, seed=42, ignore_eos=True)
    alone = llm.generate("My favourite animal is", seeded)[0].outputs[0].token_ids
    others = ["Tell me a joke", "1, 2, 3,", "Paris is", "Water boils at", "The best programming language"]
    prompts = others[:2] + ["My favourite animal is"] + others[2:]
    params = [SamplingParams(temperature=1.0, max_tokens=6)] * 2 + [seeded] + [SamplingParams(max_tokens=3)] * 3
    crowd = llm.generate(prompts, params)[2].outputs[0].token_ids
    assert crowd == alone


def test_n_completions_per_prompt(llm):
    """SamplingParams(n=3): one RequestOutput per prompt with outputs[0..2]; choice i is the request seeded
    seed + i (so a seeded call is reproducible and its choices differ); chat fans out the same way; one engine
    request is one sequence (n > 1 there, or in generate_stream, is a ParamError naming n)."""
    from minillm.sampling_params import ParamError
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    outs = llm.generate(["The capital of France is", "Hi"], params)
    assert [len(o.outputs) for o in outs] == [3, 3] and all(o.finished for o in outs)
    assert [c.index for c in outs[0].outputs] == [0, 1, 2]
    for i, choice in enumerate(outs[1].outputs):
        alone = llm.generate("Hi", SamplingParams(temperature=1.0, seed=11 + i, max_tokens=6, ignore_eos=True))
        assert choice.token_ids == alone[0].outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1  # seeded apart
    assert len(llm.chat([{"role": "user", "content": "Hi"}], params)[0].outputs) == 3
    with pytest.raises(ParamError, match="n=2: an engine request is one sequence"):
        llm.llm_engine.add_request(None, "Hi", SamplingParams(n=2))
    with pytest.raises(ParamError, match="generate_stream streams one sequence, got n=2"):
        next(llm.generate_stream("Hi", SamplingParams(n=2)))
    with pytest.raises(ParamError, match=r"n must be an integer in \[1, 16\], got 17"):
        SamplingParams(n=17)


def test_a_bad_request_in_generate_queues_none_of_them(llm):
    """A sampling check only the engine can make (a logit_bias id past the vocabulary) on the second prompt fails
    the call before anything is queued: the first prompt used to stay in the engine, stepped by every later call
    and never read."""
    from minillm.sampling_params import ParamError
    ok = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    bad = SamplingParams(temperature=0, max_tokens=3, logit_bias={10**6: 1.0})
    with pytest.raises(ParamError, match=r"sampling_params 1: logit_bias token id 1000000 is outside the vocabulary"):
        llm.generate(["The capital of France is", "Hi"], [ok, bad])
    assert llm.llm_engine.get_num_unfinished_requests() == 0
    assert llm.llm_engine.scheduler.block_manager.num_used_blocks == 0


def test_metrics_ordering(llm):
    out = llm.generate(["Hello there", "The sun"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    for o in out:
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time
        assert m.ttft > 0 and m.latency >= m.ttft and m.tpot > 0
        assert m.num_output_tokens == 5


def test_abort_and_stream_close_free_the_slot(llm):
    engine = llm.llm_engine
    total = engine.scheduler.num_free_blocks()
    stream = llm.generate_stream("Count from one to a hundred:", SamplingParams(max_tokens=100, ignore_eos=True))
    first = next(stream)
    assert not first.finished and first.outputs[0].token_ids
    assert engine.scheduler.num_free_blocks() < total
    stream.close()
    assert engine.scheduler.num_free_blocks() == total and not engine.has_unfinished_requests()
    rid = engine.add_request(None, "Abort me", SamplingParams(max_tokens=50))
    engine.step()
    aborted = llm.abort(rid)
    assert aborted.outputs[0].finish_reason == "abort"
    assert engine.scheduler.num_free_blocks() == total


def test_chat_returns_text(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=20))[0]
    assert "<|im_start|>assistant" in out.prompt
    assert "Paris" in out.outputs[0].text
    two = llm.chat([[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Bye"}]],
                   SamplingParams(temperature=0, max_tokens=3))
    assert len(two) == 2 and all(o.outputs[0].token_ids for o in two)


def test_eos_finishes_with_stop(llm):
    out = llm.chat([{"role": "user", "content": "Reply with just the word yes."}],
                   SamplingParams(temperature=0, max_tokens=30))[0]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids[-1] in llm.llm_engine.eos_token_ids
    assert "<|im_end|>" not in out.outputs[0].text


@pytest.fixture(scope="module")
def agreement_case(llm):
    prompts = ["The capital of France is", "Hi", "Water boils at a temperature of"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return prompts, params, [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("kwargs", [dict(scheduling="continuous", kv_layout="paged", block_size=4, num_kv_blocks=9),
                                    dict(scheduling="static", kv_layout="paged", block_size=16),
                                    dict(scheduling="static", kv_layout="contiguous")])
def test_other_schedulers_and_layouts_agree(llm, agreement_case, kwargs):
    """Same model, another engine: continuous batching over a pool too small for the batch (it must preempt),
    static batching over paged blocks, and chapter 2's static batching over a contiguous cache give the greedy
    tokens of the default engine (continuous batching over paged blocks)."""
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    prompts, params, expected = agreement_case
    base = llm.llm_engine
    assert (base.engine_config.scheduling, base.engine_config.kv_layout) == ("continuous", "paged")  # the default
    engine = LLMEngine(base.runner.model, base.tokenizer, base.model_config,
                       EngineConfig(max_model_len=256, max_num_seqs=4, **kwargs))
    assert [o.outputs[0].token_ids for o in LLM.from_engine(engine).generate(prompts, params)] == expected
    if kwargs["scheduling"] == "continuous":
        assert engine.scheduler.num_preemptions > 0
    # the model's attention layers now point at the second engine's cache: the first rebinds them and still works
    assert llm.generate(prompts[1], params)[0].outputs[0].token_ids == expected[1]


def test_quantization_on_load():
    """LLM(quantization=...) quantizes the dense (dequantized GGUF) weights while loading: int8 weights in every
    projection, and greedy text that starts like the fp32 model's; a bad name fails before any loading."""
    with pytest.raises(ValueError, match="unknown quantization 'int3_magic'"):
        LLM(quantization="int3_magic")
    quantized = LLM(max_model_len=128, max_num_seqs=2, quantization="int8_rtn")
    model = quantized.llm_engine.runner.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.qweight.dtype == torch.int8 and not hasattr(qkv, "weight")
    out = quantized.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))
    assert "Paris" in out[0].outputs[0].text


def test_fp8_on_load_and_calibrated_methods_point_to_quantize():
    quantized = LLM(max_model_len=128, max_num_seqs=2, quantization="fp8")
    out = quantized.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))
    assert "Paris" in out[0].outputs[0].text
    with pytest.raises(ValueError, match="minillm quantize"):
        LLM(max_model_len=128, quantization="gptq")  # a dense checkpoint: GPTQ needs calibration data
