"""FP8 KV cache reads for paged decode attention: int32 words of four e4m3 bytes widened to fp16 tiles (chapter 5).

The cache holds x_q = x / scale in float8_e4m3fn, one byte a value where bf16 takes two (minillm/layers/kv_quant.py:
the number format and its scales). paged_attention.py's split kernel applies the scales once per tile; this module
is the other half, how it turns cached bytes into dot operands (FP8_WORDS, FP8_CVT and FP16_DOT in the kernel,
fp8_widen in its launcher).

Reading half the bytes only pays if turning the bytes into tensor-core operands costs less than the memory time
saved, and the plain `k.to(bf16)` did not (the step was 0.79x bf16's on the H200).
Compiled for sm_90 (Triton 3.6), that one line became, per 64-key tile and thread: 128 F2F (fp16 -> bf16, there
is no direct e4m3 -> bf16 instruction), 64 F2FP (e4m3x2 -> f16x2), and 64 one-byte shared-memory loads, because
the compiler moved the conversion after the shared-memory copy and V (contiguous along D, not along the
reduction over keys) cannot go through `ldmatrix.trans` as 8-bit data; 140 registers against bf16's 88 (3
programs per SM instead of 5). Conversions run at 16 per clock per SM, a quarter of integer arithmetic's rate.
So an fp8 cache takes another road (`_fp8_tile`):
  * load K and V as int32 words, four e4m3 bytes each (16-byte vector loads, as for bf16);
  * widen each word in registers to four fp16 (e4m3 is a subset of fp16, so this is exact): on a GPU one
    `cvt.rn.f16x2.e4m3x2` per two values; in the interpreter (and as the textbook version) by moving bits:
    the byte s.eeee.mmm placed as fp16 s.0eeee.mmm0000000 is the same number divided by 2^8 (fp16's exponent
    bias is 15, e4m3's 7), subnormals included, and that 2^8 folds into k_scale and v_scale with the rest;
  * run both dots in fp16 (q rounded once to fp16; p in [0, 1] is finer in fp16 than in bf16), so no F2F at
    all, and let the fp16 tile take the path bf16 takes (ldmatrix, transposed for V).
The pool holds finite values only (store_kvcache saturates at +-448), so e4m3's NaN code never needs care here.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _e4m3_pair_bits(x):
    """uint32 with an e4m3 byte in the high byte of each 16-bit half -> the fp16 bit patterns of value / 2^8:
    keep the sign bit where it is, shift exponent and mantissa one place right (fp16 has one exponent bit more)."""
    return (x & 0x80008000) | ((x >> 1) & 0x3F803F80)


@triton.jit
def _fp8_tile(words, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, USE_CVT: tl.constexpr):
    """words uint32 [ROWS, BLOCK_D // 4] (byte i of word j: element 4j + i) -> fp16 [ROWS, BLOCK_D], exact.

    USE_CVT: the hardware conversion (sm_89+), values as stored; else the bit trick, values / 2^8."""
    if USE_CVT:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b16 l, h; mov.b32 {l, h}, $2; cvt.rn.f16x2.e4m3x2 $0, l; cvt.rn.f16x2.e4m3x2 $1, h; }",
            "=r,=r,r", [words], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
    else:
        lo = _e4m3_pair_bits(((words << 8) & 0x0000FF00) | ((words << 16) & 0xFF000000))  # bytes 0, 1
        hi = _e4m3_pair_bits(((words >> 8) & 0x0000FF00) | (words & 0xFF000000))  # bytes 2, 3
    e0 = lo.to(tl.uint16).to(tl.float16, bitcast=True)
    e1 = (lo >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    e2 = hi.to(tl.uint16).to(tl.float16, bitcast=True)
    e3 = (hi >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    # join(join(e0, e2), join(e1, e3))[..., a, b] is element 2a + b of the word: row-major flattening interleaves
    return tl.reshape(tl.join(tl.join(e0, e2), tl.join(e1, e3)), [ROWS, BLOCK_D])
