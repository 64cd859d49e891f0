"""Tensor and pipeline parallelism on CPU processes (gloo): chapter 11.

    TP=2 and PP=2 (2 worker processes each) give the same greedy and seeded tokens as one process, on a tiny
    random model with tied embeddings; the torchrun entry at TP=2 on a tiny Qwen2 checkpoint (biases, untied
    head); the bundled SmolLM2 at TP=3 (marked slow)
    each rank holds only its shard (weights and KV pool), K/V heads replicated when fewer than the ranks
    the bytes each rank hands to torch.distributed per step equal the analytic count
    a worker killed mid-run, or dead at start, makes the engine fail with a RuntimeError naming the rank, at once
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.cache_config import resolve_engine_config
from minillm.engine import executor as executor_module
from minillm.engine.executor import MultiProcExecutor, UniProcExecutor, WorkerError, desynchronised
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import RandomWeights, Worker
from minillm.models.llama import LlamaForCausalLM
from minillm.parallel.pipeline import get_pp_indices
from minillm.parallel.runner import split_step
from minillm.parallel.state import ParallelState, init_parallel_state, single_rank
from minillm.parallel.weights import rank_model_config
from minillm.sampling_params import SamplingParams
from tiny import ByteTokenizer, tiny_qwen2_checkpoint

CONFIG = ModelConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=257,
                     tie_word_embeddings=True)
ENGINE = dict(max_model_len=64, max_num_seqs=4, block_size=4, num_kv_blocks=48)
PROMPTS = [[5, 6, 7, 8, 9], list(range(30, 47)), [100], [200, 201, 202]]
PARAMS = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
          SamplingParams(temperature=1.0, max_tokens=4, seed=7, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.3,
                         logit_bias={5: 1.0}, min_p=0.1)]  # logits processors: the parallel runner's own sampling


def _kwargs(**parallel) -> dict:
    config = resolve_engine_config(EngineConfig(**ENGINE, **parallel), CONFIG, torch.device("cpu"))
    return dict(model_config=CONFIG, engine_config=config, device=torch.device("cpu"), dtype=torch.float32,
                model_source=RandomWeights(seed=3), seed=0)


def _engine(engine_kwargs: dict, **parallel) -> LLMEngine:
    """An engine over CONFIG's random weights: in this process, or in worker processes for `parallel` sizes."""
    config = resolve_engine_config(EngineConfig(**engine_kwargs, **parallel), CONFIG, torch.device("cpu"))
    kwargs = dict(_kwargs(), engine_config=config)
    executor = MultiProcExecutor(kwargs) if parallel else UniProcExecutor(Worker(**kwargs))
    return LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**engine_kwargs, **parallel), executor=executor)


def _generate(engine: LLMEngine) -> list[list[int]]:
    ids = [engine.add_request(None, p, sp) for p, sp in zip(PROMPTS, PARAMS)]
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        tokens.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    return [tokens[i] for i in ids]


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE),
                       executor=UniProcExecutor(Worker(**_kwargs())))
    return _generate(engine)


def _one_step_bytes(executor: MultiProcExecutor, engine: LLMEngine, prompt_len: int) -> list[dict[str, int]]:
    executor.collective_rpc("get_comm_stats", True)  # reset
    engine.add_request("bytes", list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=1))
    engine.step()  # one prefill of prompt_len tokens, one sampled row
    return executor.collective_rpc("get_comm_stats", True)


def test_tensor_parallel_2_matches_one_process_counts_bytes_and_fails_fast_on_a_killed_worker(expected):
    executor = MultiProcExecutor(_kwargs(tensor_parallel_size=2))
    try:
        engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE), executor=executor)
        assert _generate(engine) == expected
        # analytic count, fp32: per layer 2 all-reduces of [T, hidden], one after the embedding; the LM head's
        # logits slice [rows, ceil(vocab / 2)] gathered from rank 2 to rank 1
        T, h = 11, CONFIG.hidden_size
        all_reduce = (2 * CONFIG.num_hidden_layers + 1) * T * h * 4
        stats = _one_step_bytes(executor, engine, T)
        assert stats[0] == {"all_reduce": all_reduce}
        assert stats[1] == {"all_reduce": all_reduce, "gather": 1 * 151 * 4}

        check_killed_worker_fails_fast(engine, executor)
    finally:
        executor.shutdown()  # also ends the surviving worker, which waits in a collective that cannot complete
    assert not any(p.is_alive() for p in executor.processes)


