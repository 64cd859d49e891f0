"""Choosing the FP8 KV cache's scales: one calibration forward at start-up (chapter 5, `kv_cache_dtype="fp8"`).

Each layer's keys and values are stored as x / scale in float8_e4m3fn (minillm.layers.kv_quant); the scale has
to put the largest values below 448 (beyond it they saturate) and leave the bulk above 2^-6 (below it they go
subnormal and lose precision). Because e4m3 is a floating-point format, everything between those two bounds has
the same relative precision: the scale need not be tight, only safe. The options, and why this one:

* scale 1.0 (vLLM's default without a calibrated checkpoint): free, and right for many models (SmolLM2's keys
  stay below 25), but nothing guarantees it: a model with larger activations saturates, one with tiny
  values (random tests, some small models) sinks into subnormals.
* amax of the first prefill / 448 (vLLM's calculate_kv_scales): adapts to the model, but the scales then depend
  on which request happened to come first, so the same prompt can give different outputs in two runs; and a
  short first prompt underestimates the range.
* static calibration (this module): before the first request, one cache-less forward over `num_tokens`
  pseudo-random token ids (seeded: identical every start, independent of the requests); per layer and kv head,
  scale = amax * HEADROOM / 448. Measured on SmolLM2-135M, the amax over 8 x 256 held-out tokens of real text is
  at most 1.64x (keys) and 2.04x (values) the amax over 256 random ids, so HEADROOM = 4 keeps real text clear
  of saturation, and it costs nothing at the low end: values down to amax / 7000 are still normal numbers.
  Anything larger than that is clamped to +-448 by quantize_kv rather than becoming NaN.

It runs once per engine (per tensor-parallel rank, on its own kv heads), before CUDA graphs are captured; the
scales are then constants that the graphs read by address. Pipeline parallelism is refused by EngineConfig:
a later stage would need the earlier stages' activations.
"""
from __future__ import annotations

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.engine.kv_cache import KVCache
from minillm.forward_context import forward_context, prefill_metadata
from minillm.layers.kv_quant import scales_from_amax

HEADROOM = 4.0
CALIBRATION_TOKENS = 256
CALIBRATION_SEED = 0


@torch.inference_mode()
def calibrate_kv_scales(model: nn.Module, attention_layers: list[nn.Module], kv_cache: KVCache,
                        model_config: ModelConfig, num_tokens: int | None = None,
                        headroom: float = HEADROOM) -> torch.Tensor:
    """Set kv_cache.scales [2, num_layers, num_kv_heads] from one forward of `model` over `num_tokens` seeded
    random token ids (default: CALIBRATION_TOKENS, at most the model's context; see the module docstring).
    Returns the measured amax, of the same shape, for inspection."""
    vocab_size = model_config.vocab_size
    if num_tokens is None:
        num_tokens = min(CALIBRATION_TOKENS, model_config.max_position_embeddings)
    if kv_cache.scales is None:
        raise ValueError(f"calibrate_kv_scales needs an fp8 KV cache, this one stores {kv_cache.dtype}")
    if len(attention_layers) != kv_cache.num_layers:
        raise ValueError(f"{len(attention_layers)} attention layers for a cache of {kv_cache.num_layers} layers")
    if not 1 <= num_tokens <= model_config.max_position_embeddings:
        raise ValueError(f"num_tokens must be in [1, {model_config.max_position_embeddings}] (the model's context), "
                         f"got {num_tokens}")
    amax = torch.zeros_like(kv_cache.scales)

    def record(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            _, k, v = args[:3]  # Attention.forward(q, k, v): k and v as they would be stored, rotated
            amax[0, index] = torch.maximum(amax[0, index], k.detach().abs().float().amax(dim=(0, 2)))
            amax[1, index] = torch.maximum(amax[1, index], v.detach().abs().float().amax(dim=(0, 2)))
        return hook

    handles = [layer.register_forward_pre_hook(record(i)) for i, layer in enumerate(attention_layers)]
    try:
        generator = torch.Generator().manual_seed(CALIBRATION_SEED)  # on the CPU: the same ids on every device
        device = kv_cache.device
        ids = torch.randint(0, vocab_size, (num_tokens,), generator=generator).to(device)
        # no slot_mapping in the metadata: nothing is written to the cache, attention runs on the fresh k/v
        with forward_context(prefill_metadata([num_tokens], device=device)):
            model(ids, torch.arange(num_tokens, device=device))
    finally:
        for handle in handles:
            handle.remove()
    kv_cache.scales.copy_(scales_from_amax(amax, headroom))  # in place: the layers hold views of these rows
    return amax
