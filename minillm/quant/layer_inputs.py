"""Real activations for chapters 7-8: what one decoder layer's linears see on real text, from a truncated model.

SmoothQuant, GPTQ and AWQ all start from the inputs X of a linear layer on calibration text: max|X_j| per
channel, the Hessian X^T X, mean|X_j|. A notebook on a laptop CPU cannot afford the whole model for that, and does
not need it: the inputs of layer L depend only on the embedding and layers 0..L-1. `first_layers` builds the
model with only its first `num_layers` decoder layers (the weights of the others are skipped after reading), and
`linear_inputs` runs calibration sequences through them (cache-less prefill, minillm.quant.driver.LayerRunner)
and returns what flows into each linear of the last one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.quant.calibration import calibration_texts, tokenize_to_sequences

__all__ = ["first_layers", "linear_inputs"]


def first_layers(num_layers: int, path: str | None = None, device: str = "cpu") -> tuple[nn.Module, Any]:
    """(model with decoder layers 0..num_layers-1 only, fp32; its tokenizer) from a checkpoint (None: SmolLM2)."""
    from minillm.engine.worker import build_model  # the engine builds the model (local: quant sits beside it)
    from minillm.loader import load_model
    from minillm.loader.hf_overrides import first_layers as layer_weights  # the others' tensors read and dropped
    config, weights, tokenizer = load_model(path)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= config.num_hidden_layers:
        raise ValueError(f"num_layers must be an int in [1, {config.num_hidden_layers}], got {num_layers!r}")
    config = config.layers(0, num_layers)
    return build_model(config, layer_weights(weights, num_layers), torch.device(device), torch.float32), tokenizer


def linear_inputs(model: nn.Module, tokenizer: Any, n_samples: int = 8, seq_len: int = 128,
                  split: str = "calibration") -> dict[str, torch.Tensor]:
    """Inputs [n_samples * seq_len, in] of the LAST layer's linears ("qkv_proj", "o_proj", "gate_up_proj",
    "down_proj") on `n_samples` sequences of `seq_len` tokens of the standard library's docstrings (`split`:
    "calibration" or "held_out", disjoint)."""
    from minillm.quant.driver import LayerRunner  # the driver imports the engine's forward context
    ids = tokenize_to_sequences(calibration_texts(split), tokenizer, n_samples, seq_len)
    runner = LayerRunner(model, ids, batch_size=n_samples)
    layers = model.model.layers
    for layer in layers[:-1]:
        runner.run(layer, advance=True)  # the next layer's inputs
    last = layers[-1]
    linears = {"qkv_proj": last.self_attn.qkv_proj, "o_proj": last.self_attn.o_proj,
               "gate_up_proj": last.mlp.gate_up_proj, "down_proj": last.mlp.down_proj}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    runner.run(last, {lin: seen[name].append for name, lin in linears.items()})
    return {name: torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).float() for name, chunks in seen.items()}
