"""Prefill/decode disaggregation on CPU processes (gloo): chapter 11.

    pack/unpack: a request's blocks travel between pools whose block ids differ, and bad input is refused
    a prefill worker and a decode worker give the same greedy tokens as one engine, for prompts of 1 token,
    exactly one block, one past a block and several blocks, with chunked prefill and a decode pool too small for
    all of them at once (requests wait for decode blocks, none is dropped)
    the KV bytes each request sends equal 2 x layers x prompt rounded to blocks x kv_heads x head_dim x 4
    no block is left in use on either side; an abort between the sides frees both
    a killed decode or prefill worker ends the engine with an error naming it, at once, never a hang
    LLM(DIR, disaggregation=...) on a tiny HF checkpoint gives LLM(DIR)'s greedy tokens (SmolLM2 would cost ~30 s
    here: each worker dequantizes the GGUF)
"""
from __future__ import annotations

import time

import pytest
import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.cache_config import resolve_engine_config
from minillm.engine.disagg_engine import DisaggregatedEngine, DisaggregationConfig
from minillm.engine.executor import UniProcExecutor, WorkerError
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import RandomWeights, Worker
from minillm.parallel.kv_transfer import kv_transfer_bytes, pack_kv_blocks, unpack_kv_blocks
from minillm.sampling_params import SamplingParams
from tiny import ByteTokenizer, one_thread, tiny_qwen2_checkpoint  # noqa: F401 (one_thread: autouse)

CONFIG = ModelConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=257,
                     tie_word_embeddings=True)
BLOCK = 4
# chunks of at most 8 tokens (the 17-token prompt takes three prefill steps); the prefill side's prefix cache on
ENGINE = dict(max_model_len=64, max_num_seqs=4, block_size=BLOCK, num_kv_blocks=48, enable_chunked_prefill=True,
              max_num_batched_tokens=8, enable_prefix_caching=True)
# 1 token, exactly one block, one past a block, two blocks exactly, several blocks
PROMPTS = [[100], [200, 201, 202, 203], [5, 6, 7, 8, 9], list(range(10, 18)), list(range(30, 47))]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# greedy for every prompt (the second with logits processors: its history crosses to the decode side; the longest
# also with log-probs: its prompt's scored on the prefill side, its tokens' on both), and the one-past-a-block
# prompt once more seeded: its generator travels with its KV, and its first
# block comes from the prefill side's prefix cache
PARAMS = [GREEDY, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.5,
                                  frequency_penalty=0.4, logit_bias={7: 2.0}, min_tokens=2)] + \
    [GREEDY] * (len(PROMPTS) - 3) + [
    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1),
    SamplingParams(temperature=1.0, max_tokens=6, seed=7, ignore_eos=True)]
DECODE_BLOCKS = 10  # the six requests need 21 blocks at their longest: some wait for the decode side


def _generate(engine: LLMEngine) -> tuple[dict[str, list[int]], list[tuple[int, int, int, float]]]:
    """(request id -> generated tokens, the log-probs of the request that asks for them)."""
    ids = [engine.add_request(None, p, params) for p, params in zip(PROMPTS + [PROMPTS[2]], PARAMS)]
    done: dict[str, list[int]] = {}
    logprobs = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.outputs[0].finish_reason == "length", out.outputs[0].error
                done[out.request_id] = out.outputs[0].token_ids
                if out.prompt_logprobs is not None:
                    logprobs = _flat(out.prompt_logprobs[1:] + out.outputs[0].logprobs)
    return {i: done[i] for i in ids}, logprobs


def _flat(entries: list[dict]) -> list[tuple[int, int, int, float]]:
    return [(i, token, lp.rank, lp.logprob) for i, entry in enumerate(entries) for token, lp in sorted(entry.items())]


def _assert_same_logprobs(ours: list[tuple[int, int, int, float]], expected: list[tuple[int, int, int, float]],
                          tolerance: float = 1e-5) -> None:
    assert [entry[:3] for entry in ours] == [entry[:3] for entry in expected]  # position, token, rank
    # other batches, other rounding: the prefill worker's batches are not the single engine's
    assert [lp for *_, lp in ours] == pytest.approx([lp for *_, lp in expected], abs=tolerance)


def _disaggregated(**plan) -> DisaggregatedEngine:
    return DisaggregatedEngine(RandomWeights(seed=3), ByteTokenizer(), CONFIG, EngineConfig(**ENGINE),
                               disaggregation=plan)


