"""Quantized checkpoints under tensor parallelism: each rank loads its piece of the packed tensors (chapter 11).

GPTQ / AWQ / RTN store packed codes, zeros and scales in their own layouts (qweight [in * bits / 32, out], AWQ's
[in, out / 8], qzeros packed along out); their parameters load through ShardLoader, which asks the tensor-parallel
layer for this rank's piece first (tp_slice), as the dense weights do. Act-order GPTQ under row parallelism keeps
every group's scales and zeros on each rank and narrows g_idx (its input columns' groups are spread over the whole
input). Built in this process with a faked rank (no communication): a column-parallel layer's output is the full
layer's columns for its shard, and a row-parallel layer's partial outputs sum to the full layer's output.
"""
from __future__ import annotations

import pytest
import torch

from minillm.engine.worker import build_model
from minillm.parallel.state import ParallelState, init_parallel_state, single_rank
from minillm.quant.driver import quantize_model
from test_quant_methods import CALIB, CONFIG, RUNS
from test_quant_seam import _checkpoint
from tiny import one_thread  # noqa: F401  (autouse fixture)

TP = 2
METHODS = ["rtn", "gptq", "gptq_act_order", "awq", "fp8", "smoothquant", "int8"]
W8A8 = ("fp8", "smoothquant", "int8")  # x quantized per token: a rank's scale comes from its own columns


@pytest.fixture(scope="module")
def checkpoints():
    with single_rank():
        dense = build_model(CONFIG, _checkpoint(CONFIG).items(), torch.device("cpu"), torch.float32)
        return {label: quantize_model(dense, RUNS[label][0], calibration=CALIB, progress=False, **RUNS[label][1])
                for label in METHODS + ["rtn_w3_sym"]}


def _rank_models(qm):
    models = []
    try:
        for rank in range(TP):
            init_parallel_state(ParallelState(tp_size=TP, tp_rank=rank))
            models.append(build_model(qm.config, qm.state.items(), torch.device("cpu"), torch.float32))
    finally:
        init_parallel_state(ParallelState())
    return models


@pytest.mark.parametrize("label", METHODS)
def test_each_rank_loads_its_piece_of_a_quantized_checkpoint(checkpoints, label):
    qm = checkpoints[label]
    with single_rank():
        full = qm.build().model.layers[0]
    ranks = [m.model.layers[0] for m in _rank_models(qm)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # column parallel: gate_up's rank r outputs are slice r of gate and slice r of up
        x = torch.randn(3, CONFIG.hidden_size, generator=g)
        gate, up = full.mlp.gate_up_proj(x).chunk(2, dim=-1)
        for r, layer in enumerate(ranks):
            piece = CONFIG.intermediate_size // TP
            want = torch.cat([gate[:, r * piece:(r + 1) * piece], up[:, r * piece:(r + 1) * piece]], dim=-1)
            assert torch.allclose(layer.mlp.gate_up_proj(x), want, atol=1e-5), r
        # row parallel: the ranks' partial products over their input columns sum to the full product
        for name, width in (("mlp.down_proj", CONFIG.intermediate_size), ("self_attn.o_proj", CONFIG.hidden_size)):
            h = torch.randn(3, width, generator=g)
            full_layer = full.get_submodule(name)
            parts = []
            for r, layer in enumerate(ranks):
                local = layer.get_submodule(name)
                cols = h[:, r * width // TP:(r + 1) * width // TP]
                parts.append(local.quant_method.apply(local, cols, None))  # before the all-reduce
            ref = full_layer(h)
            if label in W8A8:  # per-token scales of half a row: close, not equal (vLLM's ranks do the same)
                assert float((sum(parts) - ref).norm() / ref.norm()) < 0.03, name
            else:
                assert torch.allclose(sum(parts), ref, atol=1e-4), name
    if label == "gptq_act_order":
        down = ranks[0].mlp.down_proj
        assert hasattr(down, "g_idx") and down.g_idx.shape == (CONFIG.intermediate_size // TP,)
        assert down.scales.shape[0] == CONFIG.intermediate_size // 32  # every group's scales, not a slice
        assert hasattr(ranks[0].mlp.gate_up_proj, "act_perm")  # column parallel: whole input, sorted at load


def test_a_packed_tensor_that_cannot_split_on_a_word_says_so(checkpoints):
    """3-bit codes pack 32 to 3 words: k_proj's zeros (32 outputs) cannot be halved on a word boundary."""
    with pytest.raises(ValueError, match=r"k_proj.qzeros.*divisible by tensor_parallel_size \(2\)"):
        _rank_models(checkpoints["rtn_w3_sym"])


@pytest.mark.parametrize("label", ["gptq_act_order", "awq"])
def test_llm_serves_a_quantized_checkpoint_at_tp2_and_pp2(tmp_path, checkpoints, label):
    """`LLM(model=DIR, tensor_parallel_size=2)` and `pipeline_parallel_size=2` on a saved checkpoint (two gloo
    worker processes each): the same greedy tokens as one process."""
    from minillm.llm import LLM
    from minillm.quant.checkpoint import save_quantized
    from minillm.sampling_params import SamplingParams
    from test_quant_methods import _byte_tokenizer_json
    _byte_tokenizer_json(tmp_path)
    save_quantized(checkpoints[label], tmp_path / "q", source=str(tmp_path))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["hello there", "ab ab ab"]
    tokens = []
    for parallel in ({}, dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)):
        llm = LLM(model=tmp_path / "q", max_model_len=64, max_num_seqs=2, **parallel)
        assert type(llm.llm_engine.executor).__name__ == ("MultiProcExecutor" if parallel else "UniProcExecutor")
        tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        llm.llm_engine.shutdown()
    assert tokens[0] == tokens[1] == tokens[2]
