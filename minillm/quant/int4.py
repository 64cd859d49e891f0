"""Packed low-bit weights in GPTQ's and AWQ's checkpoint layouts, and the one matmul that reads them (chapters 7-8).

GPTQ layout (AutoGPTQ, vLLM's "gptq"), for W [out, in] quantized in groups of g input columns:

    qweight  int32 [in * bits / 32, out]   codes of W^T, packed along `in`
    qzeros   int32 [n_groups, out * bits / 32]   zero points, packed along `out`
    scales   [n_groups, out]               (fp16 in files)
    g_idx    int32 [in]                    group of each input column (only with act-order, desc_act=True)

Values are packed as a little-endian *bit stream*: code k occupies bits [k*b, k*b + b) of the stream and the
stream is cut into 32-bit words, so 4-bit codes fill a word 8 at a time (code k in bits [4k, 4k+4), the same as
rtn.pack_int4) and 3-bit codes cross word boundaries (32 codes in 3 words), which is how GPTQ packs 3 bits.
A symmetric grid stores the offset codes q + 2^(b-1) with every zero point 2^(b-1). AutoGPTQ's files
("checkpoint_format": "gptq", the default) store zero - 1 (a historical off-by-one every reader undoes);
"gptq_v2" files store the zero itself. In memory we always hold the zero itself.

AWQ layout (AutoAWQ "gemm", 4-bit only): qweight int32 [in, out / 8] and qzeros [n_groups, out / 8], both packed
along `out` with the nibbles of a word interleaved in the order 0, 2, 4, 6, 1, 3, 5, 7 (the order its
dequantize instruction sequence produces); scales [n_groups, out]; no offset on the zeros.

`int4_linear` is the single call site of the weight-only matmul: the reference here dequantizes to the input's
dtype and calls a dense matmul (it saves memory, not time); a fused dequantize-GEMM kernel (minillm.kernels,
chapters 7-8) takes over on CUDA for 4-bit weights. An act-order checkpoint reaches it too: sort_act_order
makes its groups contiguous at load time, and the layer feeds the matmul x[..., perm].
"""
from __future__ import annotations

import torch

from minillm.quant.rtn import QuantizedWeight

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_PACK_ORDER[i] of its 8


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")


