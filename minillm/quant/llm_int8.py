"""LLM.int8() ("int8"): int8 matmul with mixed-precision outlier decomposition (Dettmers et al. 2022), chapters 7-8.

Past ~6.7B parameters, transformers grow *emergent outlier features*: a few hidden dimensions where |x| reaches
20-60 in most tokens. Per-token int8 quantization of x then fails (the outlier sets the scale; everything else
rounds to a few levels) and the model's perplexity collapses. LLM.int8 splits the product by input column:

    O = { j : max_t |x_tj| > threshold }   (threshold 6.0; the columns of this batch that hold an outlier)
    y = x[:, O] W[:, O]^T                   in floating point (a handful of columns: ~0.1% of the FLOPs)
      + int8(x[:, ~O]) int8(W[:, ~O])^T     int8 x int8 -> int32, per-token x scales, per-row W scales

The weights are stored once in int8 per output row (half of fp16's memory); the outlier columns of W are
dequantized from that int8 copy (as bitsandbytes does), so no fp16 copy is kept. Which columns are outliers is
decided per forward from the batch, so the method needs no calibration: `LLM(model, quantization="int8")`
quantizes a dense checkpoint at load time. Checkpoints (`"quant_method": "int8"`, `"llm_int8_threshold"`, Hugging
Face's field name) store `weight` int8 [out, in] and `weight_scale` fp32 [out].
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.quant.base import (LinearMethod, SkipListQuantizationConfig, add_bias, add_parameter,
                                parse_modules_to_not_convert)
from minillm.quant.int8_rtn import whole_row_int8
from minillm.quant.smoothquant import int8_linear


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mask [k] of the input columns where some token has |x| > threshold."""
    return x.reshape(-1, x.shape[-1]).abs().amax(dim=0) > threshold


def llm_int8_linear(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, threshold: float,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) with W = qweight * weight_scale[:, None]: outlier columns in x's dtype, the rest int8.

    The reference masks instead of gathering: x with the outlier columns zeroed goes through int8 (a zero column
    changes neither a token's scale nor the sum), x with only those columns through a float matmul. Same result
    as cutting the columns out, with shapes that do not depend on the data (no device sync: CUDA graphs can
    capture it); a kernel would gather the few outlier columns instead of multiplying zeros."""
    outliers = outlier_columns(x, threshold).to(x.dtype)
    y = int8_linear(x * (1 - outliers), qweight, weight_scale, bias)
    w = qweight.to(x.dtype) * weight_scale.to(x.dtype)[:, None]
    return y + (x * outliers) @ w.T


class LLMInt8LinearMethod(LinearMethod):
    def __init__(self, serialized: bool, threshold: float) -> None:
        self.serialized, self.threshold = serialized, threshold

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype | None) -> None:
        if self.serialized:
            add_parameter(layer, "weight", torch.zeros(output_size, input_size, dtype=torch.int8))
            add_parameter(layer, "weight_scale", torch.ones(output_size, dtype=torch.float32))
        else:
            add_parameter(layer, "weight", torch.empty(output_size, input_size, dtype=dtype))
        add_bias(layer, output_size, bias, dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.dtype == torch.int8:
            return
        q, scale = whole_row_int8(layer, layer.weight.data)
        del layer._parameters["weight"]
        add_parameter(layer, "weight", q, output_dim=None)
        add_parameter(layer, "weight_scale", scale, output_dim=None)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.weight.dtype != torch.int8:
            raise RuntimeError("int8 layer has not been processed yet: load_weights calls "
                               "process_weights_after_loading")
        return llm_int8_linear(x, layer.weight, layer.weight_scale, self.threshold, bias)


class LLMInt8Config(SkipListQuantizationConfig):
    name = "int8"

    def __init__(self, serialized: bool, threshold: float = 6.0, modules_to_not_convert: tuple[str, ...] = ()) -> None:
        self.serialized, self.threshold, self.modules_to_not_convert = serialized, threshold, modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LLMInt8Config":
        threshold = config.get("llm_int8_threshold", 6.0)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"int8: llm_int8_threshold must be a number > 0, got {threshold!r}")
        return cls(config.get("quant_method") == "int8", float(threshold), parse_modules_to_not_convert(config, "int8"))

    def make_method(self) -> LinearMethod:
        return LLMInt8LinearMethod(self.serialized, self.threshold)

    def stored_shapes(self, output_size: int, input_size: int) -> dict[str, tuple[int, ...]] | None:
        return {"weight": (output_size, input_size), "weight_scale": (output_size,)}
