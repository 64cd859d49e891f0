"""FP8 W8A8 ("fp8", vLLM's name): e4m3 weights with scales, activations quantized per token at run time (chapters 7-8).

float8 e4m3 has 4 exponent bits and 3 mantissa bits: 8 relative steps per power of two between 2^-6 and 448
(the largest finite value; e4m3fn has no infinity). A *float* grid suits weights and activations better than an
integer one of the same 8 bits: the relative error is the same (~3%) for a small value and a large one, so
an outlier no longer costs every other value its resolution, only the scale has to keep the largest value
below 448:

    weights      s_w = max|W| / 448 per tensor or per output channel, W8 = fp8(W / s_w)      (once, at load)
    activations  s_x = max|x_t| / 448 per token, x8 = fp8(x_t / s_x)                          (every forward)
    y            = (x8 @ W8^T) * s_x * s_w^T, the products and sums in fp32

On an H100/H200 the product runs on the fp8 tensor cores (twice bf16's FLOP/s): `fp8_linear`, the single call
site, runs minillm.kernels.fp8_gemm's two Triton kernels there (per-token quantization, then the scaled GEMM);
a decode step of one row (up to four on small matrices) leaves x in bf16 and runs the decode GEMV on the e4m3
codes instead (W8A16: the weight read is the cost, and quantizing x would add a launch per layer).
Elsewhere it is emulated exactly: both operands are rounded to e4m3 with torch's float8_e4m3fn dtype and the
matmul runs in fp32 on the dequantized values; the GPU sums the same products in another order. While a learner's
`ch07.fp8_scale` is plugged in (course overrides), the emulation runs on the GPU too, so their function is used.

Checkpoints (`"quant_method": "fp8"`, `"activation_scheme": "dynamic"`): `weight` float8_e4m3fn [out, in] and
`weight_scale` fp32 [out] (one per output channel; a per-tensor scale is stored repeated on every row, so q/k/v
shards still load into their rows). `LLM(model, quantization="fp8")` quantizes a dense checkpoint at load time.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.hooks import active_overrides, dispatch
from minillm.layers.gemv_dispatch import quantized_gemv_applies, w8a8_gemv_max_m
from minillm.quant.base import (LinearMethod, SkipListQuantizationConfig, add_bias, add_parameter,
                                parse_modules_to_not_convert, whole_weight_amax)

FP8_DTYPE = torch.float8_e4m3fn


# >>> exercise ch07.fp8_scale
def scaled_fp8_quant(x: torch.Tensor, amax: torch.Tensor,
                     fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 in `fp8_dtype`, scale fp32) with x ~= x8 * scale: scale = amax / fp8_max, saturating what lies beyond.

    x [..., k] any float tensor; amax: the range to map onto the format's largest finite value fp8_max
    (torch.finfo(fp8_dtype).max: 448 for e4m3fn, 57344 for e5m2), broadcastable against x, e.g. [rows, 1].
    It may come from calibration rather than from x itself (a static activation scale), so some |x| / scale
    can exceed fp8_max: clamp them to +-fp8_max before the cast (saturation), since e5m2 would make them inf
    and older torch versions turn e4m3fn's overflow into nan. scale has amax's shape, at least
    torch.finfo(torch.float32).tiny (amax = 0 gives x8 = 0, not nan). Compute in fp32.
    """
    # >>> solution
    fp8_max = torch.finfo(fp8_dtype).max
    scale = (amax.float() / fp8_max).clamp(min=torch.finfo(torch.float32).tiny)
    return (x.float() / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype), scale
    # <<< solution
# <<< exercise


def quantize_fp8(w: torch.Tensor, per_channel: bool = True,
                 layer: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W8 float8_e4m3fn [out, in], scale fp32 [out]) with W ~= W8 * scale[:, None]; per-tensor repeats one scale.
    `layer`: the tensor-parallel layer `w` is a rank's piece of, whose whole weight's range sets the scales
    (base.whole_weight_amax)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating [out, in] tensor, got {getattr(w, 'shape', type(w).__name__)}")
    w = w.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    if layer is not None:
        amax = whole_weight_amax(layer, amax, per_channel)
    amax = amax if per_channel else amax.expand(w.shape[0])
    # the division can land a hair above 448 after rounding: the clamp inside keeps it finite
    w8, scale = dispatch("ch07.fp8_scale", scaled_fp8_quant)(w, amax[:, None], FP8_DTYPE)
    return w8, scale.reshape(-1).contiguous()


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: (x8 float8_e4m3fn [..., k], scale fp32 [..., 1]), one scale per token."""
    x = x.float()
    return dispatch("ch07.fp8_scale", scaled_fp8_quant)(x, x.abs().amax(dim=-1, keepdim=True), FP8_DTYPE)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1]): minillm.kernels.fp8_gemm's one-launch kernel on CUDA, else
    (and while a learner's ch07.fp8_scale is plugged in, so that their function is used) quantize_fp8_per_token."""
    if x.is_cuda and "ch07.fp8_scale" not in active_overrides():
        from minillm.kernels.fp8_gemm import per_token_quant_fp8
        return per_token_quant_fp8(x)
    return quantize_fp8_per_token(x)