def check_killed_worker_fails_fast(engine: LLMEngine, executor: MultiProcExecutor) -> None:
    """Kill rank 2 mid-run: the engine's next step fails with its rank, at once, and so does every later call."""
    engine.add_request("a", PROMPTS[0], PARAMS[0])
    engine.step()
    executor.processes[1].kill()
    executor.processes[1].join(timeout=10)
    start = time.perf_counter()
    (out,) = engine.step()  # the engine isolates the failure: the step's requests end with the reason
    assert out.finished and out.outputs[0].finish_reason == "error"
    assert "RuntimeError: worker process died: rank 2 (pid" in out.outputs[0].error
    with pytest.raises(RuntimeError, match="rank 2"):
        executor.collective_rpc("get_comm_stats")
    assert time.perf_counter() - start < 10


class _DiesOnArrival:
    """Unpickled in the child, it ends the process before it joins the group (a crash at start)."""

    def __reduce__(self):
        return os._exit, (3,)


def test_worker_that_dies_at_start_fails_fast():
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"died before joining the group: rank 1 \(pid \d+, exit code 3\)"):
        MultiProcExecutor({**_kwargs(), "model_source": _DiesOnArrival()})
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_logprobs_and_prompt_logprobs_under_parallelism(parallel):
    """SamplingParams.logprobs / prompt_logprobs at TP = 2 and PP = 2 (two micro-batches, prompts in chunks of 8):
    the same tokens, ranks and top alternatives as one process, log-probs within summation order (they used to
    finish every such request with an error)."""
    engine_kwargs = dict(ENGINE, enable_chunked_prefill=True, max_num_batched_tokens=8)
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2, prompt_logprobs=1),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)]

    def run(**par):
        engine = _engine(engine_kwargs, **par)
        try:
            ids = [engine.add_request(None, p, sp) for p, sp in zip(PROMPTS, params)]
            done = {}
            while engine.has_unfinished_requests():
                done.update((o.request_id, o) for o in engine.step() if o.finished)
            return [done[i] for i in ids]
        finally:
            engine.shutdown()

    def flat(out):  # (position, token id, rank, log-prob) of every entry of every scored token
        dicts = list(out.outputs[0].logprobs or []) + [d for d in out.prompt_logprobs or [] if d]
        return [(pos, tok, lp.rank, lp.logprob) for pos, d in enumerate(dicts) for tok, lp in d.items()]

    for one, par in zip(run(), run(**parallel)):
        assert par.outputs[0].error is None and par.outputs[0].token_ids == one.outputs[0].token_ids
        assert (par.prompt_logprobs is None) == (one.prompt_logprobs is None)
        a, b = flat(one), flat(par)
        assert len(a) == len(b) and [x[:3] for x in a] == [x[:3] for x in b]
        assert all(abs(x[3] - y[3]) < 1e-4 for x, y in zip(a, b))
        assert (one.outputs[0].logprobs is not None) == (par.outputs[0].logprobs is not None)


def test_a_worker_that_fails_to_load_leaves_nothing_behind(expected):
    """A rank whose model cannot load (RTN groups of 32 over o_proj's 16 local input columns at TP = 2) raises its
    WorkerError from the constructor, which ends the workers and the process group: the next engine of this
    process starts (it used to fail with "trying to initialize the default process group twice")."""
    from minillm.quant.checkpoint import load_time_quantization
    kwargs = _kwargs(tensor_parallel_size=2)
    bad = {**kwargs, "model_config": load_time_quantization(CONFIG, "rtn", {"group_size": 32})}
    with pytest.raises(WorkerError, match="in_features=16 is not divisible by group_size=32.*this rank's share of "
                                          "32 under tensor_parallel_size=2"):
        MultiProcExecutor(bad)
    assert not dist.is_initialized()
    engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE, tensor_parallel_size=2),
                       executor=MultiProcExecutor(kwargs))
    try:
        assert _generate(engine) == expected
    finally:
        engine.shutdown()


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_embeddings_under_parallelism_match_one_process(parallel):
    """Embedding requests (minillm/pooling.py) at TP = 2 and PP = 2: the driver rank returns the rows' hidden
    states after the final norm, and LAST / MEAN / CLS vectors over chunked prefills match one process."""
    from minillm.pooling import PoolingParams
    engine_kwargs = dict(ENGINE, enable_chunked_prefill=True, max_num_batched_tokens=8)

    def run(**par):
        engine = _engine(engine_kwargs, **par)
        try:
            ids = [engine.add_request(None, p, pooling_params=PoolingParams(kind))
                   for kind in ("LAST", "MEAN", "CLS") for p in PROMPTS]
            ids.append(engine.add_request(None, PROMPTS[1], PARAMS[0]))  # generating beside them
            done = {}
            while engine.has_unfinished_requests():
                done.update((o.request_id, o) for o in engine.step() if o.finished)
            return [done[i].embedding for i in ids[:-1]], done[ids[-1]].outputs[0].token_ids
        finally:
            engine.shutdown()

    (one, tokens), (par, par_tokens) = run(), run(**parallel)
    assert par_tokens == tokens and all(v is not None for v in par)
    torch.testing.assert_close(torch.tensor(par), torch.tensor(one), atol=1e-5, rtol=1e-4)