def pack_bits(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned `bits`-bit codes along `dim` into int32 words (a little-endian bit stream)."""
    _check_bits(bits)
    c = codes.movedim(dim, -1).to(torch.int64)
    n = c.shape[-1]
    if (n * bits) % 32:
        raise ValueError(f"cannot pack {n} {bits}-bit codes into whole int32 words: need n * bits % 32 == 0")
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"{bits}-bit codes must lie in [0, {(1 << bits) - 1}], got [{int(c.min())}, {int(c.max())}]")
    pos = torch.arange(n, device=c.device) * bits
    word, shift = pos // 32, pos % 32
    words = torch.zeros(*c.shape[:-1], n * bits // 32, dtype=torch.int64, device=c.device)
    words.index_add_(-1, word, (c << shift) & 0xFFFFFFFF)  # bits do not overlap: the sum is an or
    spill = shift + bits > 32  # the code runs past the end of its word: its high bits start the next one
    if bool(spill.any()):
        words.index_add_(-1, word[spill] + 1, c[..., spill] >> (32 - shift[spill]))
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # bit 31 becomes int32's sign
    return words.to(torch.int32).movedim(-1, dim)


def unpack_bits(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of pack_bits: `n` codes (int32) along `dim` from int32 words."""
    _check_bits(bits)
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if w.shape[-1] * 32 != n * bits:
        raise ValueError(f"{w.shape[-1]} int32 words hold {w.shape[-1] * 32 // bits} {bits}-bit codes, not {n}")
    pos = torch.arange(n, device=w.device) * bits
    word, shift = pos // 32, pos % 32
    value = w[..., word] >> shift
    if 32 % bits:  # some codes cross a word boundary (decided on the host: no device sync, CUDA-graph safe)
        high = w[..., (word + 1).clamp(max=w.shape[-1] - 1)] << (32 - shift)
        value = torch.where(shift + bits > 32, value | high, value)
    return (value & ((1 << bits) - 1)).to(torch.int32).movedim(-1, dim)


def gptq_tensors(qw: QuantizedWeight, zero_offset: int = 0) -> dict[str, torch.Tensor]:
    """QuantizedWeight -> GPTQ-layout tensors {qweight, qzeros, scales[, g_idx]} (fp32 scales).

    zero_offset=1 writes AutoGPTQ's zero - 1 (mod 2^bits), the "gptq" checkpoint format; 0 the zero itself."""
    bits = qw.bits
    n_groups, out = qw.scales.shape[1], qw.codes.shape[0]
    zeros = qw.zeros if qw.zeros is not None else torch.full((out, n_groups), 1 << (bits - 1), dtype=torch.int32)
    zeros = (zeros.to(torch.int64) - zero_offset) % (1 << bits)
    out_t = {"qweight": pack_bits(qw.unsigned_codes().T, bits, dim=0),
             "qzeros": pack_bits(zeros.T, bits, dim=1),
             "scales": qw.scales.T.float().contiguous()}
    if qw.g_idx is not None:
        out_t["g_idx"] = qw.g_idx.to(torch.int32).clone()  # its own storage: q, k and v each get a copy
    return out_t


def awq_tensors(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """QuantizedWeight (4-bit, asymmetric) -> AutoAWQ gemm tensors {qweight, qzeros, scales}."""
    if qw.bits != 4 or qw.zeros is None or qw.g_idx is not None:
        raise ValueError(f"AWQ checkpoints hold 4-bit asymmetric weights without act-order; got bits={qw.bits}, "
                         f"symmetric={qw.symmetric}, g_idx={'set' if qw.g_idx is not None else None}")
    order = list(AWQ_PACK_ORDER)

    def pack_out(t: torch.Tensor) -> torch.Tensor:  # [rows, out] -> [rows, out / 8], AWQ's nibble order
        t = t.reshape(t.shape[0], -1, 8)[..., order].reshape(t.shape[0], -1)
        return pack_bits(t, 4, dim=1)

    return {"qweight": pack_out(qw.unsigned_codes().T), "qzeros": pack_out(qw.zeros.T.to(torch.int32)),
            "scales": qw.scales.T.float().contiguous()}


def unpack_awq(packed: torch.Tensor, out: int) -> torch.Tensor:
    """AWQ-packed [rows, out / 8] int32 -> codes [rows, out] (undoing the nibble interleave)."""
    inverse = [AWQ_PACK_ORDER.index(j) for j in range(8)]
    codes = unpack_bits(packed, 4, out, dim=1)
    return codes.reshape(codes.shape[0], -1, 8)[..., inverse].reshape(codes.shape[0], out)


def sort_act_order(qweight: torch.Tensor, g_idx: torch.Tensor, bits: int, group_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Make an act-order checkpoint's groups contiguous, once, at load time (ExLlama's and vLLM's trick).

    GPTQ with act-order quantizes the columns in order of decreasing Hessian diagonal, so group j holds scattered
    input columns and `g_idx` names each column's group: a kernel would have to gather a scale per weight.
    Sort the input rows of qweight by group (stable argsort of g_idx, `perm`) and feed the kernel x[..., perm]
    instead: y = sum_k x[k] W[k] = sum_i x[perm[i]] W[perm[i]], and row i of the sorted weight lies in group
    i // group_size, the plain layout every kernel reads. Returns (sorted qweight, perm int64 [in]), or None
    when the groups are not whole (each must hold exactly group_size columns, as GPTQ writes them)."""
    n_in = qweight.shape[0] * 32 // bits
    g = n_in if group_size == -1 else group_size
    perm = torch.argsort(g_idx.long(), stable=True)
    if g_idx.shape != (n_in,) or not torch.equal(g_idx.long()[perm], torch.arange(n_in, device=g_idx.device) // g):
        return None
    codes = unpack_bits(qweight, bits, n_in, dim=0)  # [in, out]
    return pack_bits(codes[perm], bits, dim=0), perm


def dequantize_gptq(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, bits: int,
                    group_size: int, g_idx: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """W^T [in, out] in `dtype` from GPTQ-layout tensors (zeros stored as themselves)."""
    n_groups, out = scales.shape
    n_in = qweight.shape[0] * 32 // bits
    codes = unpack_bits(qweight, bits, n_in, dim=0)  # [in, out]
    zeros = unpack_bits(qzeros, bits, out, dim=1)  # [n_groups, out]
    if g_idx is None:
        g = n_in if group_size == -1 else group_size
        g_idx = torch.arange(n_in, device=qweight.device) // g
    g_idx = g_idx.long()
    return ((codes - zeros[g_idx]).to(dtype) * scales[g_idx].to(dtype))


def fused_kernel_applies(x: torch.Tensor, qweight: torch.Tensor, bits: int, group_size: int,
                         g_idx: torch.Tensor | None) -> bool:
    """Whether int4_linear runs the fused kernel (minillm.kernels.int4_gemm) rather than the reference.

    The kernel reads GPTQ's layout as it is, for 4-bit codes on CUDA. It cannot gather a scale per weight, so
    a layer still holding g_idx keeps the reference; WeightOnlyLinearMethod sorts act-order checkpoints at load
    (sort_act_order), so only one whose groups are not whole (each group_size columns) is left with g_idx.
    """
    k, n = x.shape[-1], qweight.shape[1]
    group = k if group_size == -1 else group_size
    return (x.is_cuda and bits == 4 and g_idx is None and x.dtype in (torch.float16, torch.bfloat16)
            and k % group == 0 and group % 8 == 0 and n % 8 == 0)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                group_size: int, bits: int = 4, g_idx: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) for a GPTQ-layout weight: THE call site of the weight-only low-bit GEMM.

    On CUDA, 4-bit weights without g_idx go to the fused kernel: the codes are unpacked in registers inside the
    GEMM's K loop, so the weight crosses HBM at 4 bits (a decode step reads ~4x fewer bytes than bf16). GPTQ's
    qzeros (zero points packed along out) and scales [groups, out] are the kernel's own operands. Elsewhere the
    reference: dequantize W^T to x's dtype, then one dense matmul (it saves memory, not time).
    """
    if fused_kernel_applies(x, qweight, bits, group_size, g_idx):
        from minillm.kernels.int4_gemm import int4_gemm  # Triton: imported only where it runs
        return int4_gemm(x, qweight, scales, qzeros, group_size, bias=bias)
    w_t = dequantize_gptq(qweight, scales, qzeros, bits, group_size, g_idx, dtype=x.dtype)
    y = x @ w_t
    return y if bias is None else y + bias
