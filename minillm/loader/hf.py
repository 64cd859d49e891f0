"""Loading a Hugging Face model directory: config.json + safetensors shards (chapter 1).

This is what a user with a GPU brings: a Llama 2/3, Mistral, Qwen2, Qwen3, Mixtral, Qwen3-MoE or SmolLM checkpoint as
`save_pretrained` writes it. The weights are already under the names our model expects and already
in rotate-half RoPE order, so unlike GGUF there is nothing to rename or permute; the work is reading
the config (in both the transformers-4 spelling, `rope_theta` + `rope_scaling`, and the
transformers-5 one, `rope_parameters`), finding the shards, and checking every shape before any
tensor is read. Tensors are streamed one at a time, in their stored dtype (bf16 for most
checkpoints), so peak memory stays near one shard's largest tensor rather than the whole model. A
`*ForSequenceClassification` directory (a reward model or classifier) loads too: a `score` head in place of the LM
head, its labels from id2label (minillm/classification.py).
"""
from __future__ import annotations

import glob
import os
import warnings
from typing import Any, Iterator

import torch
from safetensors import safe_open

from minillm.config import ModelConfig
from minillm.loader.model_files import check_weight_shapes, read_json
from minillm.quant.base import check_quantization_name

# SmolLM and SmolLM2 are model_type "llama"
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
# Tensors that some checkpoints carry but the model recomputes or does not need.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _sliding_window(raw: dict[str, Any], model_type: str, source: str) -> tuple[Any, Any]:
    """(sliding_window, layer_types) as transformers reads them: Mistral and Mixtral slide in every layer when
    `sliding_window` is set; Qwen2/Qwen3 only with `use_sliding_window`, in the layers from `max_window_layers`
    on unless the config lists `layer_types` itself. ModelConfig checks the values."""
    window = raw.get("sliding_window", None if model_type == "mixtral" else 4096)  # transformers' defaults
    if window is None or not raw.get("use_sliding_window", model_type in ("mistral", "mixtral")):
        return None, None
    if model_type in ("mistral", "mixtral"):
        return window, None
    layer_types = raw.get("layer_types")
    if layer_types is None and _is_int(raw["num_hidden_layers"]):
        first = raw.get("max_window_layers", 28)  # transformers' default for Qwen2 and Qwen3
        if not _is_int(first):
            raise ValueError(f"{source}: max_window_layers must be an integer, got {first!r}")
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(raw["num_hidden_layers"])]
    return window, layer_types


def _rope(raw: dict[str, Any], source: str) -> tuple[Any, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config spelling; rope_scaling None for plain RoPE."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):  # transformers >= 5: one dict with theta and scaling together
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling") or {}
        if not isinstance(scaling, dict):
            raise ValueError(f"{source}: rope_scaling must be an object or null, got {scaling!r}")
        scaling = dict(scaling)
    if "type" in scaling and "rope_type" not in scaling:  # transformers < 4.45 spelled it "type"
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    if scaling["rope_type"] == "yarn" and not scaling.get("original_max_position_embeddings"):
        # (transformers' default: the context the config states)
        scaling["original_max_position_embeddings"] = raw.get("max_position_embeddings")
    return theta, scaling


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from the dict in an HF config.json; ValueError naming the file and the field if it is bad."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object of model settings, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(f"{source}: unsupported model_type {model_type!r}; minillm loads {', '.join(HF_MODEL_TYPES)}")
    if raw.get("mlp_bias") or (model_type != "qwen2" and raw.get("attention_bias")):
        raise ValueError(f"{source}: {model_type} with mlp_bias/attention_bias=true (biases on o_proj or the MLP) "
                         f"is not supported")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)} (an HF {model_type} config.json has them all)")
    theta, scaling = _rope(raw, source)
    max_pos = raw.get("max_position_embeddings", 4096)
    window, layer_types = _sliding_window(raw, model_type, source)
    heads = raw["num_attention_heads"]
    quantization, quant_config = _quantization(raw, source)
    experts = _experts(raw, model_type, source)
    num_labels, labels = _classifier(raw, source)
    try:  # ModelConfig checks every type and range; the message gains the file's name here
        return ModelConfig(
            architecture=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=experts.pop("intermediate_size", raw["intermediate_size"]),
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim"),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            # a classifier has no LM head: the one token an embedding request samples (and drops) comes from
            # the embedding, read as a tied head (minillm/classification.py)
            tie_word_embeddings=bool(num_labels) or raw.get("tie_word_embeddings") or False,
            attention_bias=model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            quantization=quantization,
            quantization_config=quant_config,
            num_labels=num_labels,
            labels=labels,
            sliding_window=window,
            layer_types=layer_types,
            **experts,
        )
    except (ValueError, TypeError) as err:
        raise type(err)(f"{source}: {err}") from None


