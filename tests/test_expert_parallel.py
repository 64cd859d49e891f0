"""Expert parallelism on CPU processes (gloo), chapter 11: a tiny Mixtral split 2 ways by experts.

    EP=2 (2 worker processes, 2 of the 4 experts each) gives the same greedy and seeded tokens as one process
    the bytes each rank hands to torch.distributed per step equal the analytic count
    the tokens-per-expert table gathered from the ranks equals the one process's
    a killed EP worker makes the engine fail at once with a RuntimeError naming its rank
    LLM(checkpoint, expert_parallel_size=2) with a capacity factor drops the same rows as one process
    the torchrun entry with --expert-parallel-size 2 on the checkpoint (marked slow)
"""
from __future__ import annotations

import pytest
import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.cache_config import resolve_engine_config
from minillm.engine.executor import MultiProcExecutor, UniProcExecutor
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import RandomWeights, Worker
from minillm.parallel.expert import check_expert_parallel_config, collect_load_stats, expert_range, token_slice
from minillm.parallel.state import ParallelState, init_parallel_state
from minillm.sampling_params import SamplingParams
from test_parallel import (ENGINE, PARAMS, PROMPTS, _generate, check_killed_worker_fails_fast,  # as TP/PP
                           check_two_gpus_match_one)
from tiny import ByteTokenizer, one_thread  # noqa: F401  (autouse)
from tiny_moe import TINY_MOE, save_tiny_mixtral


def _kwargs(**parallel) -> dict:
    config = resolve_engine_config(EngineConfig(**ENGINE, **parallel), TINY_MOE, torch.device("cpu"))
    return dict(model_config=TINY_MOE, engine_config=config, device=torch.device("cpu"), dtype=torch.float32,
                model_source=RandomWeights(seed=3), seed=0)


def _prefill(engine: LLMEngine, prompt_len: int) -> None:
    engine.add_request("bytes", list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=1))
    engine.step()  # one prefill of prompt_len tokens, one sampled row


def test_expert_placement_and_token_slices():
    assert [expert_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ValueError, match=r"num_local_experts \(4\) divisible by expert_parallel_size \(3\)"):
        expert_range(4, 3, 0)
    assert [token_slice(5, 2, r) for r in range(2)] == [(0, 3, 3), (3, 5, 3)]
    assert [token_slice(1, 2, r) for r in range(2)] == [(0, 1, 1), (1, 1, 1)]  # a decode step: rank 1 idles
    try:  # a rank holds only its experts (the others are placeholders without parameters)
        init_parallel_state(ParallelState(ep_size=2, ep_rank=1))
        model = RandomWeights(seed=3)(TINY_MOE, torch.device("cpu"), torch.float32)
        experts = model.model.layers[0].mlp.experts
        assert [sum(p.numel() for p in e.parameters()) > 0 for e in experts] == [False, False, True, True]
    finally:
        init_parallel_state(ParallelState())
    full = RandomWeights(seed=3)(TINY_MOE, torch.device("cpu"), torch.float32)
    assert torch.equal(full.model.layers[0].mlp.experts[3].w2.weight, experts[3].w2.weight)  # the same numbers
    with pytest.raises(ValueError, match="needs a mixture-of-experts model; 'llama' has no experts"):
        check_expert_parallel_config(ModelConfig(), 2)


def _one_process() -> LLMEngine:
    return LLMEngine(None, ByteTokenizer(), TINY_MOE, EngineConfig(**ENGINE),
                     executor=UniProcExecutor(Worker(**_kwargs())))


def expected_tokens() -> list[list[int]]:
    """The requests' tokens from one process (the reference of every split of the tiny MoE)."""
    return _generate(_one_process())


@pytest.fixture(scope="module")
def expected():
    engine = _one_process()
    tokens = _generate(engine)
    collect_load_stats(engine.executor, reset=True)
    _prefill(engine, 11)
    return tokens, collect_load_stats(engine.executor)


