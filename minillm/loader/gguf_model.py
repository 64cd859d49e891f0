"""From a GGUF file to a ModelConfig and a stream of weights under Hugging Face names (chapter 1).

Two translations happen here.

1. Names: llama.cpp calls the query projection of layer 3 `blk.3.attn_q.weight`; Hugging Face calls
   it `model.layers.3.self_attn.q_proj.weight`. The model (minillm.models.llama) uses HF's names, so
   a GGUF file and an HF directory feed it the same stream.

2. The rotary layout of Q and K. Hugging Face's Llama applies RoPE "rotate-half" style: within each
   head, dimension j is paired with dimension j + head_dim/2. llama.cpp pairs neighbours (2j, 2j+1).
   So when convert_hf_to_gguf.py writes a Llama, it permutes the rows of W_q and W_k inside each head,
   moving row j + head_dim/2 next to row j:

       gguf = hf.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)

   We apply the inverse (reshape as (n_head, head_dim // 2, 2, in), swap back), after which our
   weights equal HF's exactly and the model can use rotate-half RoPE. Qwen2 files are written
   without the permutation (llama.cpp runs Qwen2 with the "neox" rotate-half layout), so they pass through.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any, Iterator

import torch

from minillm.config import ModelConfig
from minillm.loader.gguf import GGUFError, GGUFFile
from minillm.loader.model_files import check_weight_shapes

# GGUF architectures we read, and whether their converter permuted Q/K rows for interleaved RoPE.
GGUF_ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # Qwen3's per-head norms
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for a tensor we do not map."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of W_q / W_k (or their biases) so HF's rotate-half RoPE applies."""
    out = weight.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"cannot unpermute a rotary weight of {out} rows into {n_head} heads of even size")
    head_dim = out // n_head
    w = weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape).contiguous()


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind is None and factor is not None:  # older files: only rope.scale_linear
        kind = "linear"
    if kind in (None, "none"):
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise ValueError(f"{arch}.rope.scaling.type={kind!r} needs a finite {arch}.rope.scaling.factor, "
                         f"got {factor!r}")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        if f"{arch}.rope.scaling.original_context_length" in meta:
            scaling["original_max_position_embeddings"] = int(meta[f"{arch}.rope.scaling.original_context_length"])
        return scaling
    raise ValueError(f"unsupported {arch}.rope.scaling.type {kind!r}; supported: none, linear, yarn")


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    """ModelConfig from the `{arch}.*` and `tokenizer.ggml.*` metadata keys."""
    meta, arch = gguf.metadata, gguf.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFError(f"{gguf.path}: unsupported architecture {arch!r} (general.architecture); "
                        f"minillm reads GGUF files of: {', '.join(GGUF_ARCHITECTURES)}")
    if "rope_freqs.weight" in gguf.tensors:
        raise GGUFError(f"{gguf.path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1-style scaling) "
                        f"are not supported in GGUF; load the model's HF directory instead")

    def get(key: str, default: Any = None, required: bool = True, kind: type = int) -> Any:
        """The value of `{arch}.{key}`, checked to be a positive int (kind=int) or a finite number (float)."""
        full = f"{arch}.{key}"
        if full not in meta and required and default is None:
            raise GGUFError(f"{gguf.path}: metadata key {full!r} is missing")
        value = meta.get(full, default)
        if value is None:
            return None
        ok = not isinstance(value, bool) and (isinstance(value, int) and value >= 1 if kind is int else
                                              isinstance(value, (int, float)) and math.isfinite(value))
        if not ok:
            allowed = "a positive integer" if kind is int else "a finite number"
            raise GGUFError(f"{gguf.path}: metadata {full} must be {allowed}, got {str(value)[:80]}")
        return kind(value)

    num_heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", required=False)
    if head_dim is None and hidden % num_heads:
        raise GGUFError(f"{gguf.path}: metadata {arch}.embedding_length={hidden} is not a multiple of "
                        f"{arch}.attention.head_count={num_heads} (and no attention.key_length gives the head size)")
    head_dim = head_dim if head_dim is not None else hidden // num_heads
    rope_dim = get("rope.dimension_count", required=False)
    if rope_dim is not None and rope_dim != head_dim:
        kind = "partial rotary" if rope_dim < head_dim else "a rotary dimension larger than the head"
        raise GGUFError(f"{gguf.path}: {kind} ({arch}.rope.dimension_count={rope_dim}, head_dim {head_dim}) is "
                        f"not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None:
        if not isinstance(tokens, list):
            raise GGUFError(f"{gguf.path}: tokenizer.ggml.tokens must be an array, got {str(tokens)[:80]}")
        vocab_size = len(tokens)
    elif f"{arch}.vocab_size" in meta:
        vocab_size = get("vocab_size")
    else:
        vocab_size = gguf.tensor_info("token_embd.weight").shape[0]
    # read before the try: get() names the file already, and the try would name it again
    values = dict(intermediate_size=get("feed_forward_length"), num_hidden_layers=get("block_count"),
                  num_key_value_heads=get("attention.head_count_kv", num_heads),
                  rms_norm_eps=get("attention.layer_norm_rms_epsilon", kind=float),
                  rope_theta=get("rope.freq_base", 10000.0, kind=float), max_position_embeddings=get("context_length"))
    try:  # ModelConfig checks the rest (ranges, divisibility, token ids); the message gains the file's name
        return ModelConfig(
            architecture=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_attention_heads=num_heads,
            head_dim=head_dim,
            rope_scaling=_rope_scaling(meta, arch),
            tie_word_embeddings="output.weight" not in gguf.tensors,
            attention_bias="blk.0.attn_q.bias" in gguf.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            **values,
        )
    except (ValueError, TypeError) as err:
        raise GGUFError(f"{gguf.path}: {err}") from None


def load_gguf_model(
    path: str | os.PathLike | GGUFFile,
) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """Open a GGUF file, check every tensor against the config, and return (config, lazy (hf_name, fp32 tensor) stream).

    Shapes and presence are checked before the first tensor is dequantized, so a bad file fails here,
    not halfway through `model.load_weights(...)`.
    """
    gguf = path if isinstance(path, GGUFFile) else GGUFFile(path)
    config = config_from_gguf(gguf)
    hf_to_gguf, unmapped = {}, []
    for name in gguf.tensors:
        hf_name = gguf_to_hf_name(name)
        if hf_name is None:
            unmapped.append(name)
        else:
            hf_to_gguf[hf_name] = name
    if unmapped:
        warnings.warn(f"{gguf.path}: ignoring {len(unmapped)} tensor(s) the model does not use, e.g. {unmapped[0]}",
                      stacklevel=2)
    found = {hf: gguf.tensors[g].shape for hf, g in hf_to_gguf.items()}
    try:
        unused = check_weight_shapes(found, config, gguf.path, file_names=hf_to_gguf)
    except ValueError as exc:
        raise GGUFError(str(exc)) from None
    for hf_name in unused:  # e.g. output.weight in a file whose config says tied: never the case for GGUF
        del hf_to_gguf[hf_name]
    permuted = GGUF_ARCHITECTURES[config.architecture]

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, gguf_name in hf_to_gguf.items():
            tensor = gguf.load_tensor(gguf_name)
            if permuted and ".q_proj." in hf_name:
                tensor = unpermute_rotary(tensor, config.num_attention_heads)
            elif permuted and ".k_proj." in hf_name:
                tensor = unpermute_rotary(tensor, config.num_key_value_heads)
            yield hf_name, tensor

    return config, weights()
