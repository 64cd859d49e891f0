"""int8 round-to-nearest, weight-only (W8A16): the simplest real method behind the quantized-linear seam (chapter 7).

Each output channel (row) of W gets one scale, chosen so that its largest |weight| maps to 127:

    s_o = max_i |W[o, i]| / 127          q[o, i] = round(W[o, i] / s_o)  in [-127, 127]

so the weight costs 1 byte per element plus one scale per row (half of bf16's memory) and every weight is
off by at most s_o / 2. Activations stay in the model's dtype: y = x (q * s)^T. Dequantizing on the fly in
plain torch saves memory but no time; what makes weight-only quantization faster in the memory-bound decode
phase is a kernel that reads the int8 codes themselves: at decode on CUDA, `int8_weight_linear` runs the decode
GEMV (minillm.kernels.gemv with weight_scale), one byte per weight instead of two (chapter 7, section 8).

The checkpoint is the ordinary dense one: create_weights registers a dense *staging* weight, so both loaders
(GGUF, HF) and the packed q/k/v and gate/up shard logic work unchanged; process_weights_after_loading then
quantizes it and frees it. `LLM(model, quantization="int8_rtn")` or a config.json with
`"quantization_config": {"quant_method": "int8_rtn"}` selects it; `modules_to_not_convert` (a list of name
fragments, as in Hugging Face's configs) keeps matching layers dense.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillm.layers.gemv_dispatch import quantized_gemv_applies
from minillm.quant.base import (LinearMethod, QuantizationConfig, UnquantizedLinearMethod, add_bias,
                                add_parameter, parse_modules_to_not_convert, whole_weight_amax)
from minillm.quant.rtn import quantize


def quantize_per_channel_int8(weight: torch.Tensor,
                              amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale fp32 [out]) with weight ~= q * scale[:, None], rounding to nearest.

    rtn.quantize's symmetric 8-bit grid with one group per row: s_o = max|W[o]| / 127, codes in [-127, 127]
    (-128 is never produced, so negating a weight never overflows). `amax` [out]: the rows' max |w| where it is
    wider than this tensor's own (a row-parallel rank's columns of each row: base.whole_weight_amax), the same
    formula with that range."""
    if amax is None:
        qw = quantize(weight, bits=8, group_size=-1, symmetric=True)
        return qw.codes, qw.scales[:, 0].contiguous()
    scale = (amax.float() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.contiguous()


def whole_row_int8(layer: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_per_channel_int8 of a layer's (possibly tensor-parallel) weight with its whole rows' ranges."""
    if getattr(layer, "tp_size", 1) == 1:
        return quantize_per_channel_int8(weight)
    return quantize_per_channel_int8(weight, whole_weight_amax(layer, weight.float().abs().amax(dim=1), True))


class Int8RTNLinearMethod(LinearMethod):
    """Dense staging weight at load time; int8 `qweight` [out, in] + `weight_scale` [out] afterwards."""

    expert_operands = ("qweight", "weight_scale")  # W8A16 in kernels/fused_moe.py too

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype | None) -> None:
        add_parameter(layer, "weight", torch.empty(output_size, input_size, dtype=dtype))
        add_bias(layer, output_size, bias, dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if "weight" not in layer._parameters:  # already quantized (a second call is a no-op)
            return
        dense = layer._parameters.pop("weight")  # free the staging copy: the point is the memory
        q, scale = whole_row_int8(layer, dense.data)
        add_parameter(layer, "qweight", q)
        add_parameter(layer, "weight_scale", scale.to(dense.dtype))

    def decode_codes(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (layer.qweight, layer.weight_scale) if "qweight" in layer._parameters and \
            quantized_gemv_applies(x) else None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if "qweight" not in layer._parameters:
            raise RuntimeError(f"{type(layer).__name__} with int8_rtn has not been quantized yet: the model's "
                               f"load_weights calls process_weights_after_loading once the checkpoint is loaded")
        return int8_weight_linear(x, layer.qweight, layer.weight_scale, bias)


def int8_weight_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x (q * s)^T (+ bias) for int8 codes q [out, in] and per-row scales s [out].

    At decode on CUDA (gemv_dispatch.quantized_gemv_applies: at most 16 rows of fp16/bf16) minillm.kernels.gemv
    reads the codes themselves, one byte per weight, converting them in registers and scaling each row's sum
    once: half of bf16's bytes in the memory-bound phase. Elsewhere (the CPU, prefill) the reference: dequantize,
    then one dense matmul, which saves memory but not time (it writes and re-reads a full-precision copy)."""
    if quantized_gemv_applies(x):
        from minillm.kernels.gemv import gemv  # Triton: imported only where it runs
        return gemv(x, qweight, bias, weight_scale=scale)
    weight = qweight.to(x.dtype) * scale.to(x.dtype)[:, None]
    return F.linear(x, weight, bias)


class Int8RTNConfig(QuantizationConfig):
    """Every Linear gets int8 RTN, except those whose name contains one of `modules_to_not_convert`."""

    name = "int8_rtn"
    fused_experts = True

    def __init__(self, modules_to_not_convert: tuple[str, ...] = ()) -> None:
        self.modules_to_not_convert = tuple(modules_to_not_convert)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Int8RTNConfig":
        if not isinstance(config, dict):
            raise TypeError(f"int8_rtn quantization_config must be a dict, got {type(config).__name__}")
        bits = config.get("bits", 8)
        if bits != 8 or isinstance(bits, bool):
            raise ValueError(f"int8_rtn stores 8-bit weights; quantization_config has bits={bits!r}")
        return cls(parse_modules_to_not_convert(config, "int8_rtn"))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethod | None:
        if any(fragment in prefix for fragment in self.modules_to_not_convert):
            return UnquantizedLinearMethod()
        return Int8RTNLinearMethod()