def fp8_gemv_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether fp8_linear runs the weight-only GEMV on x: a CUDA decode step of at most w8a8_gemv_max_m(weight) rows,
    unless a learner's ch07.fp8_scale is plugged in (then the emulation runs, so that their function is used)."""
    return quantized_gemv_applies(x, w8a8_gemv_max_m(weight)) and "ch07.fp8_scale" not in active_overrides()


def _row_scales(weight_scale: torch.Tensor, rows: int) -> torch.Tensor:
    """One scale per output row (a per-tensor scale repeated), contiguous, as the GEMV reads them."""
    return (weight_scale if weight_scale.numel() == rows else weight_scale.expand(rows)).contiguous()


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) with e4m3 weights: THE call site of the fp8 GEMM (on CUDA: minillm.kernels.fp8_gemm).

    W8A8 as vLLM runs it: per-token e4m3 activations, the GEMM on the fp8 values, both scales applied after
    (the reference on the CPU: an fp32 matmul of the exact fp8 values). A decode step of few rows on CUDA
    (gemv_dispatch.w8a8_gemv_max_m) leaves the activations in bf16 (W8A16): the product is bound by reading the
    weight, one byte per weight either way, so quantizing x would only add a launch per layer (14% of a decode
    step's GPU time on SmolLM2) and an error; minillm.kernels.gemv converts the codes in registers."""
    if fp8_gemv_applies(x, weight):
        from minillm.kernels.gemv import gemv
        return gemv(x, weight, bias, weight_scale=_row_scales(weight_scale, weight.shape[0]))
    x8, x_scale = per_token_fp8(x)  # [M, K] e4m3, [M, 1]
    if x8.is_cuda and "ch07.fp8_scale" not in active_overrides():
        from minillm.kernels.fp8_gemm import fp8_gemm
        y = fp8_gemm(x8, weight, x_scale, weight_scale, bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    y = (x8.float() @ weight.float().T) * x_scale * weight_scale.float()
    y = y.to(x.dtype)
    return y if bias is None else y + bias


class Fp8LinearMethod(LinearMethod):
    expert_operands = ("weight", "weight_scale")  # e4m3 codes, one scale per row (a per-tensor one repeated)
    expert_activations_fp8 = True

    def __init__(self, serialized: bool, per_channel: bool) -> None:
        self.serialized, self.per_channel = serialized, per_channel

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype | None) -> None:
        if self.serialized:
            add_parameter(layer, "weight", torch.zeros(output_size, input_size, dtype=FP8_DTYPE))
            add_parameter(layer, "weight_scale", torch.ones(output_size, dtype=torch.float32))
        else:  # a dense staging weight, rounded to fp8 once loaded
            add_parameter(layer, "weight", torch.empty(output_size, input_size, dtype=dtype))
        add_bias(layer, output_size, bias, dtype)

    SCALE_NAME = "weight_scale"  # the checkpoint's name of the weight's scales (fp8_block: weight_scale_inv)

    def quantize_weight(self, weight: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's dense weight -> (e4m3 weight, its scales): the one step subclasses with other scale shapes
        change."""
        return quantize_fp8(weight, self.per_channel, layer)

    def linear(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, layer.weight, layer.weight_scale, bias)

    def decode_codes(self, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp8_linear's decode GEMV (the same rule), for Linear's fused RMSNorm / SwiGLU."""
        if layer.weight.dtype != FP8_DTYPE or not fp8_gemv_applies(x, layer.weight):
            return None
        return layer.weight, _row_scales(layer.weight_scale, layer.weight.shape[0])

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.dtype == FP8_DTYPE:
            return
        w8, scale = self.quantize_weight(layer.weight.data, layer)
        del layer._parameters["weight"]
        add_parameter(layer, "weight", w8, output_dim=None)
        add_parameter(layer, self.SCALE_NAME, scale, output_dim=None)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.weight.dtype != FP8_DTYPE:
            raise RuntimeError(f"{type(self).__name__} layer has not been processed yet: load_weights calls "
                               "process_weights_after_loading")
        return self.linear(layer, x, bias)


class Fp8Config(SkipListQuantizationConfig):
    """fp8 W8A8: a serialized fp8 checkpoint, or a dense one quantized at load time (weight_granularity:
    "channel", the default, or "tensor", vLLM's on-the-fly choice)."""

    name = "fp8"
    fused_experts = True

    def __init__(self, serialized: bool, per_channel: bool, modules_to_not_convert: tuple[str, ...] = ()) -> None:
        self.serialized, self.per_channel, self.modules_to_not_convert = serialized, per_channel, modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Fp8Config":
        scheme = config.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"fp8: activation_scheme must be 'dynamic' (per-token scales at run time), got {scheme!r}")
        granularity = config.get("weight_granularity", "channel")
        if granularity not in ("channel", "tensor"):
            raise ValueError(f"fp8: weight_granularity must be 'channel' or 'tensor', got {granularity!r}")
        return cls(config.get("quant_method") == "fp8", granularity == "channel",
                   parse_modules_to_not_convert(config, "fp8"))

    def make_method(self) -> LinearMethod:
        return Fp8LinearMethod(self.serialized, self.per_channel)

    def stored_shapes(self, output_size: int, input_size: int) -> dict[str, tuple[int, ...]] | None:
        return {"weight": (output_size, input_size), "weight_scale": (output_size,)}
