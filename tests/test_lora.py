"""Multi-LoRA serving (minillm.lora): PEFT adapters read and checked, each request with its own adapter inside the
continuous-batching engine, equal to the base model with that adapter merged into its weights."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.lora import LoRARequest
from minillm.lora.adapter import (CONFIG_FILE, LoRAAdapter, LoRAModule, load_adapter, projection_shape,
                                  random_adapter, save_adapter)
from minillm.lora.layers import PACKED
from minillm.models.llama import LlamaForCausalLM
from minillm.sampling_params import SamplingParams
from tiny import ByteTokenizer, EOS, one_thread  # noqa: F401  (one_thread: autouse fixture)

CONFIG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS)
PROMPTS = [[5, 9, 200, 31], [17] * 11, list(range(40, 59)), [3], [7, 7, 7, 8, 9], [100, 101], [42] * 5, [1, 2, 3]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.5 if "embed" in name else p.shape[-1] ** -0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three PEFT adapter directories: all seven projections at rank 8, attention only at rank 4, MLP only at
    rank 6 with its own alpha per module (alpha_pattern)."""
    root = tmp_path_factory.mktemp("adapters")
    specs = [("all", 8, None), ("attn", 4, ("q_proj", "v_proj", "o_proj")),
             ("mlp", 6, ("gate_proj", "up_proj", "down_proj"))]
    out = []
    for i, (name, rank, targets) in enumerate(specs):
        kw = {} if targets is None else {"targets": targets}
        adapter = random_adapter(CONFIG, rank, seed=i + 1, std=0.3, **kw)
        if name == "mlp":
            adapter.modules[1, "down_proj"].scaling = 0.5  # written as an alpha_pattern entry
        save_adapter(adapter, root / name)
        out.append(LoRARequest(name, i + 1, str(root / name)))
    return out


def merged(model: LlamaForCausalLM, path: str) -> LlamaForCausalLM:
    """A copy of `model` with the adapter folded into its weights: W + scaling * B A, in each packed layer's rows."""
    merged_model = copy.deepcopy(model)
    modules = dict(merged_model.named_modules())
    with torch.no_grad():
        for (layer, name), module in load_adapter(path).modules.items():
            packed = next(k for k, names in PACKED.items() if name in names)
            linear = modules[f"model.layers.{layer}.{packed}"]
            shards = PACKED[packed]
            offset, size = linear.shard_slice({"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": 0,
                                               "up_proj": 1}[name]) if len(shards) > 1 else (0, linear.output_size)
            linear.weight[offset:offset + size] += module.delta_weight()
    return merged_model


def engine_for(model, **kw) -> LLMEngine:
    options = dict(max_model_len=64, max_num_seqs=4, num_kv_blocks=64, block_size=4, enable_lora=True, max_loras=2,
                   max_lora_rank=8)
    options.update(kw)
    return LLMEngine(model, ByteTokenizer(), CONFIG, EngineConfig(**options))


def plain_engine(model, **kw) -> LLMEngine:
    options = dict(max_model_len=64, max_num_seqs=4, num_kv_blocks=64, block_size=4)
    options.update(kw)
    return LLMEngine(model, ByteTokenizer(), CONFIG, EngineConfig(**options))


def run(engine, prompts, loras, params=GREEDY, watch=None):
    ids = [engine.add_request(None, p, params, lora_request=r) for p, r in zip(prompts, loras)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
        if watch is not None:
            watch(engine)
    return [done[i] for i in ids]


def test_peft_files_round_trip(tmp_path):
    adapter = random_adapter(CONFIG, 4, targets=("q_proj", "down_proj"), seed=3)
    adapter.modules[0, "q_proj"].scaling = 0.5  # its own alpha: alpha_pattern
    save_adapter(adapter, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and set(config["target_modules"]) == {"q_proj",
                                                                                                    "down_proj"}
    back = load_adapter(tmp_path)
    assert set(back.modules) == set(adapter.modules) and back.rank == 4
    for key, module in adapter.modules.items():
        assert torch.equal(back.modules[key].a, module.a) and torch.equal(back.modules[key].b, module.b)
        assert back.modules[key].scaling == pytest.approx(module.scaling)
    # rsLoRA's scaling: alpha / sqrt(r)
    config.update(alpha_pattern={}, lora_alpha=8, use_rslora=True)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    assert load_adapter(tmp_path).modules[0, "q_proj"].scaling == pytest.approx(8 / 2)


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True), "use_dora"), (dict(bias="all"), "bias"), (dict(modules_to_save=["lm_head"]), "modules_to"),
    (dict(peft_type="IA3"), "peft_type")])
