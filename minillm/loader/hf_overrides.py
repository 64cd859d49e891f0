"""vLLM's `hf_overrides`: change fields of a model's config before the model is built (chapter 1's loader;
chapter 5 gives the bundled model a sliding window with it).

    LLM(hf_overrides={"sliding_window": 256})            # the bundled SmolLM2 with a 256-token window in every layer
    LLM(hf_overrides={"num_hidden_layers": 4})           # its first 4 layers only (the others read and dropped)
    LLM(load_format="dummy", hf_overrides={"hidden_size": 1024, "num_attention_heads": 16})   # another shape

The keys are ModelConfig's fields (Hugging Face's config names); the new config is checked as any ModelConfig is.
With the checkpoint's weights (load_format="auto") an override must leave every weight's shape alone: a field
that changes one (hidden_size, vocab_size, the heads, ...) is refused, since the file's tensors would not fit;
with random weights (load_format="dummy") any field may change. num_hidden_layers may shrink a checkpoint: the
weights of the layers past it are read and dropped while loading (`first_layers`).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from minillm.config import ModelConfig

# fields whose value changes the shape (or the presence) of a checkpoint's tensors
SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias", "qk_norm",
                "quantization", "quantization_config", "num_local_experts", "num_labels")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def apply_hf_overrides(config: ModelConfig, overrides: Mapping[str, Any] | None,
                       random_weights: bool) -> tuple[ModelConfig, int | None]:
    """(the overridden config, the number of layers to read from the checkpoint when it was cut short, else None).
    ValueError naming the key for an unknown field, a shape change with real weights, more layers than the
    checkpoint has, or a value ModelConfig refuses."""
    if overrides is None or (isinstance(overrides, Mapping) and not overrides):
        return config, None
    if not isinstance(overrides, Mapping) or not all(isinstance(k, str) for k in overrides):
        raise TypeError(f"hf_overrides must be a mapping of ModelConfig field names to values, got "
                        f"{type(overrides).__name__}: {overrides!r}")
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"hf_overrides: unknown config field(s) {unknown}; allowed: {', '.join(fields)}")
    changes = dict(overrides)
    if not random_weights:
        reshaped = [k for k in SHAPE_FIELDS if k in changes and changes[k] != getattr(config, k)]
        if reshaped:
            raise ValueError(f"hf_overrides changes the shape of the checkpoint's weights ({', '.join(reshaped)}): "
                             f"its tensors would not fit; use load_format='dummy' for random weights of the new "
                             f"shapes")
        layers = changes.get("num_hidden_layers", config.num_hidden_layers)
        if isinstance(layers, int) and layers > config.num_hidden_layers:
            raise ValueError(f"hf_overrides num_hidden_layers={layers}: the checkpoint has only "
                             f"{config.num_hidden_layers} layers (fewer may be read; more need load_format='dummy')")
    if ("hidden_size" in changes or "num_attention_heads" in changes) and "head_dim" not in changes \
            and config.head_dim == config.hidden_size // config.num_attention_heads:
        changes["head_dim"] = None  # derived again from the new sizes
    if config.layer_types is not None and "layer_types" not in changes and "num_hidden_layers" in changes:
        changes["layer_types"] = config.layer_types[:changes["num_hidden_layers"]] \
            if isinstance(changes["num_hidden_layers"], int) else config.layer_types
    try:
        new = dataclasses.replace(config, **changes)
    except (TypeError, ValueError) as err:
        raise ValueError(f"hf_overrides {dict(overrides)!r}: {err}") from None
    cut = new.num_hidden_layers < config.num_hidden_layers and not random_weights
    return new, new.num_hidden_layers if cut else None


def first_layers(weights: Iterable[tuple[str, torch.Tensor]], num_layers: int | None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of decoder layers below num_layers and every non-layer tensor (None: all)."""
    for name, tensor in weights:
        match = _LAYER.match(name)
        if num_layers is not None and match is not None and int(match.group(1)) >= num_layers:
            continue
        yield name, tensor