def test_expert_parallel_2_matches_one_process_counts_bytes_and_fails_fast_on_a_killed_worker(expected):
    tokens, load = expected
    executor = MultiProcExecutor(_kwargs(expert_parallel_size=2))
    try:
        engine = LLMEngine(None, ByteTokenizer(), TINY_MOE, EngineConfig(**ENGINE), executor=executor)
        assert _generate(engine) == tokens

        executor.collective_rpc("get_comm_stats", True)  # reset the byte counters and the load table
        collect_load_stats(executor, reset=True)
        T, h, k, n, layers = 11, TINY_MOE.hidden_size, TINY_MOE.num_experts_per_tok, 2, TINY_MOE.num_hidden_layers
        _prefill(engine, T)
        stats = executor.collective_rpc("get_comm_stats", True)
        ep_load = collect_load_stats(executor)
        # per MoE layer, fp32: rank r routes its slice of T_r = 6, 5 tokens and dispatches T_r x k rows of hidden
        # (its own experts' rows included); it returns the rows its experts received (the load table's columns);
        # the counts message is n x (E/n + 1) int64; the all-gather contributes ceil(T / n) = 6 padded rows
        per_rank = TINY_MOE.num_local_experts // n
        for rank, t_r in enumerate((6, 5)):
            received = sum(sum(row[rank * per_rank:(rank + 1) * per_rank]) for row in ep_load["last"])
            assert stats[rank] == {"all_to_all_dispatch": layers * t_r * k * h * 4,
                                   "all_to_all_combine": received * h * 4,
                                   "all_to_all_counts": layers * n * (per_rank + 1) * 8,
                                   "all_gather": layers * 6 * h * 4}, f"rank {rank + 1}"
        assert sum(s["all_to_all_combine"] for s in stats) == layers * T * k * h * 4
        assert ep_load["last"] == load["last"]  # the same routing, gathered from the experts' owners
        assert all(sum(row) == T * k for row in ep_load["last"]) and ep_load["dropped_last"] == 0
        assert all(1.0 <= m <= TINY_MOE.num_local_experts / k for m in ep_load["max_over_mean"])

        # a worker killed mid-run (it waits in the all-to-all of its peer): the engine fails at once, naming it
        check_killed_worker_fails_fast(engine, executor)
    finally:
        executor.shutdown()
    assert not any(p.is_alive() for p in executor.processes)


def test_llm_expert_parallel_with_capacity_drops_like_one_process(tmp_path):
    """LLM(checkpoint, expert_parallel_size=2) reads the HF checkpoint in each worker; with a capacity factor
    below 1 rows are dropped, in the global token order, so both give the same tokens and the same drops."""
    pytest.importorskip("transformers")
    from minillm import LLM
    save_tiny_mixtral(tmp_path)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 2, 90, 17]]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    options = dict(device="cpu", dtype="float32", max_model_len=64, moe_capacity_factor=0.75)
    one = LLM(tmp_path, **options)
    expected = [o.outputs[0].token_ids for o in one.generate(prompts, params)]
    expected_load = collect_load_stats(one.llm_engine.executor)
    assert expected_load["dropped_total"] > 0  # the capacity really bites
    with pytest.raises(ValueError, match=r"expert_parallel_size \(3\)"):
        LLM(tmp_path, expert_parallel_size=3, **options)
    llm = LLM(tmp_path, expert_parallel_size=2, **options)
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
        load = collect_load_stats(llm.llm_engine.executor)
        assert (load["total"], load["dropped_total"]) == (expected_load["total"], expected_load["dropped_total"])
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.slow
def test_torchrun_entry_ep2_on_a_checkpoint_matches_one_process(tmp_path):
    """`torchrun -m minillm.parallel.launch --expert-parallel-size 2`: rank 0 is engine and EP rank 0, each rank
    reads only its experts from the checkpoint; the same greedy tokens as LLM() in one process (about 15 s)."""
    pytest.importorskip("transformers")
    import json
    import os
    import subprocess
    import sys
    from minillm import LLM
    save_tiny_mixtral(tmp_path)
    prompts = ["ab ab a b", "w7 w9 ab"]
    llm = LLM(tmp_path, device="cpu", dtype="float32", max_model_len=64)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6))]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "minillm.parallel.launch",
                           "--model", os.fspath(tmp_path), "--expert-parallel-size", "2", "--max-model-len", "64",
                           "--max-tokens", "6", "--dtype", "float32", *[a for p in prompts for a in ("--prompt", p)]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = [json.loads(line[line.rindex("["):]) for line in done.stdout.splitlines() if line.startswith("'")]
    assert got == expected


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one per rank: NCCL refuses two on one)")
def test_expert_parallel_on_two_gpus_matches_one():
    """One GPU per EP rank: all-to-all and all-gather over NCCL, control over gloo (test_parallel's GPU check)."""
    check_two_gpus_match_one(TINY_MOE, dict(expert_parallel_size=2))
