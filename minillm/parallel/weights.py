"""What one rank of a parallel worker group holds: its share of the model's geometry and of random weights (chapter 11).

`rank_model_config` is the ModelConfig *as this rank sees it* for its KV cache: only its pipeline stage's layers
and only its K/V heads (one when they are replicated). The worker sizes and allocates its KV pool from it, so each
rank's pool is sized from its own memory and holds only what its attention layers read.

`load_random_weights_sharded` gives a parallel model exactly the numbers that `RandomWeights` gives the
single-process model: it draws every full tensor in the single-process order (so the generator advances the same
way) and hands each to the layer's weight_loader, which keeps this rank's slice, as a checkpoint load would.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.layers.linear import default_weight_loader
from minillm.parallel.pipeline import get_pp_indices
from minillm.parallel.state import check_parallel_sizes, get_parallel_state, single_rank
from minillm.parallel.tensor import divide


def check_parallel_config(model_config: ModelConfig, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """Raise ValueError, before any process starts, for sizes the model cannot be split by (the rules of
    minillm.parallel.tensor and .pipeline, checked on the whole config)."""
    check_parallel_sizes(tensor_parallel_size, pipeline_parallel_size)
    tp, heads, kv = tensor_parallel_size, model_config.num_attention_heads, model_config.num_key_value_heads
    for what, size in (("num_attention_heads", heads), ("intermediate_size", model_config.intermediate_size)):
        divide(size, tp, what)
    if kv >= tp:
        divide(kv, tp, "num_key_value_heads")
    elif tp % kv:
        raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of num_key_value_heads ({kv}) when it "
                         f"exceeds it (each K/V head is then replicated)")
    get_pp_indices(model_config.num_hidden_layers, 0, pipeline_parallel_size)


def rank_model_config(model_config: ModelConfig) -> ModelConfig:
    """This rank's layers and K/V heads (the config itself without parallelism)."""
    state = get_parallel_state()
    if state.tp_size == 1 and state.pp_size == 1:
        return model_config
    start, end = get_pp_indices(model_config.num_hidden_layers, state.pp_rank, state.pp_size)
    return model_config.layers(
        start, end, head_dim=model_config.head_dim,
        num_attention_heads=model_config.num_attention_heads // state.tp_size,
        num_key_value_heads=max(1, model_config.num_key_value_heads // state.tp_size))


def load_random_weights_sharded(model: nn.Module, model_config: ModelConfig, dtype: torch.dtype,
                                draw: Callable[[str, tuple[int, ...]], torch.Tensor]) -> None:
    """Fill this rank's `model` from `draw(name, full_shape)`, called for every parameter of the whole model."""
    from minillm.models import new_model
    with single_rank():  # the whole model's names, shapes and packing, on the meta device: no memory
        full = new_model(model_config, "meta", dtype)
    local = dict(model.named_parameters())
    full_modules = dict(full.named_modules())
    for name, full_param in full.named_parameters():
        values = draw(name, tuple(full_param.shape))
        if name not in local:  # on another pipeline stage (drawn anyway: the generator must advance)
            continue
        param = local[name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        owner = full_modules[name.rpartition(".")[0]]
        shard_ids = getattr(owner, "shard_ids", ())
        if not shard_ids:
            loader(param, values.to(param.dtype), None)
            continue
        dim = getattr(full_param, "output_dim", 0)
        for shard_id in shard_ids:  # a packed layer: hand over q, k, v (gate, up) as the checkpoint would
            offset, size = owner.shard_slice(shard_id)
            loader(param, values.narrow(dim, offset, size).to(param.dtype), shard_id)