def test_unsupported_options_are_named(tmp_path, change, message):
    save_adapter(random_adapter(CONFIG, 2, targets=("q_proj",)), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        load_adapter(tmp_path)


def test_bad_adapters_are_named(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(tmp_path / "nowhere")
    save_adapter(random_adapter(CONFIG, 2, targets=("q_proj",)), tmp_path)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 32)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lora_A without lora_B"):
        load_adapter(tmp_path)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 32)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.lora_A"):
        load_adapter(tmp_path)
    wrong = LoRAAdapter({(0, "k_proj"): LoRAModule(torch.zeros(2, 32), torch.zeros(24, 2), 1.0)})
    with pytest.raises(ValueError, match=r"k_proj is \[16, 32\]"):
        wrong.check_model(CONFIG, 8)
    with pytest.raises(ValueError, match="rank 16 is above max_lora_rank=8"):
        random_adapter(CONFIG, 16, targets=("o_proj",)).check_model(CONFIG, 8)
    with pytest.raises(ValueError, match="layer 5 adapted"):
        random_adapter(CONFIG, 2, targets=("o_proj",), layers=range(5, 6)).check_model(CONFIG, 8)


def test_each_request_equals_its_merged_model(model, adapters):
    """Requests with three adapters and none, in one batch (two slots: the scheduler holds the third adapter's
    requests back until a slot frees), each equal to the base model with its adapter merged in."""
    loras = [adapters[i % 4] if i % 4 < 3 else None for i in range(len(PROMPTS))]
    seen = []
    engine = engine_for(model)
    got = run(engine, PROMPTS, loras, watch=lambda e: seen.append(
        len({s.lora_request for s in e.scheduler.running if s.lora_request is not None})))
    assert max(seen) <= 2 and engine.lora_slots.num_loads >= 3
    for request in adapters:
        plain = plain_engine(merged(model, request.lora_path))
        chosen = [i for i, r in enumerate(loras) if r == request]
        want = run(plain, [PROMPTS[i] for i in chosen], [None] * len(chosen))
        for i, w in zip(chosen, want):
            assert got[i].token_ids == w.token_ids, (request.lora_name, i)
            lp_got = [next(iter(d.values())).logprob for d in got[i].logprobs]
            lp_want = [next(iter(d.values())).logprob for d in w.logprobs]
            assert lp_got == pytest.approx(lp_want, abs=1e-4)
    base = run(plain_engine(model), PROMPTS, [None] * len(PROMPTS))
    assert all(got[i].token_ids == base[i].token_ids for i, r in enumerate(loras) if r is None)
    changed = [got[i].token_ids != base[i].token_ids for i, r in enumerate(loras) if r is not None]
    assert sum(changed) >= 4, changed  # the adapters do change the outputs


def test_prefix_cache_never_shares_blocks_across_adapters(model, adapters):
    """The same prompt under two adapters and the base model: each finds only its own blocks in the cache (the
    first block's key starts from the adapter's salt), and every output equals a cache-less run."""
    prompt = list(range(60, 81))
    order = [adapters[0], None, adapters[0], adapters[1], None]
    engine = engine_for(model, enable_prefix_caching=True)
    cache = engine.scheduler.block_manager.prefix_cache
    hits = []
    for lora in order:  # one at a time, so each finds what the earlier ones left
        before = cache.hits
        got = run(engine, [prompt], [lora])[0]
        hits.append(cache.hits - before)
        want = run(engine_for(model), [prompt], [lora])[0]
        assert got.token_ids == want.token_ids, lora
    assert hits[0] == hits[1] == hits[3] == 0 and hits[2] >= 16 and hits[4] >= 16, hits


