"""`minillm quantize --method gguf-q4_0|gguf-q4_k|gguf-q8_0 --out FILE.gguf`: a whole model as one GGUF (chapter 8).

The file is self-contained, as llama.cpp's are: the source GGUF's metadata (tokenizer vocabulary and merges,
special token ids, chat template, general.*) is copied key by key with its original value types (from an HF
directory, its tokenizer.json is converted: minillm/quant/gguf_tokenizer.py), the
architecture keys (`llama.block_count`, `llama.rope.freq_base`, ...) are written from the ModelConfig, and
the tensors go back under llama.cpp's names, with W_q / W_k rows permuted back to llama.cpp's interleaved
RoPE layout (the inverse of minillm.loader.gguf_model.unpermute_rotary).

Which tensor gets which type, and why:

    norms, biases (1-D)          F32   a few thousand numbers; quantizing them saves nothing and costs accuracy
    token_embd (and output)      Q8_0  with tied embeddings (SmolLM2) this matrix is also the LM head, the most
                                       error-sensitive weight in the model; llama.cpp keeps it at 6-8 bits too
                                       (Q6_K in its Q4 presets; we do not write Q6_K, so Q8_0)
    every other matrix           the method's type: Q4_0, Q8_0 or Q4_K; Q4_K falls back to Q5_0 for rows that
                                 are not a multiple of 256 (SmolLM2's hidden 576), as llama.cpp does

`general.file_type` says which preset the file is (llama.cpp's llama_ftype: 2 = mostly Q4_0, 7 = mostly Q8_0,
14 = mostly Q4_K_S, which is what ours is: Q4_K everywhere it fits, 8 bits for the embedding).
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import torch

from minillm.config import ModelConfig
from minillm.loader.gguf import GGUFFile
from minillm.loader.gguf_model import _GLOBAL_NAMES, _LAYER_NAMES, GGUF_ARCHITECTURES
from minillm.loader.gguf_writer import GGUFValueType, GGUFWriter
from minillm.loader.model_files import expected_weight_shapes
from minillm.loader.tokenizer import Tokenizer
from minillm.quant.gguf_quants import gguf_type_for, gguf_type_id, quantize_tensor
from minillm.quant.gguf_tokenizer import Metadata, tokenizer_metadata

GGUF_METHODS = {"gguf-q4_0": "Q4_0", "gguf-q4_k": "Q4_K", "gguf-q8_0": "Q8_0"}
LLAMA_FILE_TYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K": 14}  # llama_ftype: MOSTLY_Q4_0, MOSTLY_Q8_0, MOSTLY_Q4_K_S
QUANTIZATION_VERSION = 2  # ggml's current block layouts (general.quantization_version)
EMBEDDING_TYPE = "Q8_0"

_HF_GLOBAL = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_HF_LAYER = {hf: g for g, hf in _LAYER_NAMES.items()}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_to_gguf_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (the inverse of gguf_to_hf_name)."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _HF_LAYER_RE.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    raise ValueError(f"no GGUF name for tensor {name!r}; minillm writes Llama-family weights "
                     f"({', '.join(sorted(_HF_LAYER))} per layer)")


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order of W_q / W_k -> llama.cpp's interleaved pairs (convert_hf_to_gguf's permute)."""
    out = weight.shape[0]
    if out % (2 * n_head):
        raise ValueError(f"cannot permute a rotary weight of {out} rows into {n_head} heads of even size")
    w = weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape).contiguous()


def _architecture_keys(config: ModelConfig) -> list[tuple[str, object, GGUFValueType]]:
    arch, u32, f32 = config.architecture, GGUFValueType.UINT32, GGUFValueType.FLOAT32
    keys = [("context_length", config.max_position_embeddings, u32), ("embedding_length", config.hidden_size, u32),
            ("block_count", config.num_hidden_layers, u32), ("feed_forward_length", config.intermediate_size, u32),
            ("attention.head_count", config.num_attention_heads, u32),
            ("attention.head_count_kv", config.num_key_value_heads, u32),
            ("attention.layer_norm_rms_epsilon", config.rms_norm_eps, f32),
            ("rope.freq_base", config.rope_theta, f32), ("rope.dimension_count", config.head_dim, u32),
            ("vocab_size", config.vocab_size, u32)]
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        keys += [("attention.key_length", config.head_dim, u32), ("attention.value_length", config.head_dim, u32)]
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") in ("linear", "yarn"):
        keys += [("rope.scaling.type", scaling["rope_type"], GGUFValueType.STRING),
                 ("rope.scaling.factor", scaling["factor"], f32)]
        if "original_max_position_embeddings" in scaling:
            keys.append(("rope.scaling.original_context_length", scaling["original_max_position_embeddings"], u32))
    elif scaling:
        raise ValueError(f"rope_scaling {scaling} cannot be written to GGUF; minillm writes linear and yarn")
    return [(f"{arch}.{key}", value, vtype) for key, value, vtype in keys]