def _experts(raw: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from a Mixtral or Qwen3-MoE config.json ({} for a dense model).
    Mixtral names them num_local_experts / num_experts_per_tok (router_jitter_noise is training only); Qwen3-MoE
    num_experts / num_experts_per_tok / norm_topk_prob, with the experts' width in moe_intermediate_size.
    ModelConfig checks the values; here, that every layer is sparse (our decoder has one kind of MLP)."""
    if model_type == "mixtral":
        return dict(num_local_experts=raw.get("num_local_experts", 0),
                    num_experts_per_tok=raw.get("num_experts_per_tok", 2))
    if model_type != "qwen3_moe":
        return {}
    dense_layers = raw.get("mlp_only_layers") or []
    step = raw.get("decoder_sparse_step", 1)
    if dense_layers or step != 1:
        raise ValueError(f"{source}: qwen3_moe with dense MLP layers (mlp_only_layers={dense_layers!r}, "
                         f"decoder_sparse_step={step!r}) is not supported: minillm needs every layer sparse "
                         f"(mlp_only_layers [] and decoder_sparse_step 1)")
    experts = raw.get("num_experts", raw.get("num_local_experts"))  # transformers 5 writes the second name
    width = raw.get("moe_intermediate_size")
    missing = [name for name, value in (("num_experts", experts), ("moe_intermediate_size", width)) if value is None]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)} (a qwen3_moe config.json has them)")
    return dict(num_local_experts=experts, num_experts_per_tok=raw.get("num_experts_per_tok", 8),
                norm_topk_prob=raw.get("norm_topk_prob", False), intermediate_size=width)


def _classifier(raw: dict[str, Any], source: str) -> tuple[int, list[str] | None]:
    """(num_labels, label names) of a *ForSequenceClassification checkpoint (LlamaForSequenceClassification,
    Qwen3ForSequenceClassification, ...: a reward model or classifier), (0, None) for a generative one. The labels
    come from id2label, whose keys must be "0" .. "n-1"; without it, transformers' num_labels (default 2)."""
    architectures = raw.get("architectures") or []
    if not isinstance(architectures, list) or not any(isinstance(a, str) and a.endswith("ForSequenceClassification")
                                                      for a in architectures):
        return 0, None
    id2label = raw.get("id2label")
    if id2label is None:
        return raw.get("num_labels", 2), None  # (ModelConfig checks the number)
    if not isinstance(id2label, dict) or not id2label or set(id2label) != {str(i) for i in range(len(id2label))}:
        raise ValueError(f"{source}: id2label must map every label index \"0\" .. \"n-1\" to its name, got "
                         f"{id2label!r}")
    labels = [id2label[str(i)] for i in range(len(id2label))]  # (ModelConfig checks that they are strings)
    if raw.get("num_labels", len(labels)) != len(labels):
        raise ValueError(f"{source}: num_labels={raw['num_labels']!r} but id2label names {len(labels)} labels")
    return len(labels), labels


def _quantization(raw: dict[str, Any], source: str) -> tuple[str | None, dict[str, Any] | None]:
    """(method name, its config dict) from config.json's `quantization_config` (transformers writes it there;
    AutoGPTQ-era checkpoints keep it in quantize_config.json, which load_hf_model merges in first)."""
    quant_config = raw.get("quantization_config")
    if quant_config is None:
        return None, None
    if not isinstance(quant_config, dict):
        raise ValueError(f"{source}: quantization_config must be an object, got {quant_config!r}")
    method = quant_config.get("quant_method")
    if not isinstance(method, str):
        raise ValueError(f"{source}: quantization_config has no quant_method string (got {method!r})")
    if method == "fp8" and quant_config.get("weight_block_size") is not None:
        # DeepSeek-V3's and Qwen3-FP8's spelling of block-wise fp8 (vLLM's fp8 with block scales): tiles of
        # weight_block_size, each with its `weight_scale_inv` (minillm/quant/fp8_block.py)
        if quant_config.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"{source}: fp8 weights in format {quant_config['fmt']!r}; minillm reads e4m3 only")
        method, quant_config = "fp8_block", {**quant_config, "quant_method": "fp8_block"}
    try:
        check_quantization_name(method)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return method, dict(quant_config)


