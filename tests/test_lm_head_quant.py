"""The LM head quantized at load time (RTN with lm_head=True, GPTQModel's `lm_head` key): the head's rows are
rounded like a decoder linear's, tied embeddings stay dense, and what cannot work fails with a clear error."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minillm.config import ModelConfig
from minillm.engine.worker import build_model
from minillm.forward_context import forward_context, prefill_metadata
from minillm.quant.checkpoint import load_time_quantization
from minillm.quant.rtn import fake_quantize
from minillm.quant.weight_only import GPTQConfig, RTNConfig
from test_quant_seam import _checkpoint
from tiny import EOS, one_thread  # noqa: F401  (one_thread: autouse fixture)

CONFIG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=EOS)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _hidden_and_logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    n, length = IDS.shape
    with torch.no_grad(), forward_context(prefill_metadata([length] * n)):
        hidden = model(IDS.flatten(), torch.arange(length).repeat(n))
        return hidden, model.compute_logits(hidden)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_rtn_rounds_the_lm_head_when_asked(tied):
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    state = _checkpoint(config)
    options = {"group_size": 32}
    plain = build_model(load_time_quantization(config, "rtn", options), state.items(), torch.device("cpu"),
                        torch.float32)
    rounded = build_model(load_time_quantization(config, "rtn", {**options, "lm_head": True}), state.items(),
                          torch.device("cpu"), torch.float32)
    head = rounded.lm_head
    assert "weight" not in head._parameters and {"qweight", "scales", "qzeros"} <= set(head._parameters)
    source = state["model.embed_tokens.weight" if tied else "lm_head.weight"]
    # the embedding stays dense (a tied head took a copy of its rows before rounding them)
    assert torch.equal(rounded.model.embed_tokens.weight, state["model.embed_tokens.weight"])
    assert "weight" in plain.lm_head._parameters and (plain.lm_head.weight is plain.model.embed_tokens.weight) == tied
    hidden, logits = _hidden_and_logits(rounded)
    plain_hidden, plain_logits = _hidden_and_logits(plain)
    assert torch.equal(hidden, plain_hidden)  # the decoder is rounded the same way either way
    expected = F.linear(hidden, fake_quantize(source, 4, 32, False))
    assert logits.shape == (IDS.numel(), config.vocab_size)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert 0 < float((logits - plain_logits).norm() / plain_logits.norm()) < 0.3


def test_lm_head_option_is_checked():
    assert RTNConfig.from_config({"lm_head": True}).get_lm_head_method() is not None
    assert RTNConfig.from_config({}).get_lm_head_method() is None
    with pytest.raises(ValueError, match="lm_head must be a bool, got 'yes'"):
        RTNConfig.from_config({"lm_head": "yes"})
    with pytest.raises(ValueError, match="quantized lm_head are not supported"):
        GPTQConfig.from_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True})
    # options go to a load-time method on a dense checkpoint, nowhere else (refused, not ignored)
    with pytest.raises(ValueError, match="already quantized"):
        load_time_quantization(dataclasses.replace(CONFIG, quantization="int8_rtn"), "int8_rtn", {"lm_head": True})
    with pytest.raises(ValueError, match="need quantization="):
        load_time_quantization(CONFIG, None, {"lm_head": True})
    # 300 x 64 with groups of 48: the head's in_features must split into whole groups, like any linear's
    with pytest.raises(ValueError, match="group_size=48"):
        build_model(load_time_quantization(CONFIG, "rtn", {"group_size": 48, "lm_head": True}),
                    _checkpoint(CONFIG).items(), torch.device("cpu"), torch.float32)


def test_heads_refuse_a_quantized_lm_head():
    from minillm.speculative.heads import TargetParts
    model = build_model(load_time_quantization(CONFIG, "rtn", {"group_size": 32, "lm_head": True}),
                        _checkpoint(CONFIG).items(), torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="quantized"):
        TargetParts(model)


def test_llm_passes_quantization_options(tmp_path):
    """LLM(quantization="rtn", quantization_options={...}): the options reach the load-time method, generation
    runs on the rounded head, and options without a method (or for a quantized checkpoint) are refused."""
    import json

    from safetensors.torch import save_file

    from minillm.llm import LLM
    from minillm.quant.checkpoint import hf_config_dict
    from minillm.sampling_params import SamplingParams
    from test_quant_methods import _byte_tokenizer_json
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    save_file(_checkpoint(CONFIG), str(tmp_path / "model.safetensors"))
    _byte_tokenizer_json(tmp_path)
    llm = LLM(model=tmp_path, max_model_len=64, max_num_seqs=2, quantization="rtn",
              quantization_options={"group_size": 32, "lm_head": True})
    assert llm.llm_engine.model_config.quantization_config == {"group_size": 32, "lm_head": True}
    assert "qweight" in llm.llm_engine.runner.model.lm_head._parameters
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    with pytest.raises(ValueError, match="need quantization="):
        LLM(model=tmp_path, quantization_options={"lm_head": True})
    with pytest.raises(TypeError, match="quantization_options must be a dict"):
        LLM(model=tmp_path, quantization="rtn", quantization_options=[("lm_head", True)])