def test_a_failed_or_second_parallel_llm_leaves_the_running_one_alone(tmp_path):
    """LLM(..., tensor_parallel_size=2) whose KV cache cannot hold one sequence fails after its workers loaded:
    they end with it (they used to live on until the garbage collector found them, and the next LLM could not
    start). A second parallel LLM while one runs is refused before it starts anything, and the first goes on (its
    clean-up used to destroy the first one's process group)."""
    from minillm import LLM
    tiny_qwen2_checkpoint(tmp_path)
    options = dict(device="cpu", dtype="float32", max_model_len=64)
    with pytest.raises(WorkerError, match="the KV pool holds 0 blocks"):
        LLM(tmp_path, tensor_parallel_size=2, kv_cache_memory=3000, **options)
    assert not dist.is_initialized()
    params = SamplingParams(temperature=0, max_tokens=4)
    llm = LLM(tmp_path, tensor_parallel_size=2, **options)
    try:
        first = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
        with pytest.raises(RuntimeError, match="another multi-process engine .* is running in this process"):
            LLM(tmp_path, pipeline_parallel_size=2, **options)
        again = llm.generate([[5, 6, 7]], params)[0].outputs[0]
        assert again.error is None and again.token_ids == first
    finally:
        llm.llm_engine.shutdown()
    assert not dist.is_initialized()


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_a_request_that_breaks_a_parallel_step_fails_alone(parallel, monkeypatch):
    """A request that raises inside the workers (a token id past the vocabulary, let through by a patched
    validation) fails alone, as in one process: every rank answered with its error, so the engine reruns the step
    one request at a time. Under pipeline parallelism the failing stage sends zeros on for the micro-batches the
    next stage waits for (the step used to hang there for gloo's ten-minute timeout), and under tensor parallelism
    its batch-mates used to fail with it."""
    engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE, **parallel),
                       executor=MultiProcExecutor(_kwargs(**parallel)))
    try:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        engine.add_request("good", [5, 6, 7], params)
        engine.validate_prompt = lambda prompt, truncate=None: (None, list(prompt))  # the engine process only
        engine.add_request("bad", [5, CONFIG.vocab_size + 10, 7], params)
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o.outputs[0]) for o in engine.step() if o.finished)
        assert done["bad"].finish_reason == "error" and "token ids must lie in" in done["bad"].error
        assert done["good"].finish_reason == "length" and done["good"].error is None
        alone = _generate(engine)  # the engine and its workers go on
        assert len(alone) == len(PROMPTS) and engine.scheduler.block_manager.num_used_blocks == 0
        if "tensor_parallel_size" in parallel:
            check_one_rank_failing_alone_ends_the_group(engine, monkeypatch)
    finally:
        engine.shutdown()
    assert not dist.is_initialized()


def _break_forward_on_rank(worker: Worker, rank: int) -> None:
    """Sent through collective_rpc (a function runs as fn(worker, ...) in every worker): from now on rank `rank`'s
    forward raises at once, before its first collective, as a device out of memory on one GPU would."""
    if dist.get_rank() == rank:
        def forward(*args, **kwargs):
            raise MemoryError("rank-local fault (test)")
        worker.model.forward = forward


