"""Engine tests on a tiny random Llama and a byte-level tokenizer (fast; no model file needed).

The tiny model is the real LlamaForCausalLM with random weights, so every test goes through the real attention
layer, the real KV cache writes (slot_mapping) and reads (block_tables). The reference for "correct" is the
model's own greedy continuation computed by full forwards without any cache.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.kv_cache import KVCache
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.model_runner import ModelRunner
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.engine.static_scheduler import StaticScheduler
from minillm.llm import LLM
from minillm.models.llama import LlamaForCausalLM
from minillm.sampling_params import SamplingParams
from tiny import ByteTokenizer, EOS, one_thread  # noqa: F401  (one_thread: autouse fixture)


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, eos_token_id=EOS)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(config: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """Random weights for `config`, in its architecture's class (Mixtral's experts for architecture="mixtral")."""
    from minillm.models import get_model_class
    torch.manual_seed(seed)
    model = get_model_class(config.architecture)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.5 if "embed" in name else 1.0 / p.shape[-1] ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config()
    return tiny_model(config), config


def make_engine(model_and_config, **kw) -> LLMEngine:
    model, config = model_and_config
    engine_kw = dict(max_model_len=64, max_num_seqs=4, scheduling="static", kv_layout="contiguous")
    engine_kw.update(kw)
    seed, overrides = engine_kw.pop("seed", 0), engine_kw.pop("overrides", None)
    return LLMEngine(model, ByteTokenizer(), config, EngineConfig(**engine_kw), seed=seed, overrides=overrides)


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens by full forwards over the whole sequence each time (no KV cache at all)."""
    tokens = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.tensor(tokens)
            hidden = model(ids, torch.arange(len(tokens)))
            tokens.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return tokens[len(prompt):]


def run(engine: LLMEngine) -> dict[str, object]:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


PROMPTS = [[5, 9, 200], [17] * 11, list(range(40, 59)), [3]]


@pytest.mark.parametrize("kv", [
    dict(kv_layout="contiguous"), dict(kv_layout="paged", block_size=4),
    dict(kv_layout="paged", block_size=5, max_num_seqs=2),
    # the continuous batcher of chapter 6 through the same engine; a pool of 12 blocks of 4 tokens forces
    # preemptions, by recompute and by swapping blocks to CPU and back (the runner's swap path)
    dict(scheduling="continuous", kv_layout="paged", block_size=4, num_kv_blocks=12),
    dict(scheduling="continuous", kv_layout="paged", block_size=4, num_kv_blocks=12, preemption_mode="swap",
         swap_space=1 << 20),
])
def test_greedy_matches_cacheless_reference(model_and_config, kv):
    engine = make_engine(model_and_config, **kv)
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    done = run(engine)
    model = model_and_config[0]
    for i, p in enumerate(PROMPTS):
        assert done[str(i)].outputs[0].token_ids == greedy_reference(model, p, 9), f"prompt {i}"
        assert done[str(i)].outputs[0].finish_reason == "length"
    assert engine.scheduler.num_free_blocks() == engine.runner.kv_cache.num_blocks
    if kv.get("scheduling") == "continuous":
        assert engine.scheduler.num_preemptions > 0  # the small pool really did preempt
        assert (engine.runner.kv_cache._cpu_storage is not None) == (kv.get("preemption_mode") == "swap")


