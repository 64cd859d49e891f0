"""GGUF quantizers: float32 weights -> the bytes of ggml's Q8_0, Q4_0, Q5_0 and Q4_K blocks (chapter 8).

minillm/loader/dequant.py reads these formats; this module writes them, byte for byte as ggml lays them out:

    Q8_0  34 bytes per 32 weights = 8.5 bits/weight   d (fp16) | 32 x int8 q            w = q * d
    Q4_0  18 bytes per 32 weights = 4.5 bits/weight   d (fp16) | 16 bytes of nibbles    w = (q - 8) * d
    Q5_0  22 bytes per 32 weights = 5.5 bits/weight   d (fp16) | 32 fifth bits | nibbles w = (q - 16) * d
    Q4_K 144 bytes per 256 weights = 4.5 bits/weight  d, dmin (fp16) | 8 six-bit scales and 8 six-bit mins
                                                      (12 bytes) | 128 bytes of nibbles
                                                      w = d * sc_j * q - dmin * m_j   in sub-block j of 32

The fp16 scale is what the extra half (or 0.5) bit per weight pays for: one scale per 32 weights. Q4_K spends the
same 4.5 bits differently: it stores two fp16 numbers per 256 weights and, per sub-block of 32, a 6-bit scale and a
6-bit minimum relative to them (8 * 12 bits = 12 bytes), so every sub-block gets its own *asymmetric* grid (a
scale and an offset, as Q4_1 has) for the price of Q4_0's symmetric one: two levels of scales.

Choosing the grid is a search, not a formula. For a given stored scale, rounding each weight to the nearest level
is optimal, so what remains is the scale (and, for Q4_K, the minimum):

- Q8_0 / Q4_0 / Q5_0 (symmetric): the weight of largest magnitude, `amax` with its sign, fixes the candidates
  d = -amax / r. A negative ratio puts that weight on the grid's longer side (-8 of -8..7 for 4 bits), so the
  extra level is not wasted; r slightly above the last level clips that one weight and rounds the others more
  finely. Every candidate is scored by the block's squared error with d already rounded to fp16 (the value the
  file will hold), and the best is kept. ggml's reference quantizer is the single candidate r = 8 (Q4_0) or
  d = amax / 127 (Q8_0), so ours is never worse block by block.
- Q4_K: per sub-block, candidate inverse scales spread around 15 / (max - min) give integer codes; for each
  set of codes the best (scale, offset) is a 2x2 least-squares fit (offset kept <= 0, because the format stores
  a non-negative minimum that is subtracted), and the pair with the least squared error wins. This is the idea
  of llama.cpp's make_qkx quantizers. The 8 scales and 8 minimums are then quantized to 6 bits against the
  super-block's largest (d = max_scale / 63), and the codes are rounded again on the grid the file really holds.

Q4_K needs rows that are a multiple of 256 weights; SmolLM2's hidden size 576 is not, so, as llama.cpp does,
such tensors fall back to Q5_0 (`gguf_type_for`). Every quantizer takes a float tensor whose element count is a
multiple of the block size (rows are contiguous in memory, innermost first, as ggml stores them) and returns a
flat uint8 tensor on the same device (a GPU quantizes a large model in seconds; the writer copies bytes to the CPU).
"""
from __future__ import annotations

from typing import Callable

import torch

from minillm.loader.dequant import GGML_TYPES

_TYPE_IDS = {t.name: t.type_id for t in GGML_TYPES.values()}


