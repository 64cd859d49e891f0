"""Model definitions. `get_model_class(architecture)` maps a ModelConfig.architecture to its class."""
from __future__ import annotations

from minillm.models.llama import LlamaForCausalLM

# Mistral and Qwen2 are Llama-shaped for inference (Qwen2: a bias on q/k/v, set by ModelConfig.attention_bias).
MODEL_REGISTRY = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM}


def get_model_class(architecture: str) -> type:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported architecture {architecture!r}; minillm supports {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[architecture]


__all__ = ["LlamaForCausalLM", "MODEL_REGISTRY", "get_model_class"]
