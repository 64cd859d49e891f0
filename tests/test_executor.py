"""The worker seam: the engine reaches its model only through an executor and a slim StepInput.

The two-process test runs the worker in a child process (spawned, talking over torch.distributed with gloo)
and requires greedy output identical to the in-process worker, with sampling seeds honoured on the worker side.
"""
from __future__ import annotations

import pickle

import pytest
import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.cache_config import make_cache_config, resolve_engine_config
from minillm.engine.executor import MultiProcExecutor, UniProcExecutor, WorkerError
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.step_input import SamplingSpec, StepInput, build_step_input
from minillm.engine.worker import PrebuiltModel, RandomWeights, Worker
from minillm.sampling_params import SamplingParams
from tiny import ByteTokenizer, run_to_completion

CONFIG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=257)
ENGINE = dict(max_model_len=64, max_num_seqs=4, block_size=4, num_kv_blocks=48)
PROMPTS = [[5, 6, 7, 8, 9], list(range(30, 47)), [100]]


def _generate(engine: LLMEngine, params: list[SamplingParams]) -> list[list[int]]:
    return run_to_completion(engine, PROMPTS, params)


PARAMS = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
          SamplingParams(temperature=1.0, max_tokens=5, seed=7, ignore_eos=True),
          SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]


def _worker_kwargs() -> dict:
    config = resolve_engine_config(EngineConfig(**ENGINE), CONFIG, torch.device("cpu"))
    return dict(model_config=CONFIG, engine_config=config, device=torch.device("cpu"), dtype=torch.float32,
                model_source=RandomWeights(seed=3), seed=0)


def test_step_input_is_slim_and_picklable():
    engine = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE),
                       executor=UniProcExecutor(Worker(**_worker_kwargs())))
    engine.add_request("r", PROMPTS[1], PARAMS[1])
    batch = engine.scheduler.schedule()
    step = build_step_input(batch, engine.cache_config.block_size)
    restored = pickle.loads(pickle.dumps(step))
    assert isinstance(restored, StepInput) and restored == step
    # numbers only: no Sequence, tensor or scheduler object crosses the boundary
    allowed = (int, float, str, bool, type(None))

    def plain(value) -> bool:
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        if hasattr(value, "__dataclass_fields__"):
            return all(plain(getattr(value, f)) for f in value.__dataclass_fields__)
        return isinstance(value, allowed)
    assert plain(step)
    assert step.num_sampled == [1] and step.query_lens == [17] and step.slot_mapping[:5] == \
        [batch.seqs[0].block_table[0] * 4 + i for i in range(4)] + [batch.seqs[0].block_table[1] * 4]
    engine.abort("r")


def test_prebuilt_model_cannot_cross_a_process():
    with pytest.raises(TypeError, match="CheckpointSource"):
        pickle.dumps(PrebuiltModel(torch.nn.Linear(2, 2)))


def test_two_process_worker_matches_in_process():
    """One worker in a child process (gloo) through MultiProcExecutor: identical tokens, greedy and seeded."""
    local = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE),
                      executor=UniProcExecutor(Worker(**_worker_kwargs())))
    expected = _generate(local, PARAMS)
    executor = MultiProcExecutor(_worker_kwargs())
    try:
        remote = LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE), executor=executor)
        assert remote.cache_config == local.cache_config
        assert _generate(remote, PARAMS) == expected
        with pytest.raises(AttributeError, match="other processes"):
            remote.runner
        # an exception inside the remote worker comes back as this step's error; the worker keeps serving
        with pytest.raises(WorkerError, match="block_size"):
            executor.execute_model(StepInput(query_lens=[1], input_ids=[1], positions=[0], slot_mapping=[0],
                                             seq_lens=[1], block_tables=[[0]], num_sampled=[1],
                                             sampling=[SamplingSpec("x", 0.0, -1, 1.0, None)], block_size=5))
        assert _generate(remote, PARAMS) == expected
        assert remote.scheduler.num_free_blocks() == remote.cache_config.num_gpu_blocks
    finally:
        executor.shutdown()


def test_engine_needs_a_model_or_an_executor():
    with pytest.raises(ValueError, match="either a built model or an executor"):
        LLMEngine(None, ByteTokenizer(), CONFIG, EngineConfig(**ENGINE))


def test_config_is_resolved_once_for_the_device():
    cpu = resolve_engine_config(EngineConfig(), CONFIG, torch.device("cpu"))
    assert (cpu.max_model_len, cpu.max_num_seqs, cpu.kv_layout, cpu.enforce_eager) == (128, 8, "paged", True)
    cuda = resolve_engine_config(EngineConfig(), CONFIG, torch.device("cuda"))
    assert (cuda.max_num_seqs, cuda.enforce_eager) == (64, False)  # CUDA graphs by default on a GPU
    assert resolve_engine_config(EngineConfig(attention_backend="torch"), CONFIG, torch.device("cuda")).enforce_eager
    assert resolve_engine_config(EngineConfig(scheduling="static"), CONFIG, torch.device("cpu")).kv_layout == \
        "contiguous"
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        resolve_engine_config(EngineConfig(max_model_len=129), CONFIG, torch.device("cpu"))
    static = make_cache_config(resolve_engine_config(EngineConfig(scheduling="static", max_model_len=40), CONFIG,
                                                     torch.device("cpu")), None, 1)
    assert (static.block_size, static.num_gpu_blocks) == (40, 8)  # one max_model_len region per batch slot