def tensor_types(config: ModelConfig, type_name: str, embedding_type: str = EMBEDDING_TYPE) -> dict[str, str]:
    """HF name -> the GGUF type each tensor of this model is written in (see the module docstring)."""
    types = {}
    for name, shape in expected_weight_shapes(config).items():
        if len(shape) == 1:
            types[name] = "F32"
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            types[name] = gguf_type_for(embedding_type, shape)
        else:
            types[name] = gguf_type_for(type_name, shape)
    return types


def source_metadata(source: GGUFFile | Tokenizer, config: ModelConfig) -> Metadata:
    """The keys copied into the new file: a source GGUF's own (tokenizer, chat template, general.*; not its
    architecture keys or file type, which are rewritten), or an HF tokenizer's, converted (quant/gguf_tokenizer)."""
    if isinstance(source, Tokenizer):
        return tokenizer_metadata(source, config.vocab_size)
    if not isinstance(source, GGUFFile) or "tokenizer.ggml.tokens" not in source.metadata:
        raise ValueError(f"the tokenizer comes from a source GGUF with tokenizer.ggml.* keys or from an HF Tokenizer; "
                         f"got {source!r:.80}")
    dropped = ("general.alignment", "general.file_type", "general.quantization_version")
    arch_prefixes = (f"{source.architecture}.", f"{config.architecture}.")
    return [(key, value, *source.metadata_types[key]) for key, value in source.metadata.items()
            if key not in dropped and not key.startswith(arch_prefixes)]


def write_gguf_model(path: str | os.PathLike, config: ModelConfig, weights: Mapping[str, torch.Tensor],
                     type_name: str, source: GGUFFile | Tokenizer, embedding_type: str = EMBEDDING_TYPE,
                     progress: bool = True) -> str:
    """Quantize `weights` (HF names, float, HF row order) into a GGUF at `path`, with the tokenizer of `source`:
    the GGUFFile the weights came from, or the Tokenizer of an HF directory.

    type_name: "Q4_0", "Q8_0" or "Q4_K" for the decoder's matrices. Tensors are quantized one at a time while
    the file is written, so the quantized model is never held in memory whole.
    """
    if type_name not in LLAMA_FILE_TYPES:
        raise ValueError(f"type_name must be one of {', '.join(LLAMA_FILE_TYPES)}, got {type_name!r}")
    if config.architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"minillm writes GGUF for {', '.join(GGUF_ARCHITECTURES)}, not {config.architecture!r}")
    types = tensor_types(config, type_name, embedding_type)
    missing = [name for name in types if name not in weights]
    if missing:
        raise ValueError(f"weights lack {len(missing)} tensor(s) the config needs, e.g. {missing[0]}")
    shapes = expected_weight_shapes(config)
    for name in types:
        if tuple(weights[name].shape) != shapes[name]:
            raise ValueError(f"tensor {name} has shape {list(weights[name].shape)}, the config expects "
                             f"{list(shapes[name])}")
    writer = GGUFWriter(path)
    for key, value, vtype, etype in source_metadata(source, config):
        writer.add_metadata(key, value, vtype, etype)
    writer.add_metadata("general.architecture", config.architecture, GGUFValueType.STRING)
    for key, value, vtype in _architecture_keys(config):
        writer.add_metadata(key, value, vtype)
    writer.add_metadata("general.file_type", LLAMA_FILE_TYPES[type_name], GGUFValueType.UINT32)
    writer.add_metadata("general.quantization_version", QUANTIZATION_VERSION, GGUFValueType.UINT32)
    permuted = GGUF_ARCHITECTURES[config.architecture]
    heads = {".q_proj.": config.num_attention_heads, ".k_proj.": config.num_key_value_heads}

    def encoded(name: str, tname: str) -> torch.Tensor:
        tensor = weights[name].detach().to("cpu", torch.float32)
        head = next((n for part, n in heads.items() if part in name), None)
        if permuted and head is not None:
            tensor = permute_rotary(tensor, head)
        return quantize_tensor(tensor, tname)[1]

    for name, tname in types.items():
        writer.add_tensor(hf_to_gguf_name(name), shapes[name], gguf_type_id(tname),
                          lambda name=name, tname=tname: encoded(name, tname))
    return writer.write(progress=progress, desc=f"gguf {type_name}")
