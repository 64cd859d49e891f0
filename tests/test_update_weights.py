"""collective_rpc and update_weights (vLLM's RL-trainer workflow): new weights copied into the running engine's
tensors in place (each rank its shard), the prefix cache forgotten, and the engine then generates exactly what a
new LLM on the new checkpoint generates, in one process and under tensor and pipeline parallelism."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillm.llm import LLM
from minillm.sampling_params import SamplingParams
from tiny import tiny_qwen2_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4], [5, 6, 7, 8, 9, 10, 11, 12, 40]]
OPTIONS = dict(device="cpu", max_model_len=64, num_kv_blocks=32, block_size=4, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(old directory, new directory, the new weights as (HF name, tensor) pairs): the new ones are the old plus
    noise, every tensor of them changed."""
    old = tmp_path_factory.mktemp("old")
    tiny_qwen2_checkpoint(old)
    new = tmp_path_factory.mktemp("new")
    for name in os.listdir(old):
        if not name.endswith(".safetensors"):
            shutil.copy(old / name, new / name)
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for name in sorted(n for n in os.listdir(old) if n.endswith(".safetensors")):
        part = {k: v + 0.05 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
                for k, v in load_file(old / name).items()}
        save_file(part, new / name, metadata={"format": "pt"})
        tensors.update(part)
    return old, new, sorted(tensors.items())


def generate(llm: LLM) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("parallel", [{}, {"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}],
                         ids=["one_process", "tp2", "pp2"])
def test_updated_weights_generate_what_the_new_checkpoint_does(checkpoints, parallel):
    old, new, weights = checkpoints
    want = generate(LLM(new, **OPTIONS))
    llm = LLM(old, **OPTIONS, **parallel)
    try:
        before = generate(llm)
        assert before != want
        loaded = llm.update_weights(weights)
        if parallel.get("pipeline_parallel_size"):  # each stage its own layers, the embedding and head once each
            assert len(loaded) == 2 and sum(loaded) > max(loaded)
        else:
            assert len(set(loaded)) == 1 and loaded[0] > 0
        assert generate(llm) == want  # no cached prefix of the old model was reused (PROMPTS share 8 tokens)
        llm.update_weights(weights[:3])  # a subset: only those change
    finally:
        llm.llm_engine.shutdown()


def test_collective_rpc_and_its_errors(checkpoints):
    old, _, weights = checkpoints
    llm = LLM(old, **OPTIONS)
    assert llm.collective_rpc(_hidden_size) == [64]
    assert llm.collective_rpc("get_comm_stats") == [{}]
    assert llm.collective_rpc(_scaled_hidden_size, args=(2,), kwargs={"plus": 1}) == [129]
    with pytest.raises(ValueError, match="no method 'no_such_method'"):
        llm.collective_rpc("no_such_method")
    with pytest.raises(KeyError, match="unknown weight 'model.layers.9.mlp.up_proj.weight'"):
        llm.update_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(3))])
    with pytest.raises(ValueError, match="shape"):
        llm.update_weights([(weights[0][0], torch.zeros(3))])
    llm.llm_engine.add_request("running", PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="between requests"):
        llm.update_weights(weights)
    llm.llm_engine.abort("running")
    quantized = LLM(old, quantization="int8", **OPTIONS)
    with pytest.raises(ValueError, match="dense weights"):
        quantized.update_weights(weights)


def _hidden_size(worker) -> int:
    return worker.model_config.hidden_size


def _scaled_hidden_size(worker, factor: int, plus: int = 0) -> int:
    return worker.model_config.hidden_size * factor + plus


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_update_weights_keeps_the_cuda_graphs_valid(checkpoints):
    """On CUDA (bf16, CUDA graphs captured at start): the weights change in place, so the captured graphs read the
    new ones; the engine then generates what a new LLM on the new checkpoint does."""
    old, new, weights = checkpoints
    options = dict(OPTIONS, device="cuda", dtype="bfloat16")
    want = generate(LLM(new, **options))
    llm = LLM(old, **options)
    assert llm.llm_engine.runner.cuda_graphs is not None
    assert generate(llm) != want
    llm.update_weights(weights)
    assert generate(llm) == want
