"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3), chapter 1.

Written the way vLLM and nano-vllm write it: the forward takes the *packed* new tokens of the whole batch
(`input_ids` [T], `positions` [T], no padding) and returns hidden states [T, hidden]; which token belongs
to which sequence is the forward context's business (read only by the Attention layers). The engine then
picks the rows it needs (the last token of each sequence) and calls `compute_logits`.

    embed -> N x [ RMSNorm -> attention (qkv_proj, RoPE, Attention, o_proj) -> +residual
                   RMSNorm -> MLP (gate_up_proj, silu_and_mul, down_proj)    -> +residual ] -> RMSNorm

The residual adds are fused into the following norm (RMSNorm(x, residual)), and at decode on a GPU that norm can
run inside the next projection's GEMV (Linear.forward_rms_norm: one kernel per norm fewer). Weights arrive under
Hugging Face's names; `load_weights` packs q/k/v and gate/up into the engine's fused projections.

Operator backend: `LlamaForCausalLM(config, backend=...)` or, later, `model.attention_backend = ...` sets the
one backend of every operator module (attention, RMSNorm, RoPE, SiLU*mul): "torch", "reference", "triton" or
"auto" (triton kernels on a GPU, torch on a CPU); see minillm.layers.backend.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.layers.activation import SiluAndMul
from minillm.layers.attention import Attention
from minillm.layers.backend import check_backend, set_operator_backend, use_triton
from minillm.layers.linear import default_weight_loader
from minillm.layers.norm import RMSNorm
from minillm.layers.rotary import RotaryEmbedding
# Tensor/pipeline-parallel layers (chapter 11): with one rank they are the plain layers of chapter 1
from minillm.parallel.pipeline import PPMissingLayer, get_pp_indices, is_pp_missing
from minillm.parallel.state import get_parallel_state
from minillm.parallel.tensor import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                     RowParallelLinear, VocabParallelEmbedding, plan_all_reduces)
from minillm.quant.base import QuantizationConfig, make_quant_config


