"""A tiny Mixtral checkpoint written at test time: transformers' MixtralForCausalLM built from a config (nothing is
downloaded), its weights redrawn at a scale where routing and experts matter, saved with save_pretrained
(config.json + safetensors, HF's block_sparse_moe names) next to a small BPE tokenizer.json."""
from __future__ import annotations

import os

import torch

from minillm.config import ModelConfig

VOCAB = 112
MOE_CONFIG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)

# the same shape as a ModelConfig, for RandomWeights models that need no checkpoint
TINY_MOE = ModelConfig(architecture="mixtral", eos_token_id=257, **{**MOE_CONFIG, "vocab_size": 301})


def tiny_mixtral(seed: int = 0, **overrides):
    """transformers' MixtralForCausalLM, seeded; matrices N(0, 1/fan_in), embeddings N(0, 1), norms near 1."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**MOE_CONFIG, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)
            elif "embed" in name:
                param.normal_(0.0, 1.0)
            else:  # the 3-D expert tensors of transformers 5 are [experts, out, in]: fan-in is the last dim
                param.normal_(0.0, param.shape[-1] ** -0.5)
    return model


def save_tiny_mixtral(directory, seed: int = 0, **overrides):
    """Write the checkpoint and a tokenizer into `directory`; return the transformers model (the oracle)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    model = tiny_mixtral(seed, **overrides)
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {"a": 0, "b": 1, "ab": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(os.fspath(os.path.join(directory, "tokenizer.json")))
    return model