def _blocks(weights: torch.Tensor, block_size: int, type_name: str) -> torch.Tensor:
    """The weights as [n_blocks, block_size] float32, after checking they can be cut into whole blocks."""
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError(f"{type_name} quantizes a floating-point tensor, got {type(weights).__name__} "
                        f"{getattr(weights, 'dtype', '')}")
    if weights.numel() == 0 or weights.numel() % block_size:
        raise ValueError(f"{type_name} needs a multiple of {block_size} weights (its block), got {weights.numel()} "
                         f"(shape {list(weights.shape)})")
    if not torch.isfinite(weights).all():
        raise ValueError(f"{type_name}: the weights contain NaN or infinity")
    return weights.detach().reshape(-1, block_size).to(torch.float32)


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    """The value an fp16 field will hold, back in fp32: what the dequantizer multiplies by."""
    return x.to(torch.float16).to(torch.float32)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n] or [n, 1] fp32 -> [n, 2] little-endian fp16 bytes."""
    return x.reshape(-1, 1).to(torch.float16).view(torch.uint8)


def _symmetric_search(blocks: torch.Tensor, qmin: int, qmax: int, ratios: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (d, q) per block on the grid w = q * d, q in qmin..qmax, over candidates d = -amax / r.

    Returns d [n, 1] already rounded to fp16, and integer codes q [n, block] (float tensor of whole numbers).
    """
    idx = blocks.abs().argmax(dim=1, keepdim=True)
    amax = blocks.gather(1, idx)  # signed value of largest magnitude
    best_err = torch.full((blocks.shape[0], 1), float("inf"), device=blocks.device)
    best_d = torch.zeros_like(amax)
    for r in ratios.tolist():
        d = _fp16_round(-amax / r)
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = (blocks * inv).round().clamp(qmin, qmax)
        err = (q * d - blocks).square().sum(dim=1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
    inv = torch.where(best_d == 0, torch.zeros_like(best_d), 1.0 / best_d)
    return best_d, (blocks * inv).round().clamp(qmin, qmax)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] codes 0..15 -> [n, 16] bytes: element j in the low nibble of byte j, element j + 16 in the high."""
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def quantize_q8_0(weights: torch.Tensor) -> torch.Tensor:
    """Q8_0 bytes (34 per 32 weights): one fp16 scale and 32 int8 codes per block."""
    blocks = _blocks(weights, 32, "Q8_0")
    # The fp16 rounding of d moves the extreme weight by up to 1/2048 of a step; r near 127..128 covers it.
    d, q = _symmetric_search(blocks, -128, 127, torch.linspace(126.0, 128.0, 9))
    return torch.cat([_fp16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1).reshape(-1)


def quantize_q4_0(weights: torch.Tensor) -> torch.Tensor:
    """Q4_0 bytes (18 per 32 weights): one fp16 scale and 32 four-bit codes, stored as q + 8."""
    blocks = _blocks(weights, 32, "Q4_0")
    d, q = _symmetric_search(blocks, -8, 7, torch.linspace(6.5, 8.5, 21))
    return torch.cat([_fp16_bytes(d), _pack_nibbles(q + 8)], dim=1).reshape(-1)


def quantize_q5_0(weights: torch.Tensor) -> torch.Tensor:
    """Q5_0 bytes (22 per 32 weights): fp16 scale | the 32 fifth bits as a little-endian u32 | 16 bytes of nibbles."""
    blocks = _blocks(weights, 32, "Q5_0")
    d, q = _symmetric_search(blocks, -16, 15, torch.linspace(14.5, 16.5, 21))
    q = (q + 16).to(torch.int64)  # 0..31
    high = ((q >> 4) << torch.arange(32, device=q.device)).sum(dim=1, keepdim=True)  # bit j: element j's fifth bit
    qh = (high >> torch.tensor([0, 8, 16, 24], device=q.device)) & 0xFF
    return torch.cat([_fp16_bytes(d), qh.to(torch.uint8), _pack_nibbles(q & 0x0F)], dim=1).reshape(-1)


# --- Q4_K ----------------------------------------------------------------------------------------------------
def _fit_scale_and_offset(x: torch.Tensor, nmax: int, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [n, 32]: the (scale >= 0, offset <= 0) minimising sum (scale * q + offset - x)^2 over codes
    q = round((x - min) * iscale) in 0..nmax, for iscale = (nmax + c) / (max - min), c in candidates."""
    lo = x.min(dim=1, keepdim=True).values.clamp(max=0.0)  # the offset may not be positive: keep 0 in range
    hi = x.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp(min=1e-30)
    # min-max rounding is the starting point; the search must beat it
    best_scale, best_offset = span / nmax, lo
    q = ((x - lo) / best_scale).round().clamp(0, nmax)
    best_err = (q * best_scale + lo - x).square().sum(dim=1, keepdim=True)
    n = x.shape[1]
    sum_x = x.sum(dim=1, keepdim=True)
    for c in candidates.tolist():
        q = ((x - lo) * ((nmax + c) / span)).round().clamp(0, nmax)
        sum_q, sum_qq = q.sum(dim=1, keepdim=True), q.square().sum(dim=1, keepdim=True)
        sum_qx = (q * x).sum(dim=1, keepdim=True)
        det = n * sum_qq - sum_q * sum_q
        safe = det.clamp(min=1e-30)
        scale = (n * sum_qx - sum_q * sum_x) / safe
        offset = (sum_qq * sum_x - sum_q * sum_qx) / safe
        # a positive offset cannot be stored: refit the scale alone with the offset at 0
        clipped = offset > 0
        scale = torch.where(clipped, sum_qx / sum_qq.clamp(min=1e-30), scale)
        offset = torch.where(clipped, torch.zeros_like(offset), offset)
        err = (q * scale + offset - x).square().sum(dim=1, keepdim=True)
        better = (err < best_err) & (det > 0) & (scale > 0)
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset


def _six_bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 8] non-negative -> (fp16-rounded super-scale [n, 1], 6-bit integers [n, 8]) with values ~ super * ints."""
    top = values.max(dim=1, keepdim=True).values
    sup = _fp16_round(top / 63)
    inv = torch.where(sup > 0, 1.0 / sup, torch.zeros_like(sup))
    return sup, (values * inv).round().clamp(0, 63)


def _pack_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and 8 six-bit mins per row -> 12 bytes, the layout dequant._k_scales_and_mins reads."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)  # scales 0-3, and the top 2 bits of scales 4-7
    b = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([a, b, c], dim=1)


def quantize_q4_k(weights: torch.Tensor) -> torch.Tensor:
    """Q4_K bytes (144 per 256 weights): searched per-sub-block scales and mins, quantized to 6 bits."""
    blocks = _blocks(weights, 256, "Q4_K")
    n = blocks.shape[0]
    sub = blocks.reshape(-1, 32)
    scale, offset = _fit_scale_and_offset(sub, 15, torch.arange(-1.0, 1.01, 0.1))
    d, sc = _six_bit(scale.reshape(n, 8))
    dmin, mn = _six_bit((-offset).reshape(n, 8))
    # the grid the file holds: re-round every weight on it (the fitted codes assumed unquantized scales)
    step = (d * sc).reshape(-1, 1)
    low = (dmin * mn).reshape(-1, 1)
    inv = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    q = ((sub + low) * inv).round().clamp(0, 15).to(torch.uint8).reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)  # chunk c: sub-block 2c low, 2c + 1 high nibbles
    return torch.cat([_fp16_bytes(d), _fp16_bytes(dmin), _pack_k_scales(sc, mn), qs], dim=1).reshape(-1)


def _f32(weights: torch.Tensor) -> torch.Tensor:
    return weights.detach().to(torch.float32).contiguous().reshape(-1).view(torch.uint8)


def _f16(weights: torch.Tensor) -> torch.Tensor:
    return weights.detach().to(torch.float16).contiguous().reshape(-1).view(torch.uint8)


QUANTIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _f32, "F16": _f16, "Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q5_0": quantize_q5_0,
    "Q4_K": quantize_q4_k,
}
# llama.cpp's rule when a row does not fill whole super-blocks: the next type up that uses blocks of 32
K_QUANT_FALLBACK = {"Q4_K": "Q5_0"}


def gguf_type_for(type_name: str, shape: tuple[int, ...]) -> str:
    """The type a tensor of PyTorch shape `shape` gets when `type_name` is asked for: K-quants fall back to Q5_0
    when the row (last dim) is not a multiple of 256, and any block type to F16 when it is not a multiple of 32."""
    if type_name not in QUANTIZERS:
        raise ValueError(f"unknown GGUF type {type_name!r}; minillm writes {', '.join(QUANTIZERS)}")
    block = GGML_TYPES[_TYPE_IDS[type_name]].block_size
    if shape[-1] % block == 0:
        return type_name
    if type_name in K_QUANT_FALLBACK:
        return gguf_type_for(K_QUANT_FALLBACK[type_name], shape)
    return "F16"


def gguf_type_id(type_name: str) -> int:
    """ggml's type id of a type this module writes ("Q4_K" -> 12)."""
    if type_name not in QUANTIZERS:
        raise ValueError(f"unknown GGUF type {type_name!r}; minillm writes {', '.join(QUANTIZERS)}")
    return _TYPE_IDS[type_name]


def quantize_tensor(weights: torch.Tensor, type_name: str) -> tuple[int, torch.Tensor]:
    """(ggml type id, flat uint8 bytes) of `weights` in the GGUF type `type_name` (F32, F16, Q8_0, Q4_0, Q5_0, Q4_K)."""
    block = GGML_TYPES[gguf_type_id(type_name)].block_size
    if isinstance(weights, torch.Tensor) and weights.dim() > 0 and weights.shape[-1] % block:
        raise ValueError(f"{type_name} quantizes rows in blocks of {block}; a row of shape {list(weights.shape)} has "
                         f"{weights.shape[-1]} weights (use gguf_type_for to pick a type that fits)")
    return _TYPE_IDS[type_name], QUANTIZERS[type_name](weights)


def dequantize_tensor(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 weights a GGUF reader will see for these bytes (our dequantizer), in PyTorch shape."""
    return GGML_TYPES[_TYPE_IDS[type_name]].dequantize(raw).reshape(shape)