@pytest.mark.parametrize("options", [dict(enable_chunked_prefill=True, max_num_batched_tokens=8),
                                     dict(num_kv_blocks=20, preemption_mode="swap", swap_space=1 << 20),
                                     dict(num_kv_blocks=20), dict(async_scheduling=True, max_loras=1)])
def test_chunks_preemption_and_async_steps_keep_the_outputs(model, adapters, options):
    loras = [adapters[i % 3] if i % 4 else None for i in range(len(PROMPTS))]
    want = run(engine_for(model, max_loras=3), PROMPTS, loras)
    engine = engine_for(model, **options)
    got = run(engine, PROMPTS, loras)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    if "num_kv_blocks" in options:
        assert engine.scheduler.num_preemptions > 0


def test_bad_lora_requests_fail_alone(model, adapters, tmp_path):
    engine = engine_for(model, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank 8 is above max_lora_rank=4"):
        engine.add_request(None, [1, 2], GREEDY, lora_request=adapters[0])
    with pytest.raises(ValueError, match="does not exist"):
        engine.add_request(None, [1, 2], GREEDY, lora_request=LoRARequest("gone", 9, str(tmp_path / "gone")))
    with pytest.raises(TypeError, match="LoRARequest"):
        engine.add_request(None, [1, 2], GREEDY, lora_request="attn")
    with pytest.raises(ValueError, match="without enable_lora"):
        plain_engine(model).add_request(None, [1, 2], GREEDY, lora_request=adapters[1])
    assert not engine.has_unfinished_requests()
    got = run(engine, PROMPTS[:3], [adapters[1], None, adapters[1]])  # the engine serves on
    assert all(len(o.token_ids) == 12 for o in got)
    with pytest.raises(ValueError, match="already names"):  # id 2 is adapters[1]'s now
        engine.add_request(None, [1, 2], GREEDY, lora_request=LoRARequest("other", 2, adapters[2].lora_path))
    for bad in (dict(lora_name=""), dict(lora_int_id=0), dict(lora_int_id=True), dict(lora_path=None)):
        with pytest.raises(ValueError):
            LoRARequest(**{**dict(lora_name="a", lora_int_id=1, lora_path="p"), **bad})


def test_a_failing_adapter_copy_fails_its_requests_only(model, adapters, monkeypatch):
    """The worker's copy into a slot fails (a file gone between the check and the copy): the step is rerun one
    request at a time, the requests of that adapter end with 'error', the others finish as they would have."""
    from minillm.lora.layers import LoRAWeights
    real = LoRAWeights.load

    def load(self, slot, request):
        if request.lora_int_id == adapters[2].lora_int_id:
            raise OSError("adapter file vanished")
        return real(self, slot, request)

    monkeypatch.setattr(LoRAWeights, "load", load)
    loras = [adapters[0], adapters[2], None, adapters[1]]
    got = run(engine_for(model), PROMPTS[:4], loras)
    assert got[1].finish_reason == "error" and "vanished" in got[1].error
    monkeypatch.setattr(LoRAWeights, "load", real)
    want = run(engine_for(model), [PROMPTS[i] for i in (0, 2, 3)], [loras[i] for i in (0, 2, 3)])
    assert [got[i].token_ids for i in (0, 2, 3)] == [o.token_ids for o in want]


@pytest.mark.parametrize("options, message", [
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}), "speculative"),
    (dict(scheduling="static"), "static"), (dict(expert_parallel_size=2), "expert_parallel_size"),
    (dict(max_lora_rank=1024), "max_lora_rank"), (dict(max_loras=0), "max_loras"),
    (dict(max_loras=4, max_cpu_loras=2), "max_cpu_loras")])
def test_engine_options_that_do_not_combine_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(enable_lora=True, **options)