def check_one_rank_failing_alone_ends_the_group(engine: LLMEngine, monkeypatch) -> None:
    """Rank 2 fails its forward alone: rank 1 waits in the embedding's all-reduce for it. The watchdog reads rank
    2's report and ends the group a grace period later (gloo would wait ten minutes): the step's request ends
    with the cause, and every later call is refused, naming it."""
    monkeypatch.setattr(executor_module, "PEER_FAILURE_GRACE_S", 1.0)
    engine.executor.collective_rpc(_break_forward_on_rank, 2)
    engine.add_request("a", PROMPTS[0], PARAMS[0])
    start = time.perf_counter()
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "error"
    assert "rank 2: ForwardFailed: MemoryError: rank-local fault (test)" in out.outputs[0].error
    assert "still waiting for its peers" in out.outputs[0].error
    assert time.perf_counter() - start < 15
    with pytest.raises(RuntimeError, match="rank 2: ForwardFailed: MemoryError.*cannot continue"):
        engine.executor.collective_rpc("get_comm_stats")


def test_a_forward_failed_on_some_ranks_of_a_tensor_parallel_group_ends_it():
    """desynchronised: every rank of a TP group failing inside the forward (the same bad input) keeps the group
    in step; one failing while a peer went on does not (over NCCL the peer's collectives no longer pair up);
    a failure outside the forward (the driver's sampler) or on another group's stage is not the group's."""
    groups = [[1, 2], [3, 4]]  # tp 2 x pp 2, ranks from 1

    def err(rank, in_forward=True):
        return WorkerError(f"rank {rank}: boom", rank, in_forward)

    assert desynchronised({1: err(1), 2: err(2)}, groups) is None
    assert desynchronised({3: err(3, in_forward=False)}, groups) is None  # the driver's sampler
    assert desynchronised({1: err(1), 2: err(2), 3: err(3), 4: err(4)}, groups) is None
    why = desynchronised({2: err(2)}, groups)
    assert why.startswith("rank 2 failed inside the forward while rank 1 of its tensor-parallel group did not")
    assert "rank 2: boom" in why
    assert desynchronised({3: err(3), 4: err(4, in_forward=False)}, groups).startswith("rank 3 failed")
    assert desynchronised({1: err(1)}, []) is None  # no tensor parallelism: nothing to pair up
    copy = pickle.loads(pickle.dumps(err(2)))  # the fields cross the process boundary
    assert (copy.rank, copy.in_forward, str(copy)) == (2, True, "rank 2: boom")


def test_pipeline_parallel_2_matches_one_process_and_counts_bytes(expected):
    executor = MultiProcExecutor(_kwargs(pipeline_parallel_size=2))
    try:
        engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE), executor=executor)
        assert _generate(engine) == expected
        # one boundary: stage 0 sends hidden and residual [T, hidden] each; stage 1 sends nothing
        T = 9
        stats = _one_step_bytes(executor, engine, T)
        assert stats == [{"send": 2 * T * CONFIG.hidden_size * 4}, {}]
    finally:
        executor.shutdown()


