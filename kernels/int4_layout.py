"""The INT4 weight-only layout of int4_gemm.py: packing, repacking and the plain-torch reference (chapter 8).

    qweight  int32 [K // 8, N]        word (j, n) holds W[n, 8j + i] in bits [4i, 4i + 4), i = 0..7 (packed along K)
    scales   [K // G, N]              one scale per group of G input rows and output column
    qzeros   int32 [K // G, N // 8]   zero points packed along N, or None (symmetric: zero point 8)
    perm     int64 [K] or None        GPTQ act-order: the kernel reads x[:, perm]

This is GPTQ's checkpoint layout, and rtn.pack_int4's nibble order (code k of a word in bits [4k, 4k+4)).
repack_int4 turns a minillm.quant QuantizedWeight into it; sort_act_order makes an act-order checkpoint's
groups contiguous; dequantize_int4 is the reference the tests compare the kernel against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Int4Weight", "repack_int4", "pack_int4_along_k", "act_order_perm", "sort_act_order", "dequantize_int4"]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit codes [..., 8w] -> int32 words [..., w], element 8j + i in bits [4i, 4i + 4)."""
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8)
    words = (c << (torch.arange(8, device=codes.device) * 4)).sum(-1)  # nibbles do not overlap: sum == or
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _unpack_nibbles(words: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, device=words.device) * 4
    return ((words.to(torch.int64)[..., None] >> shifts) & 0xF).reshape(*words.shape[:-1], -1)


def pack_int4_along_k(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned codes W [N, K] (0..15) -> qweight int32 [K // 8, N], packed along K as GPTQ stores it."""
    if codes.dim() != 2 or codes.shape[1] % 8 or codes.dtype.is_floating_point:
        raise ValueError(f"codes must be integer [N, K] with K a multiple of 8, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(f"4-bit codes must lie in [0, 15], got [{int(codes.min())}, {int(codes.max())}]")
    return _pack_nibbles(codes).t().contiguous()


@dataclass
class Int4Weight:
    """A linear layer's weight in the kernel's layout (see the module docstring); `int4_gemm(x, *w.args())`."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    group_size: int
    perm: torch.Tensor | None = None

    def args(self) -> tuple:
        return self.qweight, self.scales, self.qzeros, self.group_size, self.perm


def repack_int4(qw, dtype: torch.dtype = torch.float16) -> Int4Weight:
    """rtn.QuantizedWeight (codes [N, K], scales/zeros [N, groups], 4 bits) -> Int4Weight with scales in `dtype`.

    Symmetric codes are stored offset by 8 (no qzeros); a g_idx (GPTQ act-order) becomes `perm`, the column
    order that makes every group a contiguous run of group_size columns (an error if the groups are uneven).
    """
    for attr in ("codes", "scales", "zeros", "bits", "group_size", "symmetric", "g_idx"):
        if not hasattr(qw, attr):
            raise TypeError(f"repack_int4 expects an rtn.QuantizedWeight, got {type(qw).__name__} without .{attr}")
    if qw.bits != 4:
        raise ValueError(f"repack_int4 packs 4-bit weights, got bits={qw.bits}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    codes = qw.codes.to(torch.int32) + 8 if qw.symmetric else qw.codes.to(torch.int32)
    n, k = codes.shape
    n_groups = qw.scales.shape[1]
    group = k // n_groups
    if k % n_groups or group % 8:
        raise ValueError(f"{n_groups} groups over K = {k} give group size {k / n_groups}: need a multiple of 8")
    perm = None
    if qw.g_idx is not None:
        perm = act_order_perm(qw.g_idx, group)
        codes = codes[:, perm]
    qzeros = None if qw.symmetric else _pack_nibbles(qw.zeros.to(torch.int32).t().contiguous())
    return Int4Weight(pack_int4_along_k(codes), qw.scales.t().contiguous().to(dtype), qzeros, group, perm)


def act_order_perm(g_idx: torch.Tensor, group_size: int) -> torch.Tensor:
    """GPTQ act-order: the column order `perm` [K] that makes each group a contiguous run of group_size columns
    (feed x[:, perm] and the weight's input rows in that order). ValueError if the groups are uneven."""
    if g_idx.dim() != 1 or g_idx.dtype.is_floating_point:
        raise ValueError(f"g_idx must be a 1-D integer tensor [K], got {g_idx.dtype} {tuple(g_idx.shape)}")
    perm = torch.argsort(g_idx.to(torch.int64), stable=True)
    expected = torch.arange(g_idx.numel(), device=g_idx.device) // group_size
    if not torch.equal(g_idx.to(torch.int64)[perm], expected):
        raise ValueError(f"g_idx groups must each hold exactly group_size={group_size} columns to be made contiguous")
    return perm


def sort_act_order(qweight: torch.Tensor, g_idx: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GPTQ act-order checkpoint's qweight [K // 8, N] (rows in the original order, groups given by g_idx)
    -> (qweight with its K rows in act_order_perm order, perm), ready for int4_gemm(..., perm=perm)."""
    perm = act_order_perm(g_idx, group_size)
    codes = _unpack_nibbles(qweight.t())  # [N, K]
    return pack_int4_along_k(codes[:, perm]), perm


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, group_size: int,
                    perm: torch.Tensor | None = None) -> torch.Tensor:
    """The reference: fp32 W [N, K] (original column order) from the kernel's layout, in plain torch."""
    k = qweight.shape[0] * 8
    group = k if group_size == -1 else group_size
    codes = _unpack_nibbles(qweight.t()).float()  # [N, K]
    zeros = _unpack_nibbles(qzeros).float() if qzeros is not None else torch.full_like(scales, 8, dtype=torch.float32)
    w = (codes - zeros.t().repeat_interleave(group, dim=1)) * scales.float().t().repeat_interleave(group, dim=1)
    if perm is not None:
        w = w[:, torch.argsort(perm)]
    return w