@pytest.fixture(scope="module")
def expected() -> tuple[dict[str, list[int]], list[tuple[int, int, int, float]]]:
    config = resolve_engine_config(EngineConfig(**ENGINE), CONFIG, torch.device("cpu"))
    worker = Worker(CONFIG, config, torch.device("cpu"), torch.float32, RandomWeights(seed=3))
    engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE), executor=UniProcExecutor(worker))
    return _generate(engine)


def test_pack_unpack_moves_blocks_between_pools_with_other_block_ids():
    torch.manual_seed(0)
    source = torch.randn(2, 3, 9, BLOCK, 2, 8)
    target = torch.zeros(2, 3, 6, BLOCK, 2, 8)
    packed = pack_kv_blocks(source, [7, 2, 5])
    assert packed.shape == (2, 3, 3, BLOCK, 2, 8) and packed.is_contiguous()
    assert packed.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
    unpack_kv_blocks(target, [0, 4, 1], packed)
    for logical, (src, dst) in enumerate(zip([7, 2, 5], [0, 4, 1])):
        assert torch.equal(target[:, :, dst], source[:, :, src]), f"logical block {logical}"
    assert not target[:, :, [2, 3, 5]].any()  # other blocks untouched
    assert packed.numel() * 4 == kv_transfer_bytes(9, BLOCK, 3, 2, 8, torch.float32)  # 9 tokens: 3 whole blocks

    # an fp8 cache (1-byte floats, which some indexing kernels do not know) moves as its bytes
    fp8 = source.to(torch.float8_e4m3fn)
    fp8_target = torch.zeros_like(fp8)
    unpack_kv_blocks(fp8_target, [0, 4, 1], pack_kv_blocks(fp8, [7, 2, 5]))
    assert torch.equal(fp8_target[:, :, 4].view(torch.uint8), fp8[:, :, 2].view(torch.uint8))

    with pytest.raises(ValueError, match=r"outside \[0, 9\)"):
        pack_kv_blocks(source, [9])
    with pytest.raises(ValueError, match="repeat a block"):
        pack_kv_blocks(source, [1, 1])
    with pytest.raises(ValueError, match="empty"):
        pack_kv_blocks(source, [])
    with pytest.raises(ValueError, match="expected"):
        unpack_kv_blocks(target, [0, 1], packed)
    with pytest.raises(ValueError, match="one dtype"):
        unpack_kv_blocks(target, [0, 4, 1], packed.double())
    with pytest.raises(ValueError, match="must be a tensor"):
        pack_kv_blocks(source[0], [0])


def test_decode_side_adopts_the_prefill_sides_fp8_kv_scales_in_place():
    from minillm.engine.cache_config import make_cache_config
    from minillm.parallel.disagg import kv_scales
    config = resolve_engine_config(EngineConfig(**ENGINE, kv_cache_dtype="fp8"), CONFIG, torch.device("cpu"))
    worker = Worker(CONFIG, config, torch.device("cpu"), torch.float32, RandomWeights(seed=3))
    worker.load_model()
    worker.initialize_cache(make_cache_config(config, 48, 1))
    prefill_side = kv_scales(worker) * 3  # as if the other worker had calibrated other scales
    assert torch.equal(kv_scales(worker, prefill_side), prefill_side)
    attention = worker.runner.attention_layers[1]
    assert torch.equal(attention.k_scale, prefill_side[0, 1])  # the layers read them through their views


class _FailsToLoad:
    def __call__(self, model_config, device, dtype):
        raise OSError("checkpoint unreadable")


def test_a_worker_that_cannot_load_fails_the_engine_with_its_reason():
    with pytest.raises(WorkerError, match="prefill worker: OSError: checkpoint unreadable"):
        DisaggregatedEngine(_FailsToLoad(), ByteTokenizer(), CONFIG, EngineConfig(**ENGINE))


