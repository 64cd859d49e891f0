"""Dequantizers for GGML tensor types: GGUF tensor bytes -> float32 (chapter 1; quantization, chapters 7-8, revisits them).

A GGUF file stores a weight either as plain floats (F32, F16, BF16) or as *blocks*: 32 consecutive
weights along a row share one fp16 scale `d` (and, for Q4_1, one fp16 minimum `m`), and each weight
keeps only a small integer. The layouts below are ggml's (ggml-common.h), byte for byte:

    Q8_0  34 bytes = d (fp16) | 32 x int8 q                  w = q * d
    Q4_0  18 bytes = d (fp16) | 16 bytes, two 4-bit q each  w = (q - 8) * d
    Q4_1  20 bytes = d (fp16) | m (fp16) | 16 bytes          w = q * d + m

In the 4-bit types byte j holds element j in its low nibble and element j + 16 in its high nibble,
so a block is "all low nibbles, then all high nibbles", not interleaved pairs. Q5_0 / Q5_1 add a
32-bit mask holding each weight's fifth bit.

The K-quants (Q4_K, Q5_K, Q6_K: what a "Q4_K_M" download is made of) use super-blocks of 256 weights
with one fp16 scale (and min) plus a small integer scale per sub-block of 32 (or 16) weights: two
levels of scales, so the per-sub-block scales themselves cost only 6 or 8 bits.

Every function takes the raw bytes of a whole tensor as a flat uint8 tensor and returns float32,
flat; the caller reshapes. Everything is one vectorized torch expression per type: a Python loop
over the ~3 million blocks of a 135M-parameter model would take minutes instead of a fraction of a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from minillm.hooks import dispatch


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type: its id in the file, how many weights a block holds, and how many bytes a block takes."""

    type_id: int
    name: str
    block_size: int  # weights per block (1 for plain float types)
    type_size: int  # bytes per block
    dequantize: Callable[[torch.Tensor], torch.Tensor]

    def nbytes(self, num_elements: int) -> int:
        return num_elements // self.block_size * self.type_size


def _fp16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Bytes [start, start+2) of every block, read as one fp16 per block and widened to fp32, shape [n_blocks, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).to(torch.float32)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n_blocks, 16] bytes -> [n_blocks, 32] values 0..15: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.float32)


def dequantize_f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float32).clone()


def dequantize_f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).to(torch.float32)


def dequantize_bf16(raw: torch.Tensor) -> torch.Tensor:
    # bf16 is the top half of an fp32, so widening is exact.
    return raw.view(torch.bfloat16).to(torch.float32)


def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 34)
    d = _fp16_column(blocks, 0)
    q = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
    return (q * d).reshape(-1)


def dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 18)
    d = _fp16_column(blocks, 0)
    q = _unpack_nibbles(blocks[:, 2:]) - 8.0  # stored unsigned 0..15, centred on 8
    return (q * d).reshape(-1)


# >>> exercise ch07.dequant_q4_1
def dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    """Q4_1 bytes -> fp32 weights: raw is a flat uint8 tensor of n_blocks * 20 bytes; returns a flat fp32
    tensor of n_blocks * 32 weights, in block order.

    Block layout (ggml's block_q4_1): d (fp16, bytes 0-1) | m (fp16, bytes 2-3) | 16 bytes of 4-bit codes q.
    Byte j holds element j in its LOW nibble and element j + 16 in its HIGH nibble. w = q * d + m.
    (Two bytes read as one fp16: `.contiguous().view(torch.float16)` on a [n, 2] uint8 slice; little-endian.)
    """
    # >>> solution
    blocks = raw.view(-1, 20)
    d = blocks[:, 0:2].contiguous().view(torch.float16).to(torch.float32)  # [n_blocks, 1]
    m = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    qs = blocks[:, 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.float32)  # all low nibbles, then all high nibbles
    return (q * d + m).reshape(-1)
    # <<< solution
# <<< exercise