def test_llm_generate_takes_one_or_a_list_of_requests(model, adapters):
    from minillm.llm import LLM
    llm = LLM.from_engine(engine_for(model))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    one = llm.generate([PROMPTS[0], PROMPTS[1]], params, lora_request=adapters[1])
    each = llm.generate([PROMPTS[0], PROMPTS[1]], params, lora_request=[adapters[1], None])
    assert one[0].outputs[0].token_ids == each[0].outputs[0].token_ids
    alone = llm.generate([PROMPTS[1]], params)
    assert each[1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="2 entries for 3 prompts"):
        llm.generate(PROMPTS[:3], params, lora_request=[adapters[1], None])
    with pytest.raises(ValueError, match="lora_request 1: .*does not exist"):
        llm.generate(PROMPTS[:2], params, lora_request=[None, LoRARequest("x", 7, "/nowhere/at/all")])
    streamed = list(llm.generate_stream(PROMPTS[0], params, lora_request=adapters[1]))
    assert [t for o in streamed for t in o.outputs[0].token_ids] == one[0].outputs[0].token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_gpu_adapters_through_the_kernels_beside_graph_steps(model, adapters, async_scheduling):
    """On CUDA (fp32, CUDA graphs on): the SGMV kernels give each request its merged model's tokens; decode and
    prefill steps with adapters replay the LoRA graph sets, and steps without adapters the plain ones."""
    def cuda_engine(m, **kw):
        options = dict(max_model_len=64, max_num_seqs=8, num_kv_blocks=128, block_size=16,
                       async_scheduling=async_scheduling)
        options.update(kw)
        return LLMEngine(copy.deepcopy(m).cuda(), ByteTokenizer(), CONFIG, EngineConfig(**options), device="cuda",
                         dtype=torch.float32)

    loras = [adapters[i % 4] if i % 4 < 3 else None for i in range(len(PROMPTS))]
    engine = cuda_engine(model, enable_lora=True, max_loras=2, max_lora_rank=8)
    runner = engine.runner
    assert runner.lora_graphs is not None and runner.lora_graphs.graphs
    got = run(engine, PROMPTS, loras)
    counts = dict(runner.forward_counts)
    assert counts["graph"] > 0 and counts["piecewise"] > 0 and not counts.get("eager"), counts  # all in graphs
    tail = run(engine, PROMPTS[3:4], [None])  # alone, without adapters: the plain graphs
    assert tail[0].token_ids == got[3].token_ids
    alone = run(engine, PROMPTS[0:1], [loras[0]])  # alone, with its adapter: the LoRA graphs of batch 1
    assert alone[0].token_ids == got[0].token_ids
    for request in [*adapters, None]:
        plain = cuda_engine(model if request is None else merged(model, request.lora_path))
        chosen = [i for i, r in enumerate(loras) if r == request]
        want = run(plain, [PROMPTS[i] for i in chosen], [None] * len(chosen))
        for i, w in zip(chosen, want):
            assert got[i].token_ids == w.token_ids, (request, i)
            lp_got = [next(iter(d.values())).logprob for d in got[i].logprobs]
            assert lp_got == pytest.approx([next(iter(d.values())).logprob for d in w.logprobs], abs=1e-3)


def test_beam_search_runs_under_an_adapter(model, adapters):
    """LLM.beam_search(..., lora_request=): width 1 is the adapter's greedy output."""
    from minillm.beam_search import BeamSearchParams
    from minillm.llm import LLM
    llm = LLM.from_engine(engine_for(model))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    greedy = llm.generate([PROMPTS[2]], params, lora_request=adapters[0])[0].outputs[0].token_ids
    beams = llm.beam_search([PROMPTS[2]], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True),
                            lora_request=adapters[0])
    assert beams[0].sequences[0].tokens == greedy
    with pytest.raises(ValueError, match="does not exist"):
        llm.beam_search([PROMPTS[2]], BeamSearchParams(beam_width=2, max_tokens=2), LoRARequest("x", 9, "/no/where"))
