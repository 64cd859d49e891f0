"""Round-to-nearest (RTN) weight quantization: the integer grid every weight-only method shares (chapters 7-8).

A weight matrix W [out, in] becomes small integer *codes* q and, per group of weights, a floating *scale* s
(and for the asymmetric grid an integer *zero point* z):

    symmetric   q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)        w ~= q * s
                s = max|w| / (2^(b-1) - 1)      (signed codes; -2^(b-1) is never produced, as in int8)
    asymmetric  q = clamp(round(w / s) + z, 0, 2^b - 1)               w ~= (q - z) * s
                s = (max w - min w) / (2^b - 1),  z = round(-min w / s)   (unsigned codes)

The range [min w, max w] is widened to include 0 (as GPTQ's reference quantizer does) so z always fits in b
bits and every weight is within s/2 of its dequantized value: nothing is clipped unless a caller (AWQ's clip
search) shrinks the range on purpose.

Why group size matters. One scale per output row ("per-channel", group_size = -1) must stretch over the
row's largest weight; a single outlier makes s large and wastes most of the 2^b levels on every other weight
in the row. Giving each run of `group_size` input columns (32, 64, 128) its own scale and zero localises the
damage: an outlier only coarsens its own group. The price is memory: at 4 bits, an fp16 scale + 4-bit zero
per 128 weights adds ~0.16 bit per weight, per 32 weights ~0.6. GPTQ, AWQ and the Marlin kernels use 128.

A caveat for SmolLM2 (DESIGN.md section 3): its reference weights were dequantized from Q4_1, blocks of 32
with a float scale d and a float minimum m, values m + k d. A Q4_1-style grid (float minimum) at group 32
reproduces them exactly (measured: 0 error on a q_proj) and would make any method look perfect. Our grid
stores an *integer* zero point, as GPTQ/AWQ checkpoints and their kernels do: the step matches d but the
levels are shifted by m's fractional part, so group 32 gives an ordinary 4-bit error (8% relative on that
q_proj, against 9% at group 64). Compare methods away from the 32-grid anyway: SmolLM2's hidden size 576 is
not a multiple of 128 (576 = 9 x 64), so use group 64, per channel, or 3 bits; only down_proj (in = 1536)
takes group 128.

Packing: two 4-bit codes per uint8 or eight per int32, code k of a word in bits [4k, 4k+4) (see pack_int4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.hooks import dispatch

__all__ = ["QuantizedWeight", "check_quant_args", "compute_qparams", "search_qparams", "quantize_to_codes", "dequantize_codes",
           "quantize_per_group", "dequantize_per_group", "quantize", "dequantize", "fake_quantize",
           "pack_int4", "unpack_int4"]

SUPPORTED_BITS = range(2, 9)


@dataclass
class QuantizedWeight:
    """Codes [out, in] (int8 if symmetric else uint8), scales and zeros [out, n_groups] (zeros int32, or None
    when symmetric). `g_idx` [in] maps each input column to its group; None means column j is in group
    j // group_size (GPTQ's act-order without static groups is the one case that needs it)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    symmetric: bool
    g_idx: torch.Tensor | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, g_idx=self.g_idx).to(dtype)

    def unsigned_codes(self) -> torch.Tensor:
        """Codes in [0, 2^bits): symmetric codes offset by 2^(bits-1), the zero point GPTQ checkpoints store."""
        return self.codes.to(torch.int32) + (1 << (self.bits - 1)) if self.symmetric else self.codes.to(torch.int32)


def check_quant_args(weight: torch.Tensor, bits: int, group_size: int) -> None:
    """ValueError/TypeError naming the bad value: a 2-D floating weight, bits 2..8, group -1 or dividing in."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point torch.Tensor, got {type(weight).__name__}"
                        f"{'' if not isinstance(weight, torch.Tensor) else ' of dtype ' + str(weight.dtype)}")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty 2-D [out, in] matrix, got shape {tuple(weight.shape)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise ValueError(f"group_size must be -1 (per channel) or a positive int, got {group_size!r}")
    if group_size != -1 and weight.shape[1] % group_size:
        raise ValueError(f"in_features={weight.shape[1]} is not divisible by group_size={group_size}; "
                         f"use a group size that divides it, or -1 for per-channel scales")


def compute_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) of each row of `w` [..., k] over its last dim: (scale [...], zero [...] or None).

    The grid of quantize_per_group with one group per row (GPTQ asks for one group at a time)."""
    rows = w.reshape(-1, w.shape[-1])
    _, scale, zero = dispatch("ch07.quantize_per_group", quantize_per_group)(rows, bits, -1, symmetric)
    return scale.reshape(w.shape[:-1]), None if zero is None else zero.reshape(w.shape[:-1])


