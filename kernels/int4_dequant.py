"""INT4 weights for prefill-sized M: dequantise to bf16 once per call, then let cuBLAS do the GEMM (chapter 8).

A fused INT4 kernel saves bytes, and bytes are what a decode step (M = 1..16) waits for. At M = 64 or more rows
the same weights feed 64+ products each, a GEMM of that size is tensor-core work, and cuBLAS's bf16 kernels do it
far better than a Triton kernel that also unpacks nibbles in its inner loop (0.15x bf16 at M = 64 on the H200).
So for large M, split the work in two kernels that each do one thing well (as vLLM's and TGI's GPTQ paths do
for prefill):

1. int4_dequant_kernel streams qweight once and writes W^T in bf16 (or fp16/fp32) to a scratch buffer: 0.5 byte
   read and 2 bytes written per weight, a bandwidth-bound copy (4096 x 14336: ~35 us at 4.2 TB/s);
2. torch.mm(x, W^T) on cuBLAS.

The kernel writes W^T [K, N] (K rows of N contiguous columns), the layout GPTQ packs: nibble i of word row j is
K row 8j + i, so each unpacked nibble plane is a [ROWS, BLOCK_N] tile stored as whole rows (coalesced), with no
transpose; cuBLAS reads a row-major [K, N] right operand as well as a [N, K] one.
The weight may be processed in CHUNKS slices of columns: each slice is dequantised into the same scratch and
multiplied at once, so at a few tens of MB per slice cuBLAS reads it back from the 50 MB L2 instead of HBM
(fewer bytes, two more launches per slice). int4_dispatch.py times 1 and a few slices and keeps the faster.

Dequantisation per weight: (code - zero) * scale with code = (word >> 4i) & 0xF made a float by the magic-number
trick (OR the nibble into the mantissa of 2^23, 0x4B000000: the float is 2^23 + code exactly; subtracting
2^23 + zero is exact), then one multiply; exact in fp32 before the one rounding to the output dtype.
The scratch is one grow-only buffer per device and dtype (kept alive for CUDA graphs that captured it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.int4_gemm import _load_tile
from minillm.platform import triton_interpreted

__all__ = ["int4_dequant_kernel", "dequantize_int4_into", "int4_dequant_matmul"]

BLOCK_ROWS = 16  # packed rows (128 K rows) per program
BLOCK_N = 128


@triton.jit
def int4_dequant_kernel(QW, S, QZ, WT, K, N, n0, n_cols, stride_qk, stride_sg, stride_zg, stride_wk,
                        GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """WT[k, c] = (code - zero) * scale of weight column n0 + c, K row k, for c < n_cols; grid
    (cdiv(K // 8, ROWS), cdiv(n_cols, BLOCK_N)). GROUP_SIZE % 8 == 0, so all 8 codes of a word share a group."""
    pid_j = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_j = pid_j * ROWS + tl.arange(0, ROWS)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < n_cols
    ok = (offs_j < K // 8)[:, None] & c_ok[None, :]
    # int4_gemm.py's tile loader: words [ROWS, BLOCK_N], and one scale and zero per word row (ONE_GROUP=False)
    w, s, z = _load_tile(QW, S, QZ, pid_j, pid_j + 1, tl.arange(0, ROWS), n0 + offs_c, c_ok, K, stride_qk,
                         stride_sg, stride_zg, GROUP_SIZE, HAS_ZEROS, False, ROWS, ROWS * 8, BLOCK_N)
    off = 8388608.0 + z  # 2^23 + zero, exact in fp32
    out = WT + (offs_j[:, None] * 8).to(tl.int64) * stride_wk + offs_c[None, :]
    for i in tl.static_range(8):
        f = (((w >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + code, exactly
        tl.store(out + i * stride_wk, ((f - off) * s).to(WT.dtype.element_ty), mask=ok)


_SCRATCH: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}


def _scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A grow-only scratch of >= numel elements (older ones are kept alive: captured graphs still use them)."""
    held = _SCRATCH.setdefault((str(device), dtype), [])
    if not held or held[-1].numel() < numel:
        held.append(torch.empty(max(numel, 2 * held[-1].numel() if held else 0), dtype=dtype, device=device))
    return held[-1]


def dequantize_int4_into(wt: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                         group: int, n0: int = 0) -> torch.Tensor:
    """Write W^T [K, n_cols] (columns n0 .. n0 + n_cols of the weight) into the contiguous tensor wt; returns wt."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if wt.dim() != 2 or wt.shape[0] != k or not wt.is_contiguous() or not 0 <= n0 <= n - wt.shape[1]:
        raise ValueError(f"wt must be a contiguous [K, n_cols] = [{k}, <= {n - n0}] tensor for columns from n0={n0}, "
                         f"got {tuple(wt.shape)}")
    if group % 8 or k % group:
        raise ValueError(f"group must be a multiple of 8 dividing K = {k}, got {group}")
    n_cols = wt.shape[1]
    qz = qzeros if qzeros is not None else qweight  # a placeholder when symmetric
    grid = (triton.cdiv(k // 8, BLOCK_ROWS), triton.cdiv(n_cols, BLOCK_N))
    extra = {} if triton_interpreted() else dict(num_warps=4)
    int4_dequant_kernel[grid](qweight, scales, qz, wt, k, n, n0, n_cols, qweight.stride(0), scales.stride(0),
                              qz.stride(0), wt.stride(0), GROUP_SIZE=group, HAS_ZEROS=qzeros is not None,
                              ROWS=BLOCK_ROWS, BLOCK_N=BLOCK_N, **extra)
    return wt


def int4_dequant_matmul(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                        group: int, bias: torch.Tensor | None, y: torch.Tensor, chunks: int = 1) -> None:
    """y [M, N] = x2 [M, K] @ dequant(W)^T (+ bias): W^T dequantised to x2's dtype in `chunks` column slices
    (of whole 128-column tiles, or of 8 columns for a narrow weight), each followed at once by its cuBLAS GEMM
    into y's columns."""
    m, k = x2.shape
    n = qweight.shape[1]
    if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= max(1, n // 8):
        raise ValueError(f"chunks must be an int in [1, N // 8 = {max(1, n // 8)}], got {chunks!r}")
    # whole 128-column tiles per slice where the weight is wide enough: the sizes and offsets then divide by 16,
    # which lets Triton vectorise the stores (16 bytes a thread instead of 2)
    unit = BLOCK_N if n >= BLOCK_N * chunks else 8
    width = triton.cdiv(triton.cdiv(n, chunks), unit) * unit
    buf = _scratch(x2.device, x2.dtype, k * min(width, n))
    for n0 in range(0, n, width):
        cols = min(width, n - n0)
        wt = dequantize_int4_into(buf[: k * cols].view(k, cols), qweight, scales, qzeros, group, n0)
        if bias is not None:
            torch.addmm(bias[n0:n0 + cols], x2, wt, out=y[:, n0:n0 + cols])
        else:
            torch.mm(x2, wt, out=y[:, n0:n0 + cols])