def engine_step_input(engine: LLMEngine):
    from minillm.engine.step_input import build_step_input
    return build_step_input(engine.scheduler.schedule(), engine.cache_config.block_size)


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_keeps_its_shard_and_kv_heads_replicate(tp):
    """Built in this process with a faked TP rank (construction and loading need no communication)."""
    with single_rank():
        full = RandomWeights(seed=3)(CONFIG, torch.device("cpu"), torch.float32)
    full_qkv = full.model.layers[0].self_attn.qkv_proj.weight
    q_rows, d = CONFIG.num_attention_heads * CONFIG.head_dim, CONFIG.head_dim
    try:
        for rank in range(tp):
            init_parallel_state(ParallelState(tp_size=tp, tp_rank=rank))
            model = RandomWeights(seed=3)(CONFIG, torch.device("cpu"), torch.float32)
            attn = model.model.layers[0].self_attn
            heads, kv = CONFIG.num_attention_heads // tp, max(1, CONFIG.num_key_value_heads // tp)
            kv_head = rank * kv if tp <= CONFIG.num_key_value_heads else rank // (tp // CONFIG.num_key_value_heads)
            q, k, v = attn.qkv_proj.split(attn.qkv_proj.weight.T)
            assert torch.equal(q.T, full_qkv[rank * heads * d:(rank + 1) * heads * d])
            assert torch.equal(k.T, full_qkv[q_rows + kv_head * d:q_rows + (kv_head + kv) * d])
            k_rows = CONFIG.num_key_value_heads * d
            assert torch.equal(v.T, full_qkv[q_rows + k_rows + kv_head * d:q_rows + k_rows + (kv_head + kv) * d])
            assert attn.o_proj.weight.shape == (CONFIG.hidden_size, heads * d)
            assert model.model.embed_tokens.weight.shape == (-(-CONFIG.vocab_size // tp), CONFIG.hidden_size)
            local = rank_model_config(CONFIG)
            assert (local.num_attention_heads, local.num_key_value_heads) == (heads, kv)
            total = sum(p.numel() for p in model.parameters())
            assert total < sum(p.numel() for p in full.parameters()) * 0.6  # a shard, not the whole model
    finally:
        init_parallel_state(ParallelState())


def test_bad_parallel_sizes_are_rejected():
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        EngineConfig(tensor_parallel_size=0)
    try:
        init_parallel_state(ParallelState(tp_size=3))
        with pytest.raises(ValueError, match=r"num_attention_heads \(4\) divisible by tensor_parallel_size \(3\)"):
            LlamaForCausalLM(CONFIG)
    finally:
        init_parallel_state(ParallelState())
    with pytest.raises(ValueError, match="exceeds the model's 3 layers"):
        get_pp_indices(3, 0, 4)
    # the executor checks the split before it starts any process
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) divisible by tensor_parallel_size \(3\)"):
        MultiProcExecutor(_kwargs(tensor_parallel_size=3))
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(4\) exceeds the model's 3 layers"):
        MultiProcExecutor(_kwargs(pipeline_parallel_size=4))
    assert [get_pp_indices(30, s, 4) for s in range(4)] == [(0, 8), (8, 16), (16, 23), (23, 30)]


def test_split_step_balances_tokens_and_keeps_every_row():
    engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE),
                       executor=UniProcExecutor(Worker(**_kwargs())))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, PARAMS[i])
    step = engine_step_input(engine)
    parts = split_step(step, 2)
    assert [p.query_lens for p in parts] == [[5, 17], [1, 3]]
    assert sum((p.input_ids for p in parts), []) == step.input_ids
    assert sum((p.sampling for p in parts), []) == step.sampling
    assert split_step(step, 10)[-1].num_seqs == 1 and len(split_step(step, 10)) == step.num_seqs
    # a token-tree verify step's per-sequence masks (and log-prob asks) go with their sequences
    step.tree_masks = [None, [1, 3, 5] + [0] * 14, None, [1, 3, 7]]
    step.num_logprobs = [-1, 2, -1, 0]
    parts = split_step(step, 2)
    assert [p.tree_masks for p in parts] == [step.tree_masks[:2], step.tree_masks[2:]]
    assert [p.num_logprobs for p in parts] == [[-1, 2], [-1, 0]]
    assert all(p.block_size == step.block_size and not p.finished_request_ids for p in parts)


def test_torchrun_entry_tp2_on_a_checkpoint_matches_one_process(tmp_path):
    """`torchrun -m minillm.parallel.launch`: 2 processes, rank 0 is engine and worker 0; a tiny Qwen2 checkpoint
    (q/k/v biases, untied LM head) read shard by shard by each rank; the same greedy tokens as LLM() in one process."""
    from minillm import LLM
    tiny_qwen2_checkpoint(tmp_path)
    prompts = ["ab ab a b", "w7 w9 ab"]
    llm = LLM(tmp_path, device="cpu", dtype="float32", max_model_len=64)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6))]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m",
                           "minillm.parallel.launch", "--model", os.fspath(tmp_path), "--tensor-parallel-size", "2",
                           "--max-model-len", "64", "--max-tokens", "6", "--dtype", "float32",
                           *[a for p in prompts for a in ("--prompt", p)]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = [json.loads(line[line.rindex("["):]) for line in done.stdout.splitlines() if line.startswith("'")]
    assert got == expected


@pytest.mark.slow
def test_bundled_smollm2_tp3_matches_one_process():
    """The real model: SmolLM2-135M's 9 heads and 3 K/V heads over 3 ranks (one K/V head each), tied embeddings
    split by vocabulary. About 25 s for the 3 workers on the 2-core machine."""
    from minillm import LLM
    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=0, max_tokens=6)
    options = dict(device="cpu", dtype="float32", max_model_len=128, max_num_seqs=2)
    expected = [o.outputs[0].token_ids for o in LLM(None, **options).generate(prompts, params)]
    llm = LLM(None, tensor_parallel_size=3, **options)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one per rank: NCCL refuses two on one)")