def search_qparams(w: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None = None,
                   n_grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """compute_qparams with the range searched: the grid of each row of `w` [..., k] that rounds it best.

    Min/max is rarely the best grid: one large weight stretches the step for all the others. Shrink the
    range to p * [min, max] for p = 1, 1 - 1/n_grid, ..., 1 - max_shrink and keep, per row, the p whose
    rounding error sum_j importance_j |w_j - q_j|^norm is smallest; weights outside the shrunk range clip to
    its ends. This is the reference GPTQ quantizer's `mse=True` search (grid 100, shrink 0.8, norm 2.4);
    `importance` (broadcast against w, e.g. the Hessian's diagonal H_jj = 2 E[x_j^2]) turns the weight error
    into an estimate of the output error, as HQQ and AWQ's clip search do with real activations. p = 1 is
    tried first, so the searched grid is never worse than min/max on this objective.
    """
    if not 0 <= max_shrink < 1:
        raise ValueError(f"max_shrink must be in [0, 1), got {max_shrink}")
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"n_grid must be a positive int, got {n_grid!r}")
    if norm <= 0:
        raise ValueError(f"norm must be > 0, got {norm}")
    w = w.float()
    imp = torch.ones_like(w) if importance is None else importance.float().expand_as(w)
    tiny = torch.finfo(torch.float32).tiny
    qmax = (1 << (bits - 1)) - 1 if symmetric else (1 << bits) - 1
    lo0, hi0 = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)
    amax0 = torch.maximum(-lo0, hi0)
    best_err = torch.full(w.shape[:-1], float("inf"), device=w.device)
    best_scale = torch.empty_like(best_err)
    best_zero = None if symmetric else torch.zeros(w.shape[:-1], dtype=torch.int32, device=w.device)
    for i in range(int(max_shrink * n_grid) + 1):
        p = 1 - i / n_grid
        if symmetric:
            scale, zero = (p * amax0 / qmax).clamp(min=tiny), None
        else:
            scale = (p * (hi0 - lo0) / qmax).clamp(min=tiny)
            zero = torch.round(-p * lo0 / scale).clamp(0, qmax).to(torch.int32)
        z = None if zero is None else zero[..., None]
        q = dequantize_codes(quantize_to_codes(w, scale[..., None], z, bits), scale[..., None], z)
        err = (imp * (w - q).abs().pow(norm)).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes of `w` on a given grid; scale/zero broadcast against w. Symmetric (zero None) -> int8, else uint8."""
    if zero is None:
        return torch.round(w.float() / scale).clamp(-(1 << (bits - 1)), (1 << (bits - 1)) - 1).to(torch.int8)
    return (torch.round(w.float() / scale) + zero).clamp(0, (1 << bits) - 1).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """fp32 values of `codes` on a grid; the inverse of quantize_to_codes up to rounding."""
    q = codes.float()
    return q * scale if zero is None else (q - zero.float()) * scale


# >>> exercise ch07.quantize_per_group
def quantize_per_group(weight: torch.Tensor, bits: int, group_size: int,
                       symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest W [out, in] on a b-bit grid per (output row, group of `group_size` input columns).

    Returns (codes [out, in], scales fp32 [out, n_groups], zeros int32 [out, n_groups] or None), with
    n_groups = in // group_size (group_size = -1: one group per row, "per channel").
      symmetric:  s = max|w| / (2^(b-1) - 1), codes = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1) as int8, no zeros
      asymmetric: lo = min(min w, 0), hi = max(max w, 0), s = (hi - lo) / (2^b - 1), z = clamp(round(-lo / s),
                  0, 2^b - 1) as int32, codes = clamp(round(w / s) + z, 0, 2^b - 1) as uint8
    Work in fp32, round with torch.round (halves to even) and divide by s as written (w / s, not w * (1 / s):
    the codes are compared exactly). Clamp every scale to at least torch.finfo(torch.float32).tiny, before
    computing z and the codes (an all-zero group then gets codes that dequantize to exactly 0, not nan).
    Inputs are valid (2-D float, bits 2..8, group divides in).
    """
    # >>> solution
    out_f, in_f = weight.shape
    g = in_f if group_size == -1 else group_size
    w = weight.float().reshape(out_f, in_f // g, g)  # [out, n_groups, g]: one scale per last-dim run
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        qmax = (1 << (bits - 1)) - 1  # signed codes: -2^(b-1) is never produced, as in int8
        scale = (w.abs().amax(dim=-1) / qmax).clamp(min=tiny)
        codes = torch.round(w / scale[..., None]).clamp(-qmax - 1, qmax).to(torch.int8)
        return codes.reshape(out_f, in_f), scale, None
    qmax = (1 << bits) - 1
    lo = w.amin(dim=-1).clamp(max=0.0)  # include 0 in the range: z stays in [0, qmax], no weight is clipped
    hi = w.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=tiny)
    zero = torch.round(-lo / scale).clamp(0, qmax).to(torch.int32)
    codes = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, qmax).to(torch.uint8)
    return codes.reshape(out_f, in_f), scale, zero
    # <<< solution
# <<< exercise