def _window_of(config: ModelConfig, prefix: str) -> int | None:
    """The sliding window of the attention named `prefix` ("model.layers.7.self_attn": layer 7, as vLLM's
    extract_layer_index reads it); the layer number matters only where config.layer_types tells layers apart."""
    if config.layer_types is None:
        return config.sliding_window
    numbers = [int(part) for part in prefix.split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise ValueError(f"cannot tell the layer number of {prefix!r}, needed for config.layer_types")
    return config.sliding_window_of(numbers[0])


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads (all of them without tensor parallelism)
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        plan_all_reduces(self.qkv_proj, self.o_proj)  # column -> row: one all-reduce, after o_proj
        self.rotary_emb = rotary_emb  # one cos/sin cache shared by every layer
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5,
                              backend=rotary_emb.backend, sliding_window=_window_of(config, prefix))
        if config.qk_norm:  # Qwen3: each query and key head RMS-normalised over head_dim (one gain for all heads)
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, backend=rotary_emb.backend)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, backend=rotary_emb.backend)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor | None,
                qkv: torch.Tensor | None = None) -> torch.Tensor:
        """o_proj(attention(RoPE(q, k), v)); `qkv` (instead of hidden_states): the projection already computed, by
        the decoder layer's norm-fused GEMV."""
        if qkv is None:
            qkv = self.qkv_proj(hidden_states)
        num_tokens = qkv.shape[0]
        q, k, v = self.qkv_proj.split(qkv)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        # RoPE inside (fused with the KV store, and Qwen3's q/k norms before it)
        norms = (self.q_norm, self.k_norm) if hasattr(self, "q_norm") else None
        out = self.attn(q, k, v, positions, self.rotary_emb, qk_norm=norms)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up packed into one matmul."""

    def __init__(self, config: ModelConfig, backend: str = "auto",
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=False,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        plan_all_reduces(self.gate_up_proj, self.down_proj)
        self.act_fn = SiluAndMul(backend)

    def forward(self, x: torch.Tensor | None, gate_up: torch.Tensor | None = None) -> torch.Tensor:
        """down(silu(gate) * up); `gate_up` (instead of x): the projection already computed, by the decoder
        layer's norm-fused GEMV."""
        if gate_up is None:
            gate_up = self.gate_up_proj(x)
        if use_triton(self.act_fn.backend, gate_up) and self.down_proj.fuses_swiglu(gate_up):
            return self.down_proj(gate_up, swiglu=True)  # decode: silu(gate) * up inside down's GEMV, one launch
        return self.down_proj(self.act_fn(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary_emb: RotaryEmbedding,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        backend = rotary_emb.backend
        self.self_attn = LlamaAttention(config, rotary_emb, quant_config, prefix=f"{prefix}.self_attn")
        self.mlp = self.build_mlp(config, backend, quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, backend=backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, backend=backend)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # `residual` carries the stream *before* the previous sub-block's output was added; the norm adds it.
        # At decode on a GPU the norm can also run inside the next projection's GEMV (_fused_norm): one launch.
        qkv_proj = self.self_attn.qkv_proj
        if self._fused_norm(self.input_layernorm, qkv_proj, hidden_states):
            qkv, residual = qkv_proj.forward_rms_norm(hidden_states, residual, self.input_layernorm)
            hidden_states = self.self_attn(positions, None, qkv=qkv)
        else:
            if residual is None:
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
            else:
                hidden_states, residual = self.input_layernorm(hidden_states, residual)
            hidden_states = self.self_attn(positions, hidden_states)
        gate_up_proj = self.mlp.gate_up_proj if isinstance(self.mlp, LlamaMLP) else None
        if gate_up_proj is not None and self._fused_norm(self.post_attention_layernorm, gate_up_proj, hidden_states):
            gate_up, residual = gate_up_proj.forward_rms_norm(hidden_states, residual, self.post_attention_layernorm)
            return self.mlp(None, gate_up=gate_up), residual
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    @staticmethod
    def _fused_norm(norm: RMSNorm, linear: nn.Module, x: torch.Tensor) -> bool:
        """Whether `norm` runs inside `linear`'s GEMV: the norm would run the Triton kernel (whose arithmetic the
        GEMV repeats), nothing hooks the norm, and the layer says the fused GEMV won for this shape."""
        return norm.inlinable(x) and linear.fuses_rms_norm(x)

    def build_mlp(self, config: ModelConfig, backend: str, quant_config: QuantizationConfig | None,
                  prefix: str) -> nn.Module:
        """The feed-forward sub-block; a sparse MoE model (minillm.models.moe) returns its expert block here."""
        return LlamaMLP(config, backend, quant_config, prefix=prefix)


class LlamaModel(nn.Module):
    layer_class = LlamaDecoderLayer  # a variant of the decoder (Mixtral) swaps in its own layer

    def __init__(self, config: ModelConfig, backend: str = "auto",
                 quant_config: QuantizationConfig | None = None) -> None:
        super().__init__()
        pp = get_parallel_state()  # one stage holding every layer unless pipeline-parallel (chapter 11)
        self.start_layer, self.end_layer = get_pp_indices(config.num_hidden_layers, pp.pp_rank, pp.pp_size)
        self.is_first_stage, self.is_last_stage = pp.is_first_stage, pp.is_last_stage
        has_embedding = pp.is_first_stage or (pp.is_last_stage and config.tie_word_embeddings)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if has_embedding \
            else PPMissingLayer()
        rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                     base=config.rope_theta, rope_scaling=config.rope_scaling, backend=backend)
        self.rotary_emb = rotary_emb  # the one table every layer's attention shares
        self.layers = nn.ModuleList(
            self.layer_class(config, rotary_emb, quant_config, prefix=f"model.layers.{i}")
            if self.start_layer <= i < self.end_layer else PPMissingLayer() for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, backend=backend) if pp.is_last_stage \
            else PPMissingLayer()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate_tensors: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Hidden states [T, hidden]; on a pipeline stage before the last, (hidden, residual) for the next stage,
        which passes them back in as `intermediate_tensors` instead of embedding the tokens."""
        if intermediate_tensors is None:
            hidden_states, residual = self.embed_tokens(input_ids), None
        else:
            hidden_states, residual = intermediate_tensors
        self.rotary_emb.remember_positions(positions)  # cos/sin looked up once, not once per layer
        try:
            for layer in self.layers[self.start_layer:self.end_layer]:
                hidden_states, residual = layer(positions, hidden_states, residual)
        finally:
            self.rotary_emb.forget_positions()
        if not self.is_last_stage:
            return hidden_states, residual
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T]) -> hidden [T, hidden]; compute_logits(hidden [N, hidden]) -> [N, vocab]."""

    # checkpoint name -> (packed parameter name, shard id), as vLLM's packed_modules_mapping
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    model_class = LlamaModel  # the decoder stack (minillm.models.moe swaps in Mixtral's)

    def __init__(self, config: ModelConfig, backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        self._backend = check_backend(backend)
        self.quant_config = make_quant_config(config)  # None: dense; one per model, asked once per Linear
        self.model = self.model_class(config, backend, self.quant_config)
        head_method = self.quant_config.get_lm_head_method() if self.quant_config is not None else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_method=head_method) \
            if self.model.is_last_stage else PPMissingLayer()
        # a quantized head keeps its own copy of a tied embedding's rows (load_weights fills it)
        self.head_copies_embedding = config.tie_word_embeddings and head_method is not None
        if config.tie_word_embeddings and self.model.is_last_stage and head_method is None:
            self.lm_head.tie_to(self.model.embed_tokens)
        if config.num_labels:  # a sequence classifier's head (HF's score, no bias), read on the host
            self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False) if self.model.is_last_stage \
                else PPMissingLayer()  # (minillm/classification.py)

    @property
    def attention_backend(self) -> str:
        """The operator backend of every attention, norm, RoPE and activation module of the model."""
        return self._backend

    @attention_backend.setter
    def attention_backend(self, backend: str) -> None:
        set_operator_backend(self, backend)
        self._backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate_tensors: tuple[torch.Tensor, torch.Tensor] | None = None):
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must both be packed [T] tensors, got "
                             f"{tuple(input_ids.shape)} and {tuple(positions.shape)}")
        if intermediate_tensors is None:
            return self.model(input_ids, positions)
        return self.model(input_ids, positions, intermediate_tensors)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> int:
        """Load HF-named tensors, packing q/k/v and gate/up; raises on unknown or misshapen tensors and, when
        `strict`, on missing ones. strict=False updates the tensors given in place and leaves the rest (new
        weights from a trainer: Worker.update_weights). Returns how many tensors were loaded."""
        params = dict(self.named_parameters())  # tied lm_head.weight appears once, as model.embed_tokens.weight
        copy_head = self.head_copies_embedding and "lm_head.weight" in params
        expected = {name: _shards(name, param) for name, param in params.items()
                    if not (copy_head and name == "lm_head.weight")}
        loaded: set[tuple[str, object]] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:  # older HF checkpoints save the RoPE frequencies; we derive them
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the head is the embedding
            param_name, shard_id = self._map_name(name)
            if param_name not in params and is_pp_missing(self, param_name):
                continue  # a layer of another pipeline stage
            if param_name not in params:
                raise KeyError(f"unknown weight {name!r} for {self.config.architecture} with "
                               f"{self.config.num_hidden_layers} layers (no parameter {param_name!r})")
            param = params[param_name]
            try:
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, tensor.to(param.dtype), shard_id)
            except ValueError as err:
                raise ValueError(f"while loading {name!r}: {err}") from None
            loaded.add((param_name, shard_id))
        missing = [_hf_name(name, shard) for name, shards in expected.items() for shard in shards
                   if (name, shard) not in loaded]
        if missing and strict:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
        if copy_head and ("model.embed_tokens.weight", None) in loaded:  # the same vocabulary rows on this rank
            # as the embedding's, before the head is rounded
            if getattr(self.lm_head, "vocab_start", 0) != getattr(self.model.embed_tokens, "vocab_start", 0):
                raise ValueError("a quantized LM head pads each rank's vocabulary rows to a multiple of 8, so under "
                                 "this tensor-parallel size its rows no longer line up with the tied embedding's; "
                                 "use a vocabulary that splits into multiples of 8 per rank, or lm_head=False")
            head, rows = params["lm_head.weight"].data, params["model.embed_tokens.weight"].data
            head[:len(rows)].copy_(rows)
            head[len(rows):].zero_()  # the head's padding rows (a multiple of 8), cut from the logits
        if strict:
            self.process_weights_after_loading()
        return len(loaded)

    def process_weights_after_loading(self) -> None:
        """Every shard is in: now each Linear's method may repack / quantize (and free its staging weights)."""
        for module in self.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)

    def _map_name(self, name: str) -> tuple[str, object]:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in self.packed_modules_mapping:
                packed, shard_id = self.packed_modules_mapping[part]
                return ".".join(parts[:i] + [packed] + parts[i + 1:]), shard_id
        return name, None


def _shards(param_name: str, param: nn.Parameter) -> tuple[object, ...]:
    owner = getattr(getattr(param, "weight_loader", None), "__self__", None)
    return tuple(getattr(owner, "shard_ids", ())) or (None,)


_UNPACKED = {("qkv_proj", "q"): "q_proj", ("qkv_proj", "k"): "k_proj", ("qkv_proj", "v"): "v_proj",
             ("gate_up_proj", 0): "gate_proj", ("gate_up_proj", 1): "up_proj"}


def _hf_name(param_name: str, shard_id: object) -> str:
    """The checkpoint name a (packed parameter, shard) pair is loaded from, for error messages."""
    if shard_id is None:
        return param_name
    parts = param_name.split(".")
    return ".".join(_UNPACKED.get((p, shard_id), p) for p in parts)