@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_two_gpus_match_one(parallel):
    check_two_gpus_match_one(CONFIG, parallel)


def check_two_gpus_match_one(model_config: ModelConfig, parallel: dict) -> None:
    """The same on GPUs: one per rank, activations over NCCL, control over gloo, each pool profiled on its GPU."""
    def kwargs(**p) -> dict:
        engine = EngineConfig(max_model_len=64, max_num_seqs=4, block_size=16, attention_backend="torch",
                              enforce_eager=True, gpu_memory_utilization=0.3, **p)
        return dict(model_config=model_config, device=torch.device("cuda"), dtype=torch.float32,
                    engine_config=resolve_engine_config(engine, model_config, torch.device("cuda")),
                    model_source=RandomWeights(seed=3), seed=0)
    torch.backends.cuda.matmul.allow_tf32 = False
    config = kwargs()["engine_config"]
    local = LLMEngine(None, ByteTokenizer(), model_config, config, device=torch.device("cuda"),
                      executor=UniProcExecutor(Worker(**kwargs())))
    expected = _generate(local)
    executor = MultiProcExecutor(kwargs(**parallel))
    try:
        engine = LLMEngine(None, ByteTokenizer(), model_config, config, device=torch.device("cuda"),
                           executor=executor)
        assert _generate(engine) == expected
    finally:
        executor.shutdown()


def test_bench_tp_decode_smoke_on_the_cpu(tmp_path):
    """benchmarks/bench_tp_decode.py (issue 15's TP = 1 vs TP = 2 decode) end to end on the CPU: two gloo worker
    processes, the same greedy tokens as one process, and an all-reduce time per step measured on the engine's
    own TP group (Worker.time_all_reduce)."""
    out = tmp_path / "tp.json"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_tp_decode.py")
    done = subprocess.run([sys.executable, script, "--cpu", "--batches", "2", "--prompt-len", "6", "--output-len",
                           "4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = {r["tp"]: r for r in json.loads(out.read_text())["runs"]}
    assert runs[1]["all_reduce_ms_per_step"] == 0.0 and runs[2]["all_reduce_ms_per_step"] > 0
    assert runs[2]["tokens_part_from_tp1_at"] is None  # fp32 on the CPU: the same tokens
    assert all(r["decode_tok_per_s"] > 0 for r in runs.values())


@pytest.mark.parametrize("parallel", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_lora_adapters_under_parallelism_match_one_process(parallel, tmp_path):
    """LoRA adapters at TP = 2 (each rank its rows of B in qkv / gate_up, its columns of A in o / down, the
    partial products summed by the layers' all-reduces) and PP = 2 (each stage its own layers' slots, micro-batches
    carrying their rows' slots): every rank reads the adapters itself, and the tokens equal one process's."""
    from minillm.lora import LoRARequest
    from minillm.lora.adapter import random_adapter, save_adapter
    requests = []
    for i, targets in enumerate([("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                 ("v_proj", "down_proj")]):
        save_adapter(random_adapter(CONFIG, 4, targets=targets, seed=i, std=0.3), tmp_path / f"a{i}")
        requests.append(LoRARequest(f"a{i}", i + 1, str(tmp_path / f"a{i}")))
    loras = [requests[0], None, requests[1], requests[0]]
    engine_kwargs = dict(ENGINE, enable_lora=True, max_loras=2, max_lora_rank=4)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    def run(lora: bool = True, **par):
        options = engine_kwargs if lora else ENGINE
        config = resolve_engine_config(EngineConfig(**options, **par), CONFIG, torch.device("cpu"))
        kwargs = dict(_kwargs(), engine_config=config)
        executor = MultiProcExecutor(kwargs) if par else UniProcExecutor(Worker(**kwargs))
        engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**options, **par), executor=executor)
        try:
            ids = [engine.add_request(None, p, params, lora_request=r if lora else None)
                   for p, r in zip(PROMPTS, loras)]
            done = {}
            while engine.has_unfinished_requests():
                done.update((o.request_id, o.outputs[0]) for o in engine.step() if o.finished)
            return [done[i] for i in ids]
        finally:
            engine.shutdown()

    one, par, base = run(), run(**parallel), run(lora=False)
    assert all(o.error is None for o in par)
    assert [o.token_ids for o in par] == [o.token_ids for o in one]
    assert sum(o.token_ids != b.token_ids for o, b, r in zip(one, base, loras) if r is not None) >= 2  # they bite
