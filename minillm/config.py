"""Configuration dataclasses: what the model is (ModelConfig) and how the engine runs it (EngineConfig).

ModelConfig is filled from GGUF metadata (minillm.loader.gguf) or from an HF config.json (minillm.loader.hf);
every field is validated here, so a bad file fails with a message that names the field and the allowed range.
Chapter 1 reads these numbers to estimate memory; chapter 5 sizes the paged KV pool from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    """The shape of a Llama-family decoder, in Hugging Face's field names."""

    architecture: str = "llama"  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None  # defaults to hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has a bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Weight quantization (chapter 8): a name from minillm.quant.base.QUANTIZATION_METHODS (vLLM's spelling),
    # and the checkpoint's `quantization_config` dict that the method's QuantizationConfig.from_config reads.
    quantization: str | None = None
    quantization_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; minillm supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.quantization is not None:
            from minillm.quant.base import check_quantization_name  # lazy: quant imports torch
            check_quantization_name(self.quantization)
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise TypeError(f"ModelConfig.quantization_config must be a dict or None, "
                            f"got {type(self.quantization_config).__name__}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * bytes_per_element


@dataclass
class EngineConfig:
    """How the engine runs: memory, batching, scheduling. Validated on construction."""

    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    # KV cache: paged blocks (chapter 5). "contiguous" reserves max_model_len slots per sequence (chapter 2).
    kv_layout: str = "paged"  # "paged" | "contiguous"
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit pool size (CPU); else sized from kv_cache_memory / GPU profiling
    kv_cache_memory: int | None = None  # bytes for the KV pool on CPU
    gpu_memory_utilization: float = 0.9
    # Scheduling (chapter 6)
    scheduling: str = "continuous"  # "continuous" | "static"
    preemption_mode: str = "recompute"  # "recompute" | "swap"
    swap_space: int = 4 << 30  # bytes of pinned CPU memory for swapped blocks
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = False
    # Operators (chapters 3-4)
    attention_backend: str = "auto"  # "auto" (triton on CUDA, torch on CPU) | "torch" | "triton"
    enforce_eager: bool = True  # False: capture CUDA graphs for decode (CUDA only)
    compile: bool = False  # torch.compile the model
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "kv_layout": ("paged", "contiguous"),
            "scheduling": ("continuous", "static"),
            "preemption_mode": ("recompute", "swap"),
            "attention_backend": ("auto", "torch", "triton"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