def test_bad_disaggregation_options_are_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="1 prefill and 1 decode worker, got prefill=2"):
        DisaggregationConfig.from_value({"prefill": 2})
    with pytest.raises(ValueError, match=r"unknown disaggregation option\(s\) \['decoders'\]"):
        DisaggregationConfig.from_value({"decoders": 1})
    with pytest.raises(ValueError, match="decode_num_kv_blocks must be None or an integer >= 1, got 0"):
        DisaggregationConfig(decode_num_kv_blocks=0)
    # devices reached torch (its list of every backend) or a worker process that died with the reason in its stderr
    with pytest.raises(ValueError, match=r"decode_device='bogus' is not a device; allowed: None, 'cpu', 'cuda'"):
        DisaggregationConfig(decode_device="bogus")
    with pytest.raises(ValueError, match=r"prefill_device=3 is not a device"):
        DisaggregationConfig(prefill_device=3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"prefill_device='cuda', but this machine has 0 CUDA device\(s\)"):
            DisaggregationConfig(prefill_device="cuda")
    assert DisaggregationConfig(prefill_device="cpu").device("prefill", torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="continuous batching over paged KV blocks"):
        DisaggregatedEngine(RandomWeights(), ByteTokenizer(), CONFIG, EngineConfig(scheduling="static"))
    with pytest.raises(ValueError, match="speculative decoding is not supported"):
        DisaggregatedEngine(RandomWeights(), ByteTokenizer(), CONFIG,
                            EngineConfig(speculative_model="[ngram]", num_speculative_tokens=2))
    from minillm import LLM  # LLM checks before it loads anything
    with pytest.raises(ValueError, match="1 prefill and 1 decode worker, got prefill=1, decode=3"):
        LLM("/nonexistent", device="cpu", disaggregation={"decode": 3})
    with pytest.raises(ValueError, match="give neither distributed_executor_backend nor overrides"):
        LLM("/nonexistent", device="cpu", disaggregation={}, distributed_executor_backend="mp")
    with pytest.raises(ValueError, match="tensor_parallel_size, pipeline_parallel_size and expert_parallel_size"):
        LLM("/nonexistent", device="cpu", disaggregation={}, tensor_parallel_size=3)


