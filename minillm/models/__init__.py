"""Model definitions. `get_model_class(architecture)` maps a ModelConfig.architecture to its class."""
from __future__ import annotations

from minillm.models.llama import LlamaForCausalLM
from minillm.models.moe import MixtralForCausalLM

# Mistral and Qwen2 are Llama-shaped for inference (Qwen2: a bias on q/k/v, set by ModelConfig.attention_bias);
# Mixtral is Llama with a sparse mixture-of-experts MLP (chapter 11).
MODEL_REGISTRY = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM,
                  "mixtral": MixtralForCausalLM}


def get_model_class(architecture: str) -> type:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported architecture {architecture!r}; minillm supports {', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[architecture]


__all__ = ["LlamaForCausalLM", "MixtralForCausalLM", "MODEL_REGISTRY", "get_model_class"]