# >>> exercise ch07.dequantize_per_group
def dequantize_per_group(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         group_size: int) -> torch.Tensor:
    """fp32 W [out, in] = (codes - zero) * scale, the inverse of quantize_per_group up to rounding.

    codes [out, in] (int8 symmetric, uint8 asymmetric), scales and zeros [out, n_groups] (zeros None: symmetric);
    input column j belongs to group j // group_size (group_size = -1: a single group per row).
    Shapes are valid (the engine checked them).
    """
    # >>> solution
    g = codes.shape[1] if group_size == -1 else group_size
    scale = scales.float().repeat_interleave(g, dim=1)  # group k covers columns k*g .. k*g + g - 1
    q = codes.float()
    return q * scale if zeros is None else (q - zeros.float().repeat_interleave(g, dim=1)) * scale
    # <<< solution
# <<< exercise


def quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> QuantizedWeight:
    """RTN-quantize W [out, in] with one scale (and zero) per output row and group of input columns."""
    check_quant_args(weight, bits, group_size)
    codes, scales, zeros = dispatch("ch07.quantize_per_group", quantize_per_group)(weight, bits, group_size, symmetric)
    return QuantizedWeight(codes, scales, zeros, bits, group_size, symmetric)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 W [out, in] from codes [out, in] and scales/zeros [out, n_groups] (g_idx [in]: explicit groups)."""
    if codes.dim() != 2 or scales.dim() != 2 or scales.shape[0] != codes.shape[0]:
        raise ValueError(f"codes must be [out, in] and scales [out, n_groups] with the same out, got "
                         f"{tuple(codes.shape)} and {tuple(scales.shape)}")
    if zeros is not None and zeros.shape != scales.shape:
        raise ValueError(f"zeros shape {tuple(zeros.shape)} must equal scales shape {tuple(scales.shape)}")
    n_in = codes.shape[1]
    if g_idx is None:
        g = n_in if group_size == -1 else group_size
        if g < 1 or n_in % g or n_in // g != scales.shape[1]:
            raise ValueError(f"group_size={group_size} does not match in_features={n_in} and "
                             f"{scales.shape[1]} groups of scales")
        return dispatch("ch07.dequantize_per_group", dequantize_per_group)(codes, scales, zeros, group_size)
    if g_idx.shape != (n_in,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[1]:
        raise ValueError(f"g_idx must be [{n_in}] with values in [0, {scales.shape[1]}), got shape "
                         f"{tuple(g_idx.shape)}")
    g_idx = g_idx.long()  # GPTQ act-order: each column names its group
    return dequantize_codes(codes, scales[:, g_idx], None if zeros is None else zeros[:, g_idx])


def fake_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> torch.Tensor:
    """quantize then dequantize ("fake quant"): the weight the quantized layer will effectively use."""
    return quantize(weight, bits, group_size, symmetric).dequantize(weight.dtype)


def pack_int4(codes: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Pack unsigned 4-bit codes (values 0..15) along the last dim: 2 per uint8 or 8 per int32.

    Order: code k of a word sits in bits [4k, 4k+4), i.e. element 2j is the low nibble of byte j (uint8), and
    elements 8j..8j+7 fill int32 word j from the least significant nibble up: AutoGPTQ's "sequential" layout
    (its qweight packs W^T [in, out] along `in`, qzeros along `out`; pass the tensor transposed so that the
    packed dim is last). Marlin's kernels further interleave the nibbles of a word as 0,2,4,6,1,3,5,7 and
    tile the matrix in 16x64 blocks so one instruction extracts two values; that repacking is the kernel's
    job and is not done here. Signed codes: pack QuantizedWeight.unsigned_codes().
    """
    if dtype not in (torch.uint8, torch.int32):
        raise ValueError(f"pack_int4 packs into torch.uint8 or torch.int32, got {dtype}")
    if codes.dtype.is_floating_point or codes.dim() == 0:
        raise TypeError(f"codes must be an integer tensor with at least 1 dim, got {codes.dtype} {tuple(codes.shape)}")
    per_word = 2 if dtype == torch.uint8 else 8
    if codes.shape[-1] % per_word:
        raise ValueError(f"last dim {codes.shape[-1]} must be a multiple of {per_word} to pack into {dtype}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > 15):
        raise ValueError(f"4-bit codes must lie in [0, 15], got range [{int(c.min())}, {int(c.max())}]")
    c = c.reshape(*c.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, device=c.device) * 4
    words = (c << shifts).sum(dim=-1)  # nibbles do not overlap, so the sum is a bitwise or
    if dtype == torch.uint8:
        return words.to(torch.uint8)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # wrap bit 31 into the sign


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 or int32 words -> uint8 codes, the last dim 2x or 8x longer."""
    if packed.dtype not in (torch.uint8, torch.int32):
        raise TypeError(f"unpack_int4 reads torch.uint8 or torch.int32 words, got {packed.dtype}")
    per_word = 2 if packed.dtype == torch.uint8 else 8
    shifts = torch.arange(per_word, device=packed.device) * 4
    nibbles = (packed.to(torch.int64)[..., None] >> shifts) & 0xF  # int64: int32's sign bit becomes bit 31
    return nibbles.reshape(*packed.shape[:-1], -1).to(torch.uint8)
