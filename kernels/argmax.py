"""Greedy decoding's argmax over the vocabulary, in two stages (chapter 4).

Batch-1 decode ends with one row of logits: 49,152 values for SmolLM2, 128,256 for Llama 3. A reduction library
sized for long rows may give each row to *one* block of threads, and then a single SM walks 256 KB to 512 KB while
the other 131 idle: on the H200 torch's argmax of one 128,256-wide bf16 row (plus the fp32 copy before it) took
37 us of a 4.5 ms step, more than a whole decoder layer's attention.

Split the row instead, as a split-K GEMV splits its K:

* stage 1, grid (rows, chunks): each program loads one CHUNK of its row, finds the chunk's largest value and the
  first position holding it (`tl.max(..., return_indices=True)` with ties broken to the left), and writes the
  pair to a small [rows, chunks] workspace;
* stage 2, grid (rows,): each program reduces its row's chunk maxima the same way and looks the winning chunk's
  position up.

Both stages keep torch.argmax's answer exactly, ties included: the first index of the maximum (the chunk winner
is its chunk's first maximum, and stage 2 picks the first chunk that reaches the row's maximum). NaN compares as
the largest value, as in torch, by reading it as +inf (a row holding both NaN and +inf may then name the earlier
of the two, where torch names the NaN). The values are compared in fp32, which is exact for bf16 / fp16 input,
so the logits need no fp32 copy first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # values per stage-1 program: 32 programs for a Llama-3 row, 12 for SmolLM2's


@triton.jit
def _argmax_chunks_kernel(X, VALS, IDX, V, stride_x, n_chunks, CHUNK: tl.constexpr):
    """Program (row, c): the maximum of X[row, c*CHUNK : (c+1)*CHUNK] and its first position, into VALS / IDX."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN counts as the largest value, as in torch.argmax
    best, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(VALS + row * n_chunks + c, best)
    tl.store(IDX + row * n_chunks + c, c * CHUNK + at)


@triton.jit
def _argmax_rows_kernel(VALS, IDX, OUT, n_chunks, BLOCK: tl.constexpr):
    """Program row: the first chunk whose maximum is the row's maximum; OUT[row] = that chunk's position."""
    row = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, BLOCK)
    vals = tl.load(VALS + row * n_chunks + cs, mask=cs < n_chunks, other=float("-inf"))
    _, winner = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(OUT + row, tl.load(IDX + row * n_chunks + winner).to(tl.int64))


def check_row_logits(logits: torch.Tensor) -> tuple[int, int]:
    """(rows, vocab) of logits that a row kernel here can read: 2-D, floating point, contiguous in vocab."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError(f"logits must be 2-D [rows, vocab] and contiguous in vocab, got shape "
                         f"{tuple(logits.shape)} with strides {logits.stride()}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    return logits.shape[0], logits.shape[1]


def argmax_last_dim(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for a 2-D [rows, vocab] tensor whose last dimension is contiguous, as int64
    [rows], computed by the two-stage kernel above."""
    rows, vocab = check_row_logits(logits)
    if vocab == 0:
        raise ValueError("argmax of an empty vocabulary (vocab = 0) is undefined")
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    n_chunks = triton.cdiv(vocab, CHUNK)
    vals = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows, n_chunks), dtype=torch.int32, device=logits.device)
    _argmax_chunks_kernel[(rows, n_chunks)](logits, vals, idx, vocab, logits.stride(0), n_chunks, CHUNK=CHUNK,
                                            num_warps=8)
    _argmax_rows_kernel[(rows,)](vals, idx, out, n_chunks, BLOCK=max(16, triton.next_power_of_2(n_chunks)),
                                 num_warps=1)
    return out