# --- 5-bit types: a fifth bit per weight, packed as one 32-bit mask per block --------------------------
def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """[n_blocks, 4] bytes (a little-endian u32) -> [n_blocks, 32] bits, bit j for element j."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh[:, :, None] >> shifts) & 1).reshape(-1, 32)


def dequantize_q5_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 22)  # d | qh (4 bytes) | 16 bytes of nibbles
    q = _unpack_nibbles(blocks[:, 6:]) + 16.0 * _high_bits(blocks[:, 2:6]).to(torch.float32) - 16.0
    return (q * _fp16_column(blocks, 0)).reshape(-1)


def dequantize_q5_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 24)  # d | m | qh (4 bytes) | 16 bytes of nibbles
    q = _unpack_nibbles(blocks[:, 8:]) + 16.0 * _high_bits(blocks[:, 4:8]).to(torch.float32)
    return (q * _fp16_column(blocks, 0) + _fp16_column(blocks, 2)).reshape(-1)


# --- K-quants: super-blocks of 256 weights = 8 (or 16) sub-blocks, each with its own small scale ---------
def _k_scales_and_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K / Q5_K).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales and mins 4-7 keep their
    low 4 bits in bytes 8-11 and their top 2 bits in the spare top bits of bytes 0-7.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat([a & 63, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    mins = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return scales.to(torch.float32), mins.to(torch.float32)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32]: each 32-byte chunk gives a sub-block from its low nibbles, the next from its high."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).to(torch.float32)


# >>> exercise ch07.dequant_q4_k
def dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    """Q4_K bytes -> fp32 weights: raw is a flat uint8 tensor of n * 144 bytes; returns a flat fp32 tensor of
    n * 256 weights, in super-block order.

    A super-block of 256 weights (ggml's block_q4_K) is 8 sub-blocks of 32, with two levels of scales:
        d (fp16, bytes 0-1) | dmin (fp16, bytes 2-3) | 12 bytes of 6-bit scales/mins | 128 bytes of nibbles
    Sub-block s (s = 0..7) has a 6-bit scale sc[s] and a 6-bit min mn[s], packed in the 12 bytes b[0..11]:
        s < 4:  sc = b[s] & 63,                          mn = b[s + 4] & 63
        s >= 4: sc = (b[s + 4] & 0xF) | (b[s - 4] >> 6) << 4,  mn = (b[s + 4] >> 4) | (b[s] >> 6) << 4
    The 128 bytes are 4 chunks of 32: chunk c gives sub-block 2c from its low nibbles and sub-block 2c + 1
    from its high nibbles (byte l of the chunk: element l of each). w = d * sc[s] * q - dmin * mn[s].
    """
    # >>> solution
    blocks = raw.view(-1, 144)
    d = blocks[:, 0:2].contiguous().view(torch.float16).to(torch.float32)  # [n, 1]
    dmin = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
    b = blocks[:, 4:16]
    lo, mid, hi = b[:, 0:4], b[:, 4:8], b[:, 8:12]  # scales 0-3 | mins 0-3 | low halves of scales/mins 4-7
    sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=1).to(torch.float32)  # [n, 8]
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1).to(torch.float32)
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).to(torch.float32)  # [n, sub-block, 32]
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1)
    # <<< solution
# <<< exercise


def dequantize_q5_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 176)  # d | dmin | 12 bytes of scales/mins | 32 bytes of fifth bits | 128 bytes of nibbles
    scales, mins = _k_scales_and_mins(blocks[:, 4:16])
    d, dmin = _fp16_column(blocks, 0), _fp16_column(blocks, 2)
    # Sub-block s takes its fifth bit from bit s of qh[l], for l = 0..31.
    high = (blocks[:, None, 16:48] >> torch.arange(8, dtype=torch.uint8)[None, :, None]) & 1
    q = _k_nibbles(blocks[:, 48:]) + 16.0 * high.to(torch.float32)
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1)


def dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 210)  # 128 bytes low 4 bits | 64 bytes high 2 bits | 16 int8 scales | d
    ql = blocks[:, :128].reshape(-1, 2, 2, 32)  # [half, 32-byte chunk, l]
    low4 = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [n, half, quarter, l]: quarters 0,1 low nibbles; 2,3 high
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)
    high2 = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low4 | (high2 << 4)).to(torch.float32) - 32.0
    scales = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)  # one per 16 weights
    d = _fp16_column(blocks, 208)
    return ((d * scales)[:, :, None] * q.reshape(-1, 16, 16)).reshape(-1)


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    return dispatch("ch07.dequant_q4_1", dequantize_q4_1)(raw)  # a learner's version loads the model


def _q4_k(raw: torch.Tensor) -> torch.Tensor:
    return dispatch("ch07.dequant_q4_k", dequantize_q4_k)(raw)


# Type ids are ggml's enum ggml_type; the ones we do not implement are listed by name so errors can say which.
GGML_TYPES: dict[int, GGMLType] = {
    t.type_id: t
    for t in (
        GGMLType(0, "F32", 1, 4, dequantize_f32),
        GGMLType(1, "F16", 1, 2, dequantize_f16),
        GGMLType(2, "Q4_0", 32, 18, dequantize_q4_0),
        GGMLType(3, "Q4_1", 32, 20, _q4_1),
        GGMLType(6, "Q5_0", 32, 22, dequantize_q5_0),
        GGMLType(7, "Q5_1", 32, 24, dequantize_q5_1),
        GGMLType(8, "Q8_0", 32, 34, dequantize_q8_0),
        GGMLType(12, "Q4_K", 256, 144, _q4_k),
        GGMLType(13, "Q5_K", 256, 176, dequantize_q5_k),
        GGMLType(14, "Q6_K", 256, 210, dequantize_q6_k),
        GGMLType(30, "BF16", 1, 2, dequantize_bf16),
    )
}

KNOWN_UNSUPPORTED_TYPES = {
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}


def ggml_type_name(type_id: int) -> str:
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id].name
    return KNOWN_UNSUPPORTED_TYPES.get(type_id, f"unknown type id {type_id}")


def supported_type_names() -> list[str]:
    return [t.name for t in GGML_TYPES.values()]