def test_disaggregated_matches_one_engine_counts_bytes_leaks_nothing_and_survives_a_dead_decode_worker(expected):
    engine = _disaggregated(decode_num_kv_blocks=DECODE_BLOCKS)
    try:
        assert engine.scheduler.decode.block_manager.num_blocks == DECODE_BLOCKS
        tokens, logprobs = _generate(engine)
        assert list(tokens.values()) == list(expected[0].values())
        _assert_same_logprobs(logprobs, expected[1])
        assert logprobs[-1][0] == len(PROMPTS[4]) - 1 + 6 - 1  # every prompt position and every token scored
        assert engine.scheduler.prefill.block_manager.prefix_cache_hits == BLOCK
        # back-pressure: the decode side never ran all six at once, and everybody finished
        assert max(r.num_running for r in engine.scheduler.decode.timeline) < len(PARAMS)
        # bytes: per request, the analytic count; per worker, their sum, sent by one and received by the other
        analytic = [kv_transfer_bytes(len(p), BLOCK, CONFIG.num_hidden_layers, CONFIG.num_key_value_heads,
                                      CONFIG.head_dim, torch.float32) for p in PROMPTS + [PROMPTS[2]]]
        assert [engine.kv_bytes_sent[i] for i in tokens] == analytic
        assert engine.get_comm_stats(reset=True) == {"prefill": {"kv_send": sum(analytic)},
                                                     "decode": {"kv_recv": sum(analytic)}}
        assert engine.num_used_blocks() == {"prefill": 0, "decode": 0}
        engine.scheduler.check_invariants()

        # reset_prefix_cache forgets both sides' cached blocks: PROMPTS[2] again hits nothing this time
        assert engine.reset_prefix_cache()
        engine.add_request("again", PROMPTS[2], GREEDY)
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.scheduler.prefill.block_manager.prefix_cache_hits == BLOCK
        engine.scheduler.check_invariants()
        sent, received = engine.collective_rpc("get_comm_stats")  # the prefill worker, then the decode worker
        assert set(sent) == {"kv_send"} and set(received) == {"kv_recv"}

        # aborted on its way between the sides, or while a worker computes its step (the router does not wait for
        # the worker): both sides' blocks come back, the others finish
        engine.add_request("between", PROMPTS[4], GREEDY)
        while not engine.scheduler.transfers:
            engine.step()
        engine.abort("between")
        engine.add_request("decoding", PROMPTS[2], GREEDY)
        engine.add_request("prefilling", list(range(60, 100)), GREEDY)  # five chunks of 8
        in_step = {role: False for role in ("prefill", "decode")}
        while engine.has_unfinished_requests() and not all(in_step.values()):
            for role, rid in (("prefill", "prefilling"), ("decode", "decoding")):
                batch = engine._in_flight.get(role, (None,))[0]
                if batch is not None and any(seq.request_id == rid for seq in batch.seqs):
                    engine.abort(rid)
                    in_step[role] = True
            engine.step()
        assert in_step == {"prefill": True, "decode": True}
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.num_used_blocks() == {"prefill": 0, "decode": 0}
        engine.scheduler.check_invariants()

        # the decode worker dies mid-run: the step ends every request with the reason, and nothing waits
        engine.add_request("a", PROMPTS[2], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        while not engine.scheduler.decode.running:
            engine.step()
        decode = engine.workers.workers["decode"].process
        decode.kill()
        decode.join(timeout=10)
        start = time.perf_counter()
        outputs = []
        while not outputs:
            outputs = [o for o in engine.step() if o.request_id == "a"]
        (out,) = outputs
        assert out.finished and out.outputs[0].finish_reason == "error"
        assert f"the decode worker (pid {decode.pid}) died" in out.outputs[0].error
        with pytest.raises(RuntimeError, match="decode worker"):
            engine.add_request(None, PROMPTS[0], GREEDY)
        assert time.perf_counter() - start < 10
    finally:
        engine.shutdown()
    assert not any(w.process.is_alive() for w in engine.workers.workers.values())


def test_llm_front_on_a_checkpoint_matches_one_engine_and_fails_fast_without_its_prefill_worker(tmp_path):
    """LLM(DIR, disaggregation=...): each worker reads a tiny HF checkpoint (Qwen2: q/k/v biases, untied head)
    itself; the same greedy tokens as LLM(DIR). Then the prefill worker is killed: the next request ends with
    the reason at once, and the engine refuses more."""
    from minillm import LLM
    tiny_qwen2_checkpoint(tmp_path)
    prompts = ["ab ab a b w5 w6 w7", "w7 w9 ab"]
    params = SamplingParams(temperature=0, max_tokens=6)
    options = dict(device="cpu", dtype="float32", max_model_len=64, block_size=BLOCK)
    expected = [o.outputs[0].token_ids for o in LLM(tmp_path, **options).generate(prompts, params)]
    llm = LLM(tmp_path, disaggregation={"prefill": 1, "decode": 1}, **options)
    engine = llm.llm_engine
    try:
        assert isinstance(engine, DisaggregatedEngine)
        outputs = llm.generate(prompts, params)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        assert all(o.metrics.ttft is not None and o.metrics.tpot is not None for o in outputs)

        prefill = engine.workers.workers["prefill"].process
        prefill.kill()
        prefill.join(timeout=10)
        start = time.perf_counter()
        engine.add_request("b", prompts[0], params)
        (out,) = engine.step()
        assert out.outputs[0].finish_reason == "error"
        assert f"the prefill worker (pid {prefill.pid}) died" in out.outputs[0].error
        assert not engine.has_unfinished_requests()
        with pytest.raises(RuntimeError, match="prefill worker"):
            engine.step()
        assert time.perf_counter() - start < 10
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_disaggregated_matches_one_engine():
    """On CUDA: with 2 GPUs the prefill worker on cuda:0, the decode worker on cuda:1, KV over NCCL; with one GPU
    both on it and the KV through CPU memory over gloo. Greedy tokens equal one engine's, bytes as analytic."""
    engine_options = dict(max_model_len=64, max_num_seqs=4, block_size=BLOCK, enable_chunked_prefill=True,
                          max_num_batched_tokens=8, attention_backend="torch", enforce_eager=True,
                          num_kv_blocks=64)  # explicit: profiling would count what earlier GPU tests still hold
    torch.backends.cuda.matmul.allow_tf32 = False
    config = resolve_engine_config(EngineConfig(**engine_options), CONFIG, torch.device("cuda"))
    worker = Worker(CONFIG, config, torch.device("cuda"), torch.float32, RandomWeights(seed=3))
    local = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**engine_options), device=torch.device("cuda"),
                      executor=UniProcExecutor(worker))
    expected, expected_logprobs = _generate(local)
    engine = DisaggregatedEngine(RandomWeights(seed=3), ByteTokenizer(), CONFIG, EngineConfig(**engine_options),
                                 device=torch.device("cuda"), dtype=torch.float32)
    try:
        assert engine.workers.backend == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")
        tokens, logprobs = _generate(engine)
        assert list(tokens.values()) == list(expected.values())
        _assert_same_logprobs(logprobs, expected_logprobs, tolerance=1e-4)  # cuBLAS picks kernels by shape
        analytic = [kv_transfer_bytes(len(p), BLOCK, CONFIG.num_hidden_layers, CONFIG.num_key_value_heads,
                                      CONFIG.head_dim, torch.float32) for p in PROMPTS + [PROMPTS[2]]]
        assert [engine.kv_bytes_sent[i] for i in tokens] == analytic
        assert engine.num_used_blocks() == {"prefill": 0, "decode": 0}
    finally:
        engine.shutdown()
