"""Tiny Mixtral and Qwen3-MoE checkpoints written at test time: transformers' MixtralForCausalLM (or
Qwen3MoeForCausalLM) built from a config (nothing is downloaded), its weights redrawn at a scale where routing and
experts matter, saved with save_pretrained (config.json + safetensors, the hub's per-expert names) next to a small
BPE tokenizer.json."""
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
    return _redrawn(transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**MOE_CONFIG, **overrides})))


def tiny_qwen3_moe(seed: int = 0, norm_topk_prob: bool = True):
    """transformers' Qwen3MoeForCausalLM of MOE_CONFIG's shape (its experts moe_intermediate_size 24 wide, head_dim
    16 against hidden / heads 8), weights redrawn as tiny_mixtral's (q/k norms near 1 too)."""
    import transformers
    torch.manual_seed(seed)
    shape = {k: v for k, v in MOE_CONFIG.items() if k != "num_local_experts"}
    config = transformers.Qwen3MoeConfig(**shape, num_experts=4, moe_intermediate_size=24, head_dim=16,
                                         norm_topk_prob=norm_topk_prob)
    return _redrawn(transformers.Qwen3MoeForCausalLM(config))


def _redrawn(model):
    model.eval()
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
    return save_with_tokenizer(tiny_mixtral(seed, **overrides), directory)


def save_with_tokenizer(model, directory):
    """save_pretrained (hub names: transformers 5 writes its fused expert tensors back per expert) and a small
    BPE tokenizer.json beside it; returns the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    model.save_pretrained(directory, safe_serialization=True)
    vocab = {"a": 0, "b": 1, "ab": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(os.fspath(os.path.join(directory, "tokenizer.json")))
    return model
