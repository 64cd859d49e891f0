"""Loading models and tokenizers: GGUF files (our own reader) and HF safetensors directories (chapter 1).

    config, weights, tokenizer = load_model(None)           # the bundled SmolLM2-135M-Instruct Q4_1
    config, weights, tokenizer = load_model("model.gguf")   # llama/qwen2/qwen3 (F32/F16/BF16, Q4_0..Q8_0, Q4_K..Q6_K)
    config, weights, tokenizer = load_model("Llama-3-8B/")  # an HF directory: config.json + *.safetensors
    model.load_weights(weights)                               # (hf_name, tensor) pairs, HF Llama names
    config = read_model_config(path)                          # the config alone (no weights): checks before loading
    config, tokenizer = load_config_and_tokenizer(path)       # no weights read or needed (load_format="dummy")
    tokenizer = load_tokenizer(path)                          # an HF directory's or a GGUF file's tokenizer alone

`weights` is a lazy iterator: each tensor is read (and dequantized) when the model asks for it.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch

from minillm.config import ModelConfig
from minillm.loader.gguf import GGUFError, GGUFFile, TensorInfo
from minillm.loader.gguf_model import config_from_gguf, gguf_to_hf_name, load_gguf_model, unpermute_rotary
from minillm.loader.hf import config_from_hf, load_hf_model, read_hf_config
from minillm.loader.model_files import default_model_path, expected_weight_shapes
from minillm.loader.no_tokenizer import NoTokenizer
from minillm.loader.tokenizer import Tokenizer

__all__ = [
    "load_model", "read_model_config", "load_config_and_tokenizer", "load_tokenizer", "load_gguf_model",
    "load_hf_model", "default_model_path", "Tokenizer", "NoTokenizer",
    "GGUFFile", "GGUFError", "TensorInfo", "config_from_gguf", "config_from_hf", "expected_weight_shapes",
    "gguf_to_hf_name", "unpermute_rotary",
]


def load_model(
    path: str | os.PathLike | None = None, with_tokenizer: bool = True,
) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor]], Tokenizer | NoTokenizer]:
    """(config, weights iterator, tokenizer) for a .gguf file, an HF model directory, or None (the bundled SmolLM2).
    with_tokenizer=False: a NoTokenizer, the tokenizer's files not read (LLM(skip_tokenizer_init=True))."""
    path, is_dir = _model_path(path)
    if is_dir:
        config, weights = load_hf_model(path)
        return config, weights, _read_tokenizer(path, with_tokenizer)
    gguf = GGUFFile(path)  # parsed once, shared by the weights and the tokenizer
    config, weights = load_gguf_model(gguf)
    return config, weights, _read_tokenizer(gguf, with_tokenizer)


def load_config_and_tokenizer(path: str | os.PathLike | None = None,
                              with_tokenizer: bool = True) -> tuple[ModelConfig, Tokenizer | NoTokenizer]:
    """(config, tokenizer) of a model without its weights: an HF directory may hold only config.json and its
    tokenizer files (LLM(load_format="dummy") draws random weights of the config's shapes)."""
    path, is_dir = _model_path(path)
    if is_dir:
        return read_hf_config(path), _read_tokenizer(path, with_tokenizer)
    gguf = GGUFFile(path)
    return config_from_gguf(gguf), _read_tokenizer(gguf, with_tokenizer)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer alone, from an HF directory (tokenizer.json and its config) or a .gguf file's metadata: a
    model's tokenizer taken from elsewhere (LLM(..., tokenizer=path), vLLM's option; e.g. a GGUF model with its
    original HF tokenizer)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"tokenizer must be a path (an HF directory with tokenizer.json, or a .gguf file), got "
                        f"{type(path).__name__}: {path!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer={path!r}: no such file or directory; pass an HF directory with "
                                f"tokenizer.json or a .gguf file")
    return _read_tokenizer(path)


def _read_tokenizer(source: str | GGUFFile, with_tokenizer: bool = True) -> Tokenizer | NoTokenizer:
    """An HF directory's tokenizer, or a GGUF file's (a path or an opened GGUFFile); a NoTokenizer when not wanted."""
    if not with_tokenizer:
        return NoTokenizer()
    if isinstance(source, str) and os.path.isdir(source):
        return Tokenizer.from_hf_dir(source)
    return Tokenizer.from_gguf(source)


def read_model_config(path: str | os.PathLike | None = None) -> ModelConfig:
    """The ModelConfig load_model would return, without its weights or tokenizer: an HF directory's config.json,
    a GGUF file's metadata (a memory map; the bundled model's in about 0.1 s). For checks made before loading,
    e.g. a prompt length against the model's context."""
    path, is_dir = _model_path(path)
    return read_hf_config(path) if is_dir else config_from_gguf(GGUFFile(path))


def _model_path(path: str | os.PathLike | None) -> tuple[str, bool]:
    """(the path, whether it is an HF directory) of a model, or FileNotFoundError saying what may be given."""
    path = default_model_path() if path is None else os.fspath(path)
    if os.path.isdir(path):
        return path, True
    if path.endswith(".gguf") or os.path.isfile(path):
        return path, False
    raise FileNotFoundError(f"{path}: no such file or directory; pass a .gguf file, an HF model directory "
                            f"(config.json + *.safetensors), or None for the bundled SmolLM2-135M-Instruct")
