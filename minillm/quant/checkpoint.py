"""Quantized checkpoints on disk, and quantization at load time (chapters 7-8).

`save_quantized(qm, out_dir, tokenizer)` writes what any Hugging Face-style loader (ours: minillm.loader.hf)
reads back: `model.safetensors` (the quantized tensors under HF names), `config.json` with a
`quantization_config` in vLLM's / transformers' field names (quant_method, bits, group_size, desc_act, sym, ...)
and the tokenizer. A GGUF model has no tokenizer.json, only its ingredients; minillm rebuilds a `tokenizers`
pipeline from them (loader/tokenizer.py), and that pipeline serialises to a standard tokenizer.json, with
bos/eos/pad/unk and the chat template in tokenizer_config.json. So `LLM(model=out_dir)` needs nothing else.

`load_time_quantization(model_config, name)` is what `LLM(model, quantization=name)` calls: a dense checkpoint
can be quantized while loading with the methods that need no data (LOAD_TIME_METHODS); calibrated methods
(gptq, awq, smoothquant) must be run once with `minillm quantize` and their checkpoint loaded instead.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from minillm.quant.base import apply_quantization_override, check_quantization_name

# The methods that need no calibration data, and the quantization_options each one reads (its QuantizationConfig's
# from_config keys): anything else in quantization_options is a typo or a misplaced option, refused by name.
LOAD_TIME_OPTIONS = {
    "rtn": ("bits", "group_size", "sym", "lm_head", "modules_to_not_convert"),
    "fp8": ("weight_granularity", "activation_scheme", "modules_to_not_convert"),
    "fp8_block": ("weight_block_size", "activation_scheme", "modules_to_not_convert"),
    "nf4": ("blocksize", "double_quant_blocksize", "modules_to_not_convert"),
    "int8": ("llm_int8_threshold", "modules_to_not_convert"),
    "int8_rtn": ("bits", "modules_to_not_convert"),
}
LOAD_TIME_METHODS = tuple(LOAD_TIME_OPTIONS)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def load_time_quantization(model_config: Any, quantization: str | None,
                           options: dict[str, Any] | None = None) -> Any:
    """The ModelConfig to build for `LLM(model, quantization=..., quantization_options=...)`: unchanged for None or
    for the checkpoint's own method; a dense checkpoint gets a load-time method (options: e.g. {"bits": 3,
    "group_size": 32} for rtn). Options without a method, or for a checkpoint that is already quantized (its own
    config decides), are refused rather than ignored."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"quantization_options must be a dict, got {type(options).__name__}")
    if quantization is None:
        if options:
            raise ValueError(f"quantization_options={dict(options)!r} need quantization= (a load-time method such "
                             f"as 'rtn')")
        return model_config
    check_quantization_name(quantization)
    if options and model_config.quantization is not None:
        raise ValueError(f"quantization_options apply to a dense checkpoint rounded while loading; this checkpoint is "
                         f"already quantized ({model_config.quantization}): its own config decides")
    if model_config.quantization is None and quantization not in LOAD_TIME_METHODS:
        raise ValueError(f"quantization={quantization!r} needs calibration data and cannot be applied while loading a "
                         f"dense checkpoint; run `minillm quantize MODEL --method {quantization} --out DIR` and load "
                         f"DIR, or pick a load-time method: {', '.join(LOAD_TIME_METHODS)}")
    config = apply_quantization_override(model_config, quantization)
    if model_config.quantization is None and options:
        unknown = sorted(map(str, set(options) - set(LOAD_TIME_OPTIONS[quantization])))
        if unknown:
            raise ValueError(f"quantization_options has unknown key(s) {', '.join(map(repr, unknown))} for "
                             f"quantization={quantization!r}; allowed: {', '.join(LOAD_TIME_OPTIONS[quantization])}")
        config = dataclasses.replace(config, quantization_config=dict(options))
    from minillm.quant.base import make_quant_config
    make_quant_config(config)  # bad options fail here, naming the field, before any weight is read
    return config


def hf_config_dict(config: Any) -> dict[str, Any]:
    """config.json for a ModelConfig, in Hugging Face's field names (config_from_hf reads it back unchanged)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
    raw = {"architectures": [arch[config.architecture]], "model_type": config.architecture,
           "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
           "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
           "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
           "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
           "rope_scaling": config.rope_scaling, "max_position_embeddings": config.max_position_embeddings,
           "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
           "eos_token_id": config.eos_token_id}
    if config.sliding_window is not None:  # read back by loader/hf.py's _sliding_window
        raw.update(sliding_window=config.sliding_window, use_sliding_window=True)
        if config.layer_types is not None:
            raw["layer_types"] = list(config.layer_types)
    elif config.architecture == "mistral":
        raw["sliding_window"] = None  # full attention (Mistral's config would otherwise default to 4096)
    if config.architecture == "mixtral":
        raw.update(num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok)
    elif config.architecture == "qwen3_moe":  # every layer sparse; the experts' width is moe_intermediate_size
        raw.update(num_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok,
                   norm_topk_prob=config.norm_topk_prob, moe_intermediate_size=config.intermediate_size,
                   decoder_sparse_step=1, mlp_only_layers=[])
    if config.quantization_config is not None:
        raw["quantization_config"] = dict(config.quantization_config)
    return raw


def save_tokenizer(tokenizer: Any, out_dir: str, source: str | None = None) -> None:
    """Copy an HF directory's tokenizer files, or serialise minillm's Tokenizer (e.g. rebuilt from a GGUF)."""
    if source is not None and os.path.isdir(source) and os.path.isfile(os.path.join(source, "tokenizer.json")):
        for name in _TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
        return
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not callable(getattr(backend, "save", None)):
        raise TypeError(f"cannot write a tokenizer.json for {type(tokenizer).__name__}; pass minillm's Tokenizer "
                        f"(minillm.loader.load_model returns one) or an HF model directory as the source")
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    special = {"bos_token": tokenizer.bos_token_id, "eos_token": tokenizer.eos_token_id,
               "pad_token": tokenizer.pad_token_id, "unk_token": tokenizer.unk_token_id}
    config = {key: backend.id_to_token(i) for key, i in special.items() if i is not None}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)


def save_quantized(qm: Any, out_dir: str | os.PathLike, tokenizer: Any = None, source: str | None = None) -> str:
    """Write a QuantizedModel (minillm.quant.driver) as an HF directory; returns its path."""
    from minillm.loader.model_files import save_safetensors
    out_dir = os.fspath(out_dir)
    if os.path.isfile(out_dir):
        raise ValueError(f"--out {out_dir} is a file; give a directory (it is created if missing)")
    os.makedirs(out_dir, exist_ok=True)
    save_safetensors({k: v.contiguous() for k, v in qm.state.items()}, os.path.join(out_dir, "model.safetensors"),
                     metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config_dict(qm.config), f, indent=2)
    if tokenizer is not None or source is not None:
        save_tokenizer(tokenizer, out_dir, source)
    return out_dir
