"""Configuration dataclasses: what the model is (ModelConfig) and how the engine runs it (EngineConfig).

ModelConfig is filled from GGUF metadata (minillm.loader.gguf) or from an HF config.json (minillm.loader.hf);
every field is validated here, so a bad file fails with a message that names the field and the allowed range.
Chapter 1 reads these numbers to estimate memory; chapter 5 sizes the paged KV pool from them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
# the architectures whose MLPs are sparse mixtures of experts (num_local_experts >= 1)
MOE_ARCHITECTURES = ("mixtral", "qwen3_moe")
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF's names for a layer's attention

# The KV cache's element type, as vLLM spells it: "auto" is the model's dtype, "fp8"/"fp8_e4m3" float8_e4m3fn
# with a scale per layer and kv head (minillm.layers.kv_quant, minillm.engine.kv_scales)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")

# The order in which the continuous-batching scheduler admits waiting requests and picks preemption victims
# (vLLM's scheduling_policy): "fcfs" by arrival; "priority" by SamplingParams.priority (lower first), then arrival
SCHEDULING_POLICIES = ("fcfs", "priority")

# EngineConfig's fields that take one of a few values (None: decided per model and device), checked on
# construction; `minillm serve` offers the same values as its flags' choices (minillm.serve.cli)
ENGINE_CHOICES: dict[str, tuple[str | None, ...]] = {
    "kv_layout": ("paged", "contiguous", None),
    "scheduling": ("continuous", "static"),
    "scheduling_policy": SCHEDULING_POLICIES,
    "preemption_mode": ("recompute", "swap"),
    "attention_backend": ("auto", "torch", "reference", "triton"),
    "kv_cache_dtype": KV_CACHE_DTYPES,
}


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
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim on every query and key head, before RoPE
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Weight quantization (chapters 7-8): a name from minillm.quant.base.QUANTIZATION_METHODS (vLLM's spelling),
    # and the checkpoint's `quantization_config` dict that the method's QuantizationConfig.from_config reads.
    quantization: str | None = None
    quantization_config: dict[str, Any] | None = None
    # Sparse mixture of experts (Mixtral, Qwen3-MoE; chapter 11): every MLP is num_local_experts SwiGLU experts of
    # intermediate_size each, and a router that sends each token to num_experts_per_tok of them. 0: dense.
    # norm_topk_prob: the k chosen experts' softmax weights renormalised to sum to 1 (Mixtral always; Qwen3-MoE's
    # config says), else used as they are.
    num_local_experts: int = 0
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    # Sequence classification (reward models and classifiers, HF's *ForSequenceClassification; chapter 10,
    # minillm/classification.py): num_labels > 0 adds a `score` head [num_labels, hidden] and the model has no LM
    # head of its own; labels names each row (config.json's id2label; None: "LABEL_0", ...). 0: a generative model.
    num_labels: int = 0
    labels: list[str] | None = None
    # Sliding-window attention (kernels/sliding_window.py): a token sees its last sliding_window keys, in
    # every layer, or, with layer_types (HF's per-layer list of "full_attention" / "sliding_attention", e.g. Qwen2's
    # upper layers from max_window_layers on), only in the "sliding_attention" layers. None: full attention.
    sliding_window: int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; minillm supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # True is not a size
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is not None and (isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int)
                                          or self.head_dim < 1):
            raise ValueError(f"ModelConfig.head_dim must be a positive integer or None, got {self.head_dim!r}")
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
        for name in ("rms_norm_eps", "rope_theta"):  # nan and inf fail `0 < value < inf` too
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {value!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"ModelConfig.rope_scaling must be a dict or None, got {self.rope_scaling!r}")
        for name in ("tie_word_embeddings", "attention_bias", "qk_norm", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        eos = self.eos_token_id if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]
        for name, ids in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", eos)):
            if any(t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 0) for t in ids):
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer (or a list of them) or None, "
                                 f"got {getattr(self, name)!r}")
        self._check_experts()
        self._check_labels()
        self._check_sliding_window()
        if self.quantization is not None:
            from minillm.quant.base import check_quantization_name  # lazy: quant imports torch
            check_quantization_name(self.quantization)
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise TypeError(f"ModelConfig.quantization_config must be a dict or None, "
                            f"got {type(self.quantization_config).__name__}")

    def _check_experts(self) -> None:
        for name in ("num_local_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ModelConfig.{name} must be a non-negative integer, got {value!r}")
        if (self.architecture in MOE_ARCHITECTURES) != (self.num_local_experts > 0):
            raise ValueError(f"architecture {self.architecture!r} with num_local_experts={self.num_local_experts}: "
                             f"{' and '.join(map(repr, MOE_ARCHITECTURES))} need num_local_experts >= 1 and the "
                             f"dense architectures 0")
        if self.num_local_experts and not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"ModelConfig.num_experts_per_tok must be in [1, num_local_experts="
                             f"{self.num_local_experts}], got {self.num_experts_per_tok}")

    def _check_sliding_window(self) -> None:
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"ModelConfig.sliding_window must be a positive integer or None, got {window!r}")
        types = self.layer_types
        if types is None:
            return
        if not isinstance(types, (list, tuple)) or len(types) != self.num_hidden_layers \
                or any(t not in LAYER_TYPES for t in types):
            raise ValueError(f"ModelConfig.layer_types must list one of {LAYER_TYPES} for each of the "
                             f"{self.num_hidden_layers} layers, got {types!r}")
        if window is None and "sliding_attention" in types:
            raise ValueError("ModelConfig.layer_types names sliding_attention layers but sliding_window is None")

    def sliding_window_of(self, layer: int) -> int | None:
        """The attention window of decoder layer `layer` (0-based), None for full attention."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def without_sliding_window(self) -> "ModelConfig":
        """vLLM's disable_sliding_window: every layer attends to all keys, and the context is capped at the window,
        inside which full attention IS the window's (same outputs; a cache layout and kernels without the band)."""
        if self.sliding_window is None:
            return self
        return dataclasses.replace(self, sliding_window=None, layer_types=None,
                                   max_position_embeddings=min(self.max_position_embeddings, self.sliding_window))

    @property
    def uniform_sliding_window(self) -> int | None:
        """The window when EVERY layer slides (Mistral 7B v0.1), else None. Only then can the KV cache give back the
        blocks that slid out of it: a full-attention layer among them still reads every key (block_window.py)."""
        if self.sliding_window is None or any(self.sliding_window_of(i) is None
                                              for i in range(self.num_hidden_layers)):
            return None
        return self.sliding_window

    def layers(self, start: int, end: int, **changes: Any) -> "ModelConfig":
        """The config of layers start .. end - 1 alone (a pipeline stage, a draft of the target's first layers):
        num_hidden_layers and the per-layer layer_types cut to them; `changes`: other fields replaced too."""
        if not 0 <= start < end <= self.num_hidden_layers:
            raise ValueError(f"layers {start}..{end - 1} are not a non-empty range of this model's "
                             f"{self.num_hidden_layers}")
        types = None if self.layer_types is None else self.layer_types[start:end]
        return dataclasses.replace(self, num_hidden_layers=end - start, layer_types=types, **changes)

    def _check_labels(self) -> None:
        n = self.num_labels
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"ModelConfig.num_labels must be a non-negative integer (0: a generative model), got "
                             f"{n!r}")
        if self.labels is None:
            self.labels = [f"LABEL_{i}" for i in range(n)] if n else None
            return
        if not n:
            raise ValueError(f"ModelConfig.labels={self.labels!r} needs num_labels >= 1 (a classification model)")
        if not isinstance(self.labels, (list, tuple)) or len(self.labels) != n or \
                not all(isinstance(label, str) for label in self.labels):
            raise ValueError(f"ModelConfig.labels must be a list of num_labels={n} strings (or None), got "
                             f"{self.labels!r}")
        self.labels = list(self.labels)

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
        mlp = 3 * h * i * max(1, self.num_local_experts) + h * self.num_local_experts  # experts + router
        per_layer = h * (q + 2 * kv) + q * h + mlp + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * d
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h + self.num_labels * h  # (+ a classifier's head)

    def kv_bytes_per_token(self, bytes_per_element: float = 2.0) -> float:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * bytes_per_element


