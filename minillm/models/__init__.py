"""Model definitions. `get_model_class(architecture)` maps a ModelConfig.architecture to its class; `new_model`
builds one, its parameters made directly on a device in a dtype (uninitialised: a loader or a copy fills them)."""
from __future__ import annotations

import torch

from minillm.models.llama import LlamaForCausalLM
from minillm.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM

# Mistral, Qwen2 and Qwen3 are Llama-shaped for inference (Qwen2: a bias on q/k/v, ModelConfig.attention_bias;
# Qwen3: an RMSNorm on each query and key head, ModelConfig.qk_norm); Mixtral is Llama with a sparse
# mixture-of-experts MLP (chapter 11), and Qwen3-MoE is Qwen3 with Mixtral's block under other weight names.
MODEL_REGISTRY = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
                  "qwen3": LlamaForCausalLM, "mixtral": MixtralForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}


def get_model_class(architecture: str) -> type:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported architecture {architecture!r}; minillm supports {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[architecture]


def new_model(config, device: torch.device | str, dtype: torch.dtype, backend: str = "auto") -> torch.nn.Module:
    """The model class of config.architecture built with every parameter created on `device` in `dtype` (no CPU
    copy first, no fp32 detour: torch's default dtype is set for the construction and put back after)."""
    model_class = get_model_class(config.architecture)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            return model_class(config, backend=backend)
    finally:
        torch.set_default_dtype(previous)


__all__ = ["LlamaForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", "MODEL_REGISTRY", "get_model_class",
           "new_model"]