def _safe_open(file: str):
    """safe_open for reading, its errors naming the file (safetensors' own errors name none: a truncated download
    read as a bare "Error while deserializing header")."""
    try:
        return safe_open(file, framework="pt")
    except Exception as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from None


def _weight_files(directory: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the shard index when there is one."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map: dict[str, str] = read_json(index)["weight_map"]
        missing = sorted({shard for shard in weight_map.values() if not os.path.isfile(os.path.join(directory, shard))})
        if missing:
            raise FileNotFoundError(f"{index} lists shard {missing[0]} but it is not in {directory}")
        return {name: os.path.join(directory, shard) for name, shard in weight_map.items()}
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (minillm does not read .bin/.pt checkpoints)")
    names: dict[str, str] = {}
    for file in files:
        with _safe_open(file) as f:
            names.update({name: file for name in f.keys()})
    return names


def read_hf_config(directory: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of an HF model directory, from its config.json (and AutoGPTQ's quantize_config.json):
    no weights are opened."""
    directory = os.fspath(directory)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory}: no config.json; expected an HF model directory "
                                f"(config.json + *.safetensors) or a .gguf file")
    raw = read_json(config_path)
    quantize_config = os.path.join(directory, "quantize_config.json")
    if isinstance(raw, dict) and "quantization_config" not in raw and os.path.isfile(quantize_config):
        extra = read_json(quantize_config)  # AutoGPTQ's file: GPTQ unless it says otherwise
        if not isinstance(extra, dict):
            raise ValueError(f"{quantize_config}: expected a JSON object, got {type(extra).__name__}")
        raw = {**raw, "quantization_config": {"quant_method": "gptq", **extra}}
    return config_from_hf(raw, source=config_path)


def load_hf_model(directory: str | os.PathLike) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]]]:
    """(config, lazy stream of (hf_name, tensor)) for an HF model directory; shapes are checked up front."""
    directory = os.fspath(directory)
    config = read_hf_config(directory)
    files = _weight_files(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with _safe_open(file) as f:
            for name in f.keys():
                if files.get(name) == file:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    unused = check_weight_shapes(shapes, config, directory)
    unexpected = [n for n in unused if not n.endswith(_IGNORED_SUFFIXES)
                  and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if unexpected:
        warnings.warn(f"{directory}: ignoring {len(unexpected)} tensor(s) the model does not use, "
                      f"e.g. {unexpected[0]}", stacklevel=2)
    skipped = set(unused)
    wanted = [name for name in shapes if name not in skipped]

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        by_file: dict[str, list[str]] = {}
        for name in wanted:
            by_file.setdefault(files[name], []).append(name)
        for file, names in by_file.items():  # one open per shard
            with _safe_open(file) as f:
                for name in names:
                    yield name, f.get_tensor(name)

    return config, weights()
