"""NF4 with double quantization ("nf4"): QLoRA's 4-bit NormalFloat (Dettmers et al. 2023), chapters 7-8.

Trained weights are roughly normally distributed, so evenly spaced levels (int4) put too many levels in the
tails and too few near zero. NormalFloat spaces the 16 levels by the quantiles of N(0, 1) instead, each level
holding about the same share of the weights, then rescales them to [-1, 1]; zero is a level exactly (padding and
pruned weights stay 0). Asymmetric halves give 8 positive and 7 negative levels plus 0:

    positive  Phi^-1(linspace(0.9677, 0.5, 9)[:-1]),  negative  -Phi^-1(linspace(0.9677, 0.5, 8)[:-1]),  0
    levels    = sorted(all 16) / max                    (0.9677 = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, QLoRA's offset)

A weight w in a block of 64 becomes the index of the level nearest to w / absmax(block), 4 bits. The absmax of
each block (fp32: 0.5 bit per weight) is itself quantized, the *double quantization*: absmax - mean(absmax)
in blocks of 256 to int8 with one fp32 scale per block, 8/64 + 32/(64*256) = 0.127 bit per weight. (bitsandbytes
quantizes these with its 8-bit dynamic-tree code; we use the linear int8 grid of rtn.quantize: same bits, simpler.)

Layout in memory: `qweight` uint8 [out, in/2] (two codes per byte, rtn.pack_int4: element 2j in the low nibble),
`absmax_q` int8 [n_blocks/256 rounded up, 256], `absmax_scale` fp32 [that many], `absmax_offset` fp32 [1].
Blocks run along each row (in must be a multiple of 64), so a row's codes and scales stay together.
Checkpoints (`"quant_method": "nf4"`) store `qweight` and the first-level `absmax` fp32 [out, in/64] per
tensor (a double-quantization block of 256 would straddle q/k/v shards); the double quantization runs at load
over the packed layer, so a model read from disk double-quantizes exactly as the in-memory one did.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.layers.gemv_dispatch import quantized_gemv_applies
from minillm.quant.base import (LinearMethod, SkipListQuantizationConfig, add_bias, add_parameter,
                                parse_modules_to_not_convert)
from minillm.quant.loading import replace_parameters
from minillm.quant.rtn import pack_int4, quantize, unpack_int4

BLOCK_SIZE = 64
DOUBLE_QUANT_BLOCK = 256
_OFFSET = 0.9677083  # QLoRA: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat4 levels, ascending, from -1 to 1 with 0 among them (fp32)."""
    ndtri = torch.special.ndtri
    positive = ndtri(torch.linspace(_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -ndtri(torch.linspace(_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (levels / levels.max()).float()


NF4_LEVELS = nf4_levels()


def quantize_nf4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [out, in] in 0..15, absmax fp32 [out, in/64]): the nearest NF4 level of w / absmax(block)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating [out, in] tensor, got {getattr(w, 'shape', type(w).__name__)}")
    out, n_in = w.shape
    if n_in % BLOCK_SIZE:
        raise ValueError(f"nf4 quantizes blocks of {BLOCK_SIZE} along each row; in_features={n_in} is not a multiple")
    blocks = w.float().reshape(out, n_in // BLOCK_SIZE, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
    levels = NF4_LEVELS.to(w.device)
    midpoints = (levels[1:] + levels[:-1]) / 2  # nearest level = how many midpoints lie below the value
    codes = torch.bucketize(blocks / absmax[..., None], midpoints)
    return codes.reshape(out, n_in).to(torch.uint8), absmax


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """absmax (any shape) -> (int8 [n/256, 256], scale fp32 [n/256], offset fp32 [1]); zero-padded to 256s."""
    flat = absmax.float().flatten()
    offset = flat.mean().reshape(1)
    pad = (-flat.numel()) % DOUBLE_QUANT_BLOCK
    centred = torch.cat([flat - offset, flat.new_zeros(pad)]).reshape(-1, DOUBLE_QUANT_BLOCK)
    qw = quantize(centred, bits=8, group_size=-1, symmetric=True)
    return qw.codes, qw.scales[:, 0].contiguous(), offset


def double_dequantize(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_offset: torch.Tensor,
                      n_blocks: int) -> torch.Tensor:
    """Inverse of double_quantize: the first `n_blocks` absmax values, fp32."""
    return (absmax_q.float() * absmax_scale[:, None] + absmax_offset).flatten()[:n_blocks]


def dequantize_nf4(qweight: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32,
                   levels: torch.Tensor | None = None) -> torch.Tensor:
    """W [out, in] from packed codes [out, in/2] and absmax [out, in/64] (levels: NF4_LEVELS on qweight's device)."""
    codes = unpack_int4(qweight).long()
    out, n_in = codes.shape
    levels = NF4_LEVELS.to(qweight.device) if levels is None else levels
    w = levels[codes].reshape(out, n_in // BLOCK_SIZE, BLOCK_SIZE) * absmax[..., None]
    return w.reshape(out, n_in).to(dtype)


def nf4_linear(x: torch.Tensor, qweight: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
               absmax_offset: torch.Tensor, levels: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for a double-quantized NF4 weight: THE call site.

    At decode on CUDA (gemv_dispatch.quantized_gemv_applies: at most 16 rows of fp16/bf16)
    minillm.kernels.nf4_gemv reads the packed 4-bit codes and decodes them in registers. Elsewhere the reference:
    dequantize the whole weight to x's dtype, then one matmul (it saves memory, not time: at decode it writes and
    re-reads a 16-bit copy of every weight)."""
    out, n_in = qweight.shape[0], qweight.shape[1] * 2
    if quantized_gemv_applies(x):
        from minillm.kernels.nf4_gemv import nf4_gemv  # Triton: imported only where it runs
        return nf4_gemv(x, qweight, absmax_q, absmax_scale, absmax_offset, levels, bias)
    absmax = double_dequantize(absmax_q, absmax_scale, absmax_offset, out * n_in // BLOCK_SIZE)
    w = dequantize_nf4(qweight, absmax.reshape(out, n_in // BLOCK_SIZE), x.dtype, levels)
    y = x @ w.T
    return y if bias is None else y + bias


class NF4LinearMethod(LinearMethod):
    def __init__(self, serialized: bool) -> None:
        self.serialized = serialized

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype | None) -> None:
        if input_size % BLOCK_SIZE:
            raise ValueError(f"nf4 needs in_features to be a multiple of {BLOCK_SIZE}, got {input_size}")
        if self.serialized:
            add_parameter(layer, "qweight", torch.zeros(output_size, input_size // 2, dtype=torch.uint8))
            add_parameter(layer, "absmax", torch.ones(output_size, input_size // BLOCK_SIZE, dtype=torch.float32))
        else:
            add_parameter(layer, "weight", torch.empty(output_size, input_size, dtype=dtype))
        add_bias(layer, output_size, bias, dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        p = layer._parameters
        if "absmax_q" in p:
            return
        if "weight" in p:
            codes, absmax = quantize_nf4(p["weight"].data)
            qweight = pack_int4(codes)
        else:
            qweight, absmax = p["qweight"].data, p["absmax"].data
        absmax_q, absmax_scale, absmax_offset = double_quantize(absmax)
        replace_parameters(layer, {"qweight": qweight, "absmax_q": absmax_q, "absmax_scale": absmax_scale,
                                   "absmax_offset": absmax_offset})  # keeps the bias
        # the 16 levels live on the layer's device: no host-to-device copy per forward (CUDA graphs forbid it)
        layer.register_buffer("nf4_levels", NF4_LEVELS.to(qweight.device), persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if "absmax_q" not in layer._parameters:
            raise RuntimeError("nf4 layer has not been processed yet: load_weights calls process_weights_after_loading")
        return nf4_linear(x, layer.qweight, layer.absmax_q, layer.absmax_scale, layer.absmax_offset,
                          layer.nf4_levels, bias)


class NF4Config(SkipListQuantizationConfig):
    name = "nf4"

    def __init__(self, serialized: bool, modules_to_not_convert: tuple[str, ...] = ()) -> None:
        self.serialized, self.modules_to_not_convert = serialized, modules_to_not_convert

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NF4Config":
        for key, want in (("blocksize", BLOCK_SIZE), ("double_quant_blocksize", DOUBLE_QUANT_BLOCK)):
            if config.get(key, want) != want:
                raise ValueError(f"nf4: {key} must be {want}, got {config.get(key)!r}")
        return cls(config.get("quant_method") == "nf4", parse_modules_to_not_convert(config, "nf4"))

    def make_method(self) -> LinearMethod:
        return NF4LinearMethod(self.serialized)

    def stored_shapes(self, output_size: int, input_size: int) -> dict[str, tuple[int, ...]] | None:
        return {"qweight": (output_size, input_size // 2), "absmax": (output_size, input_size // BLOCK_SIZE)}
