"""Loading models and tokenizers: GGUF files (our own reader) and HF safetensors directories (chapter 1).

    config, weights, tokenizer = load_model(None)           # the bundled SmolLM2-135M-Instruct Q4_1
    config, weights, tokenizer = load_model("model.gguf")   # a llama/qwen2 GGUF (F32/F16/BF16, Q4_0..Q8_0, Q4_K..Q6_K)
    config, weights, tokenizer = load_model("Llama-3-8B/")  # an HF directory: config.json + *.safetensors
    model.load_weights(weights)                               # (hf_name, tensor) pairs, HF Llama names

`weights` is a lazy iterator: each tensor is read (and dequantized) when the model asks for it.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from minillm.config import ModelConfig
from minillm.loader.gguf import GGUFError, GGUFFile, TensorInfo
from minillm.loader.gguf_model import config_from_gguf, gguf_to_hf_name, load_gguf_model, unpermute_rotary
from minillm.loader.hf import config_from_hf, load_hf_model
from minillm.loader.model_files import default_model_path, expected_weight_shapes
from minillm.loader.tokenizer import Tokenizer

__all__ = [
    "load_model", "load_gguf_model", "load_hf_model", "default_model_path", "Tokenizer", "GGUFFile", "GGUFError",
    "TensorInfo", "config_from_gguf", "config_from_hf", "expected_weight_shapes", "gguf_to_hf_name",
    "unpermute_rotary",
]


def load_model(
    path: str | os.PathLike | None = None,
) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]], Tokenizer]:
    """(config, weights iterator, tokenizer) for a .gguf file, an HF model directory, or None (the bundled SmolLM2)."""
    path = default_model_path() if path is None else os.fspath(path)
    if os.path.isdir(path):
        config, weights = load_hf_model(path)
        return config, weights, Tokenizer.from_hf_dir(path)
    if path.endswith(".gguf") or os.path.isfile(path):
        gguf = GGUFFile(path)  # parsed once, shared by the weights and the tokenizer
        config, weights = load_gguf_model(gguf)
        return config, weights, Tokenizer.from_gguf(gguf)
    raise FileNotFoundError(f"{path}: no such file or directory; pass a .gguf file, an HF model directory "
                            f"(config.json + *.safetensors), or None for the bundled SmolLM2-135M-Instruct")