@dataclass
class EngineConfig:
    """How the engine runs: memory, batching, scheduling. Validated on construction. A None field is decided
    for the model and device by minillm.engine.cache_config.resolve_engine_config, once, before anything is built."""

    max_model_len: int | None = None  # the model's max_position_embeddings (capped on CPU)
    max_num_seqs: int | None = None  # 64 on a GPU, 8 on a CPU
    max_num_batched_tokens: int = 8192
    # KV cache: paged blocks (chapter 5). "contiguous" reserves max_model_len slots per sequence (chapter 2).
    kv_layout: str | None = None  # "paged" | "contiguous"; None: paged for continuous, contiguous for static
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit pool size (CPU); else sized from kv_cache_memory / GPU profiling
    kv_cache_memory: int | None = None  # bytes for the KV pool on CPU
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES: "fp8" stores K/V in one byte (2x the blocks of bf16)
    # Scheduling (chapter 6)
    scheduling: str = "continuous"  # "continuous" | "static"
    scheduling_policy: str = "fcfs"  # one of SCHEDULING_POLICIES; "priority" honours a request's priority
    preemption_mode: str = "recompute"  # "recompute" | "swap"
    # schedule and launch step N+1 while the device runs step N; step N's tokens reach the host one step later
    # (vLLM's async scheduling; minillm/engine/async_step.py). Continuous scheduling, one worker rank. None: on
    # for CUDA where it applies, off on a CPU (resolved once, minillm.engine.cache_config)
    async_scheduling: bool | None = None
    swap_space: int = 4 << 30  # bytes of pinned CPU memory for swapped blocks
    enable_prefix_caching: bool = False
    # GiB of host memory for the prefix cache's CPU tier (vLLM's --kv-offloading-size): a cached block evicted on
    # the device is kept there and copied back when a prompt hits it (minillm/engine/offload_tier.py). None or 0: off
    kv_offloading_size: float | None = None
    enable_chunked_prefill: bool = False
    # vLLM's: with chunked prefill, a prompt computes at most this many tokens in one step (0: as many as the token
    # budget leaves), so one long prompt cannot take a whole step's budget and the requests behind it start their
    # prefills in the same steps (Sarathi-Serve's fairness; short prompts' TTFT stops waiting for the long one's)
    long_prefill_token_threshold: int = 0
    # prompts given as embeddings [n, hidden_size] (vLLM's flag; minillm/engine/prompt_embeds.py)
    enable_prompt_embeds: bool = False
    # vLLM's: a sliding-window model attends fully, its context capped at the window (ModelConfig.
    # without_sliding_window; applied by LLM(...) before the model is built)
    disable_sliding_window: bool = False
    # top log-probabilities per token a request may ask for (SamplingParams.logprobs / prompt_logprobs; vLLM's
    # max_logprobs): -1 lifts the cap to the whole vocabulary (a 49k-entry dict per token: mind the memory)
    max_logprobs: int = 20
    # Operators (chapters 3-4)
    attention_backend: str = "auto"  # "auto" (triton on CUDA, torch on CPU) | "torch" | "reference" | "triton"
    enforce_eager: bool | None = None  # None: CUDA graphs for decode on CUDA (False), eager on a CPU (True)
    compile: bool = False  # torch.compile the model
    # with CUDA graphs on: steps with prefill tokens replay piecewise graphs between eager attention calls
    # (minillm.engine.piecewise_graph), token counts up to min(max_num_batched_tokens, 512); None: on wherever
    # decode graphs are (resolved once, minillm.engine.cache_config)
    piecewise_cuda_graphs: bool | None = None
    # Speculative decoding (chapter 9): vLLM's dict (minillm.speculative.config.SpeculativeConfig), or the seed's
    # spelling speculative_model= ("[ngram]", a method name or a draft path) + num_speculative_tokens=
    speculative_config: dict[str, Any] | None = None
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None
    # Parallelism (chapter 11): ranks per tensor-parallel group x pipeline stages = worker processes
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # Expert parallelism (chapter 11, MoE models): expert_parallel_size worker processes, each holding
    # num_local_experts / expert_parallel_size experts of every MoE layer; attention replicated on each (so not
    # combined with tensor/pipeline parallelism). vLLM spells it enable_expert_parallel=True on top of its TP
    # ranks; one explicit size says how many processes start. moe_capacity_factor: None keeps every token;
    # a number c drops the tokens an expert receives beyond ceil(c * tokens * top_k / num_experts) (Switch).
    expert_parallel_size: int = 1
    moe_capacity_factor: float | None = None
    # Multi-LoRA serving (minillm.lora): requests may name an adapter (LoRARequest); max_loras of them at a time in
    # device slots of rank up to max_lora_rank; max_cpu_loras adapters kept read in host memory (None: max_loras)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in ENGINE_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r}; allowed: "
                                 f"{', '.join(repr(a) for a in allowed)}")
        # (name, smallest value, may be None)
        for name, low, optional in (("max_model_len", 1, True), ("max_num_seqs", 1, True),
                                    ("max_num_batched_tokens", 1, False), ("block_size", 1, False),
                                    ("num_kv_blocks", 1, True), ("kv_cache_memory", 1, True),
                                    ("swap_space", 0, False), ("tensor_parallel_size", 1, False),
                                    ("pipeline_parallel_size", 1, False), ("expert_parallel_size", 1, False),
                                    ("max_loras", 1, False), ("max_lora_rank", 1, False), ("max_cpu_loras", 1, True),
                                    ("long_prefill_token_threshold", 0, False), ("max_logprobs", -1, False)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"EngineConfig.{name} must be an integer >= {low}, got {value!r}")
        for name in ("enforce_eager", "compile", "enable_prefix_caching", "enable_chunked_prefill",
                     "piecewise_cuda_graphs", "async_scheduling", "enable_lora", "enable_prompt_embeds",
                     "disable_sliding_window"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name in ("enforce_eager",
                                                                                "piecewise_cuda_graphs",
                                                                                "async_scheduling")):
                raise TypeError(f"EngineConfig.{name} must be a bool, got {value!r}")
        if self.preemption_mode == "swap" and self.swap_space == 0:  # it would recompute every time, silently
            raise ValueError("preemption_mode='swap' needs swap_space > 0 bytes of CPU memory for the swapped "
                             "blocks, got swap_space=0 (or use preemption_mode='recompute')")
        if self.expert_parallel_size > 1 and self.tensor_parallel_size * self.pipeline_parallel_size > 1:
            raise ValueError(f"expert_parallel_size={self.expert_parallel_size} runs attention replicated on every "
                             f"rank; combine it with tensor_parallel_size=1 and pipeline_parallel_size=1, got "
                             f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")
        if self.async_scheduling and (self.scheduling != "continuous" or self.tensor_parallel_size
                                      * self.pipeline_parallel_size * self.expert_parallel_size > 1):
            raise ValueError(f"async_scheduling=True needs scheduling='continuous' and one worker rank "
                             f"(tensor/pipeline/expert_parallel_size 1), got scheduling={self.scheduling!r}, sizes "
                             f"{self.tensor_parallel_size}/{self.pipeline_parallel_size}/{self.expert_parallel_size}")
        factor = self.moe_capacity_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                   or not 0 < factor < float("inf")):
            raise ValueError(f"EngineConfig.moe_capacity_factor must be None or a finite number > 0, got {factor!r}")
        utilization = self.gpu_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {type(utilization).__name__}: "
                             f"{utilization!r}")
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            raise ValueError(f"long_prefill_token_threshold={self.long_prefill_token_threshold} cuts prompts into "
                             f"chunks: it needs enable_chunked_prefill=True (or long_prefill_token_threshold=0)")
        self._check_static()
        self._check_offloading()
        from minillm.speculative.config import SpeculativeConfig  # lazy: a leaf module, validates both spellings
        SpeculativeConfig.from_engine_config(self)
        self._check_lora()
        if self.kv_cache_dtype != "auto" and self.pipeline_parallel_size > 1:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} needs pipeline_parallel_size=1 (its scales are "
                             f"calibrated by one forward of the whole model), got {self.pipeline_parallel_size}")

    def _check_lora(self) -> None:
        """What LoRA adapters run beside: continuous batching on one rank or on tensor/pipeline-parallel ranks."""
        from minillm.lora.adapter import MAX_LORA_RANK
        if self.max_lora_rank > MAX_LORA_RANK:
            raise ValueError(f"EngineConfig.max_lora_rank must be in 1..{MAX_LORA_RANK}, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"EngineConfig.max_cpu_loras={self.max_cpu_loras} must be >= max_loras="
                             f"{self.max_loras} (every adapter in a slot is also held in host memory)")
        if not self.enable_lora:
            return
        asked = [text for text, on in (
            (f"expert_parallel_size={self.expert_parallel_size}", self.expert_parallel_size > 1),
            ("speculative decoding", self.speculative_config is not None or self.speculative_model is not None),
            ("scheduling='static'", self.scheduling == "static"), ("compile=True", self.compile)) if on]
        if asked:
            raise ValueError(f"enable_lora=True does not combine with {', '.join(asked)} in minillm: adapters are "
                             f"served by continuous batching, on one rank or tensor/pipeline-parallel ranks, without "
                             f"speculation or torch.compile")

    def _check_offloading(self) -> None:
        """The CPU tier keeps prefix-cache blocks of the paged pool: a size in GiB, and prefix caching on."""
        size = self.kv_offloading_size
        if size is None:
            return
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not 0 <= size < float("inf"):
            raise ValueError(f"EngineConfig.kv_offloading_size must be None or a finite number of GiB >= 0, got "
                             f"{size!r}")
        if size and not self.enable_prefix_caching:
            raise ValueError(f"kv_offloading_size={size} GiB keeps evicted prefix-cache blocks in host memory: it "
                             f"needs enable_prefix_caching=True")
        if size and self.kv_layout == "contiguous":
            raise ValueError(f"kv_offloading_size={size} needs the paged KV layout (kv_layout='paged' or None), got "
                             f"kv_layout='contiguous'")

    def _check_static(self) -> None:
        """Static batching (chapter 2) runs each batch to its end in fixed slots: it never shares prefix blocks,
        splits a prompt or preempts, so asking it to is a contradiction, not something to ignore silently."""
        if self.scheduling != "static":
            return
        asked = [text for text, on in (("enable_prefix_caching=True", self.enable_prefix_caching),
                                       ("enable_chunked_prefill=True", self.enable_chunked_prefill),
                                       ("preemption_mode='swap'", self.preemption_mode == "swap"),
                                       ("scheduling_policy='priority'", self.scheduling_policy == "priority"))
                 if on]
        if asked:
            raise ValueError(f"scheduling='static' cannot honour {', '.join(asked)}: those are continuous "
                             f"batching's (scheduling='continuous')")