def test_static_batch_waits_for_longest(model_and_config):
    engine = make_engine(model_and_config, max_num_seqs=2)
    engine.add_request("short", [1, 2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.add_request("long", [1, 2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.add_request("next", [1, 2], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    first_step_of: dict[str, int] = {}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        batch_ids = [out.request_id for out in engine.step()]
        for rid in batch_ids:
            first_step_of.setdefault(rid, step)
        if step == 3:  # "short" finished at step 2 and drops out of the forward
            assert batch_ids == ["long"]
    # "next" is admitted only after "long" (6 steps) finished, although a slot was free from step 3 on
    assert first_step_of == {"short": 1, "long": 1, "next": 7}


def test_forward_counts_count_every_forward_by_how_it_ran(model_and_config):
    """ModelRunner.forward_counts: on a CPU there are no graphs, so every step's forward is counted "eager"."""
    engine = make_engine(model_and_config, max_num_seqs=2)
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    counts = engine.runner.forward_counts
    assert counts["eager"] == steps == 4 and counts["graph"] == counts["piecewise"] == 0


def test_max_model_len_ends_with_length(model_and_config):
    engine = make_engine(model_and_config, max_model_len=16)
    engine.add_request("a", list(range(1, 13)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    out = run(engine)["a"]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 16


def test_stop_strings_and_stop_tokens(model_and_config):
    engine = make_engine(model_and_config)
    prompt = [65, 66, 67]
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("free", prompt, free)
    full = run(engine)["free"].outputs[0]
    # take a stop string from the middle of what the model writes: the output must end right before it
    text = full.text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    engine.add_request("stopped", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                         stop=["never-there", stop]))
    out = run(engine)["stopped"].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(stop)]
    # a stop token id ends the request at that token, its text not included
    token = full.token_ids[4]
    engine.add_request("tok", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     stop_token_ids=[token]))
    out = run(engine)["tok"].outputs[0]
    first = full.token_ids.index(token)
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:first + 1]


def test_include_stop_str_in_output_keeps_the_stop_string_and_holds_nothing_back(model_and_config):
    """vLLM's include_stop_str_in_output: the text ends after the stop string that stopped it. A stream then has
    nothing to hold back (no text it shows can be cut later): every step's snapshot is the whole text so far, where
    without the flag the stop string's first character waits a step (it may become the stop string)."""
    engine = make_engine(model_and_config)
    prompt = [65, 66, 67]
    engine.add_request("free", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    text = run(engine)["free"].outputs[0].text
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2)
                if "\ufffd" not in text[i:i + 2] and text.index(text[i:i + 2]) == i)
    end = text.index(stop)
    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                                include_stop_str_in_output=include)
        engine.add_request("s", prompt, params)
        snapshots = []
        while engine.has_unfinished_requests():
            snapshots += [o for o in engine.step() if o.request_id == "s"]
        final = snapshots[-1].outputs[0]
        assert final.finish_reason == "stop" and final.stop_reason == stop
        assert final.text == text[:end + len(stop) if include else end]
        shown = [o.outputs[0].text for o in snapshots[:-1]]
        assert all(final.text.startswith(t) for t in shown)  # never taken back
        # the step that made the stop string's first character: shown at once only with the flag
        assert (text[:end + 1] in shown) == include


def test_eos_stops_unless_ignored(model_and_config):
    model, config = model_and_config
    # find what the model emits after a prompt, then declare that token the EOS
    first = greedy_reference(model, [7, 8, 9], 1)[0]
    engine = LLMEngine(model, ByteTokenizer(), tiny_config(eos_token_id=first),
                       EngineConfig(max_model_len=64, max_num_seqs=2, scheduling="static", kv_layout="contiguous"))
    engine.add_request("eos", [7, 8, 9], SamplingParams(temperature=0, max_tokens=5))
    engine.add_request("ignore", [7, 8, 9], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    done = run(engine)
    assert done["eos"].outputs[0].token_ids == [first] and done["eos"].outputs[0].finish_reason == "stop"
    assert len(done["ignore"].outputs[0].token_ids) == 5


def test_seeded_request_independent_of_batch(model_and_config):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, seed=1234, ignore_eos=True)
    engine = make_engine(model_and_config, max_num_seqs=6)
    engine.add_request("alone", [10, 11, 12], seeded)
    alone = run(engine)["alone"].outputs[0].token_ids
    for i in range(5):  # five unseeded neighbours, before and after it in the batch
        engine.add_request(f"n{i}", [30 + i] * (i + 1), SamplingParams(temperature=1.0, max_tokens=8))
        if i == 2:
            engine.add_request("crowd", [10, 11, 12], seeded)
    assert run(engine)["crowd"].outputs[0].token_ids == alone


def test_unseeded_sampling_follows_engine_seed(model_and_config):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    outs = []
    for seed in (3, 3, 4):
        engine = make_engine(model_and_config, seed=seed)
        engine.add_request("r", [1, 2, 3], params)
        outs.append(run(engine)["r"].outputs[0].token_ids)
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_add_request_rejects_only_the_bad_one(model_and_config):
    engine = make_engine(model_and_config)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("good1", [1, 2, 3], params)
    with pytest.raises(ValueError, match="300"):
        engine.add_request("bad", [1, 300, 3], params)
    engine.add_request("good2", [4, 5], params)
    done = run(engine)
    assert set(done) == {"good1", "good2"}
    assert all(len(o.outputs[0].token_ids) == 3 for o in done.values())


class _PoisonedModel(torch.nn.Module):
    """Wraps a model; raises inside the forward whenever token 99 is among the inputs."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, positions):
        if bool((input_ids == 99).any()):
            raise RuntimeError("poisoned token 99")
        return self.inner(input_ids, positions)

    def compute_logits(self, hidden):
        return self.inner.compute_logits(hidden)


def test_failing_step_errors_its_requests_only(model_and_config):
    model, config = model_and_config
    engine = LLMEngine(_PoisonedModel(model), ByteTokenizer(), config,
                       EngineConfig(max_model_len=32, max_num_seqs=1, scheduling="static", kv_layout="contiguous"))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for rid, prompt in (("a", [1, 2]), ("poison", [99, 1]), ("c", [3, 4])):
        engine.add_request(rid, prompt, params)
    done = run(engine)
    assert done["poison"].outputs[0].finish_reason == "error"
    assert "poisoned token 99" in done["poison"].outputs[0].error
    assert [done[r].outputs[0].finish_reason for r in ("a", "c")] == ["length", "length"]
    assert done["c"].outputs[0].token_ids == greedy_reference(model, [3, 4], 4)
    assert engine.scheduler.num_free_blocks() == engine.scheduler.num_blocks


def test_abort_frees_the_slot(model_and_config):
    engine = make_engine(model_and_config, max_num_seqs=2)
    engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("queued", [1, 2], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("waiting", [1], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    assert engine.scheduler.num_free_blocks() == 0
    out = engine.abort("x")
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 1
    assert engine.scheduler.num_free_blocks() == 1
    assert engine.abort("waiting").outputs[0].token_ids == []  # aborting a waiting request works too
    assert engine.abort("x") is None  # already gone
    engine.abort("queued")
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_free_blocks() == 2


def test_stream_close_aborts_and_concatenates(model_and_config):
    llm = LLM.from_engine(make_engine(model_and_config))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop="zz")
    final = llm.generate([[72, 101, 108]], params)[0].outputs[0]
    pieces = list(llm.generate_stream([72, 101, 108], params))
    assert "".join(p.outputs[0].text for p in pieces) == final.text
    assert sum((p.outputs[0].token_ids for p in pieces), []) == final.token_ids
    assert pieces[-1].finished and not any(p.finished for p in pieces[:-1])
    stream = llm.generate_stream([72, 101, 108], SamplingParams(max_tokens=40, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.scheduler.num_free_blocks() == llm.llm_engine.scheduler.num_blocks


def test_runner_prepare_metadata(model_and_config):
    model, config = model_and_config
    runner = ModelRunner(model, config, num_blocks=8, block_size=4, device=torch.device("cpu"),
                         dtype=torch.float32)
    a = Sequence("a", [1, 2, 3, 4, 5, 6], SamplingParams())
    a.block_table, a.num_computed_tokens = [5, 2], 3  # a chunk: tokens 3..5 crossing a block boundary
    b = Sequence("b", [7, 8, 9], SamplingParams())
    b.block_table = [7]
    c = Sequence("c", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    c.block_table = [0, 1, 3]  # a prefill chunk that does not reach the end: no sample
    prepared = runner.prepare(ScheduledBatch(seqs=[a, b, c], num_new_tokens=[3, 3, 4]))
    m = prepared.metadata
    assert prepared.input_ids.tolist() == [4, 5, 6, 7, 8, 9, 1, 2, 3, 4]
    assert prepared.positions.tolist() == [3, 4, 5, 0, 1, 2, 0, 1, 2, 3]
    assert m.slot_mapping.tolist() == [5 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1, 28, 29, 30, 0, 1, 2, 3]
    assert m.cu_seqlens_q.tolist() == [0, 3, 6, 10] and m.seq_lens.tolist() == [6, 3, 4]
    assert m.block_tables.tolist() == [[5, 2, -1], [7, -1, -1], [0, 1, 3]]
    assert (m.max_seqlen_q, m.max_seqlen_k, m.block_size) == (4, 6, 4)
    assert prepared.sample_indices.tolist() == [2, 5] and prepared.sample_seqs == [0, 1]


def test_kv_cache_swap_and_copy():
    config = tiny_config(num_hidden_layers=3)
    cache = KVCache(config, num_blocks=5, block_size=3, dtype=torch.float32, device=torch.device("cpu"),
                    num_cpu_blocks=4)
    torch.manual_seed(0)
    cache.storage.normal_()
    k0, v2 = cache.layer(0)[0], cache.layer(2)[1]
    assert k0.data_ptr() == cache.storage[0, 0].data_ptr() and v2.shape == (5, 3, 2, 8)  # views, not copies
    before = cache.storage.clone()
    cache.swap_out([(1, 3), (4, 0)])
    assert torch.equal(cache.cpu_storage[:, :, 3], before[:, :, 1])
    assert torch.equal(cache.cpu_storage[:, :, 0], before[:, :, 4])
    cache.storage[:, :, [1, 4]] = 0
    cache.swap_in([(3, 2), (0, 1)])  # back into different device blocks
    assert torch.equal(cache.storage[:, :, 2], before[:, :, 1]) and torch.equal(cache.storage[:, :, 1], before[:, :, 4])
    snapshot = cache.storage.clone()
    cache.copy([(0, 3), (3, 4)])  # a chain copies the old contents of block 3
    assert torch.equal(cache.storage[:, :, 3], snapshot[:, :, 0]) and torch.equal(cache.storage[:, :, 4], snapshot[:, :, 3])
    assert torch.equal(cache.storage[:, :, :3], snapshot[:, :, :3])
    with pytest.raises(ValueError, match=r"\[5\].*\[0, 5\)"):
        cache.copy([(0, 5)])
    with pytest.raises(ValueError, match="cpu"):
        cache.swap_out([(0, 4)])


def test_runner_applies_block_ops_before_forward(model_and_config):
    model, config = model_and_config
    runner = ModelRunner(model, config, num_blocks=4, block_size=8, device=torch.device("cpu"),
                         dtype=torch.float32, num_cpu_blocks=2)
    runner.kv_cache.storage[:, :, 1] = 1.5
    runner.apply_block_ops(ScheduledBatch(blocks_to_swap_out=[(1, 0)], blocks_to_copy=[(1, 3)]))
    assert bool((runner.kv_cache.cpu_storage[:, :, 0] == 1.5).all())
    assert bool((runner.kv_cache.storage[:, :, 3] == 1.5).all())
    # each attention layer sees its own view of the one storage tensor
    attn = [m for m in model.modules() if hasattr(m, "k_cache")]
    assert attn[1].v_cache.data_ptr() == runner.kv_cache.storage[1, 1].data_ptr()


def test_static_scheduler_slots():
    sched = StaticScheduler(max_num_seqs=2, max_model_len=10, block_size=4)
    seqs = [Sequence(str(i), [1] * (i + 2), SamplingParams()) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == seqs[:2] and batch.num_new_tokens == [2, 3]
    assert seqs[0].block_table == [0, 1, 2] and seqs[1].block_table == [3, 4, 5]
    assert sched.num_free_blocks() == 0
    with pytest.raises(ValueError, match="max_model_len=10"):
        sched.add(Sequence("long", [1] * 11, SamplingParams()))


def test_request_the_pool_can_never_hold_is_an_error_not_a_hang(model_and_config):
    # continuous batching over 12 blocks of 4 tokens (48 slots): a 50-token prompt can never fit, and generate
    # says so before any work, naming it; a 40-token prompt fits but cannot grow to 50 tokens: it ends in "error"
    # when it outgrows the pool, and the others still run
    llm = LLM.from_engine(make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4,
                                      num_kv_blocks=12))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with pytest.raises(ValueError, match=r"prompt 1: prompt has 50 tokens, 13 KV blocks of 4, but the pool gives "
                                         r"one sequence at most 12"):
        llm.generate([[1, 2, 3], [4] * 50, [5, 6]], params)
    outs = llm.generate([[1, 2, 3], [4] * 40, [5, 6]], params)
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "length"]
    assert "KV blocks" in outs[1].outputs[0].error
    assert not llm.llm_engine.has_unfinished_requests() and llm.llm_engine.get_num_unfinished_requests() == 0
    assert llm.llm_engine.scheduler.num_free_blocks() == 12


def test_overrides_run_inside_the_engine_and_a_broken_one_only_errors(model_and_config):
    pytest.importorskip("minillm.course.overrides")
    from minillm.layers.sampler import top_k_filter as reference
    calls = []

    def top_k_filter(logits, top_k):
        calls.append(int(top_k[0]))
        return reference(logits, top_k)

    engine = make_engine(model_and_config, overrides={"ch01.top_k_filter": top_k_filter})
    engine.add_request("k", [1, 2], SamplingParams(top_k=3, max_tokens=4, ignore_eos=True))
    assert run(engine)["k"].outputs[0].finish_reason == "length"
    assert calls == [3, 3, 3, 3]

    def top_p_filter(logits, top_p):
        raise ZeroDivisionError("learner bug")

    engine = make_engine(model_and_config, overrides={"ch01.top_p_filter": top_p_filter})
    engine.add_request("p", [1, 2], SamplingParams(top_p=0.5, max_tokens=4))
    engine.add_request("greedy", [1, 2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    done = run(engine)
    assert done["p"].outputs[0].finish_reason == "error" and "learner bug" in done["p"].outputs[0].error
    engine.add_request("after", [1, 2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert run(engine)["after"].outputs[0].token_ids == greedy_reference(model_and_config[0], [1, 2], 4)


def test_detokenizer_never_emits_half_characters():
    from minillm.engine.detokenizer import DetokenizerState, detokenize_incrementally
    tok = ByteTokenizer()
    text = "héllo wörld 😀 日本 ok"
    prompt, ids = tok.encode(">"), tok.encode(text)  # one byte per token: every multi-byte character is split
    state, pieces = DetokenizerState.for_prompt(len(prompt)), []
    for i in range(len(ids)):
        pieces.append(detokenize_incrementally(tok, prompt + ids[:i + 1], state))
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert pieces[ids.index(0xF0):ids.index(0xF0) + 3] == ["", "", ""]  # the emoji's first 3 bytes: nothing yet


def test_stop_string_helpers():
    from minillm.engine.detokenizer import find_stop_string, stream_safe_length
    assert find_stop_string("abc STOP def", ["STOP", "def"], new_text_len=12) == 4
    assert find_stop_string("abc STOP def", ["STOP"], new_text_len=1) == -1  # only the new tail is searched
    assert find_stop_string("xxST", ["STOP"], new_text_len=2) == -1
    assert stream_safe_length("hello ST", ["STOP"]) == 6  # "ST" may become "STOP": hold it back
    assert stream_safe_length("hello S", ["STOP", "Sx"]) == 6
    assert stream_safe_length("hello STO", ["STOP"]) == 6 and stream_safe_length("a S", ["Sx"]) == 2  # up to len - 1
    assert stream_safe_length("hello", ["STOP"]) == 5 and stream_safe_length("hello", []) == 5


def test_interleaved_streams_each_get_their_own_text(model_and_config):
    llm = LLM.from_engine(make_engine(model_and_config))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 7)]
    finals = llm.generate([[65, 66], [67, 68, 69]], params)
    a, b = llm.generate_stream([65, 66], params[0]), llm.generate_stream([67, 68, 69], params[1])
    got = {0: [], 1: []}
    live = {0: a, 1: b}
    while live:  # round-robin, as two server connections would
        for key in list(live):
            try:
                got[key].append(next(live[key]))
            except StopIteration:
                del live[key]
    for key in (0, 1):
        assert sum((d.outputs[0].token_ids for d in got[key]), []) == finals[key].outputs[0].token_ids
        assert "".join(d.outputs[0].text for d in got[key]) == finals[key].outputs[0].text
    assert not llm.llm_engine.has_unfinished_requests() and not llm._latest


def test_generate_with_progress_bar_and_ids_in_order(model_and_config, capsys):
    llm = LLM.from_engine(make_engine(model_and_config, max_num_seqs=2))
    lengths = [5, 1, 3]  # finish out of order; outputs still come back in input order
    outs = llm.generate([[1, 2]] * 3, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths],
                        use_tqdm=True)
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    assert "generate" in capsys.readouterr().err


def test_final_only_requests_appear_once_when_they_finish(model_and_config):
    """output_kind="final_only" (what LLM.generate asks for): step() returns nothing for such a request until the
    step it finishes, then the same output a cumulative request gets; LLM.generate leaves the caller's params as
    they were and still returns every output."""
    engine = make_engine(model_and_config, scheduling="continuous", kv_layout="paged")
    prompt = [3, 4, 5, 6]
    cumulative = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    final = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, output_kind="final_only")
    a, b = engine.add_request(None, prompt, cumulative), engine.add_request(None, prompt, final)
    seen = {a: [], b: []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen[a]) == 5 and [o.finished for o in seen[a]] == [False] * 4 + [True]
    assert len(seen[b]) == 1 and seen[b][0].finished
    assert seen[b][0].outputs[0].token_ids == seen[a][-1].outputs[0].token_ids
    llm = LLM.from_engine(engine)
    outs = llm.generate([prompt, prompt[:2]], cumulative)
    assert cumulative.output_kind == "cumulative" and [len(o.outputs[0].token_ids) for o in outs] == [5, 5]


def test_pool_size_check_rounds_max_model_len_up_to_whole_blocks():
    # 33 tokens need 3 blocks of 16: a budget of 2 blocks must be refused at start-up, not by an "error" later
    from minillm.engine.kv_cache import kv_bytes_per_block, num_device_blocks
    config, cpu = tiny_config(), torch.device("cpu")
    per_block = kv_bytes_per_block(config, 16, torch.float32)

    def pool(blocks: int) -> int:
        engine_config = EngineConfig(block_size=16, max_model_len=33, max_num_seqs=1, kv_cache_memory=blocks * per_block)
        return num_device_blocks(engine_config, config, torch.float32, cpu)

    assert pool(3) == 3
    with pytest.raises(ValueError, match="max_model_len=33 needs 3"):
        pool(2)


def test_a_shared_engines_pool_is_sized_for_its_own_work_within_free_memory():
    # LLM.share_model on a GPU: the first engine's pool already holds its share, so the second one's is
    # max_num_seqs x max_model_len (in whole blocks), capped by gpu_memory_utilization of the memory free now
    from minillm.engine.kv_cache import kv_bytes_per_block, shared_pool_memory
    config = tiny_config()
    per_block = kv_bytes_per_block(config, 16, torch.float32)
    engine_config = EngineConfig(block_size=16, max_model_len=33, max_num_seqs=4, gpu_memory_utilization=0.5)
    assert shared_pool_memory(engine_config, config, torch.float32, free_bytes=1 << 40) == 4 * 3 * per_block
    assert shared_pool_memory(engine_config, config, torch.float32, free_bytes=10 * per_block) == 5 * per_block
    fp8 = dataclasses.replace(engine_config, kv_cache_dtype="fp8")  # half the bytes a block
    assert shared_pool_memory(fp8, config, torch.float32, free_bytes=1 << 40) == 4 * 3 * per_block // 4


def test_detokenizer_keeps_a_leading_space_that_depends_on_context():
    # SentencePiece decodes "▁there" as "there" at the start of a text and as " there" after a word: the first
    # generated token must be decoded after some prompt tokens, or the space between prompt and output is lost
    from minillm.engine.detokenizer import DetokenizerState, detokenize_incrementally

    class SentencePieceLike:
        pieces = ["▁Hi", "▁there", "!"]

        def decode(self, token_ids: list[int]) -> str:
            text = "".join(self.pieces[t] for t in token_ids).replace("▁", " ")
            return text[1:] if text.startswith(" ") else text

    tok, state = SentencePieceLike(), DetokenizerState.for_prompt(1)
    assert detokenize_incrementally(tok, [0, 1], state) == " there"
    assert detokenize_incrementally(tok, [0, 1, 2], state) == "!"


def test_a_length_finish_flushes_a_pending_partial_character(model_and_config):
    llm = LLM.from_engine(make_engine(model_and_config))
    out = llm.generate([[65, 66]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert out.token_ids[-1] == 0xE9  # the first byte of a 3-byte character: its text is pending when the run ends
    assert out.text == ByteTokenizer().decode(out.token_ids) and out.text.endswith("\ufffd")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_share_model_without_a_pool_size():
    """On a GPU the first engine's profiled pool takes its gpu_memory_utilization share of the device: a shared
    engine with no pool size must still get one (max_num_seqs x max_model_len within the free memory) and run
    (chapter 9's notebook does this), equal to the first engine's greedy output."""
    from minillm.engine.worker import RandomWeights
    config = tiny_config(max_position_embeddings=256)
    model = RandomWeights(seed=3)(config, torch.device("cuda"), torch.float32)
    first = LLM.from_engine(LLMEngine(model, ByteTokenizer(), config, EngineConfig(max_model_len=128),
                                      device="cuda", dtype=torch.float32))
    shared = first.share_model(max_num_seqs=4)
    engine = shared.llm_engine
    assert engine.cache_config.num_gpu_blocks == 4 * (128 // engine.cache_config.block_size)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10]]
    assert [o.outputs[0].token_ids for o in shared.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in first.generate(prompts, params)]
