"""The k most probable tokens of each row and their log-probabilities, in two kernels (chapter 9, EAGLE-2's search).

EAGLE-2 grows its draft tree depth by depth; at each depth every expanded node needs its top-k children under the
draft distribution, as log-probabilities (the search ranks paths by their sum). Written with torch ops that is
`torch.log_softmax(logits.float(), -1).topk(k)`: a copy to fp32, a softmax pass, then a top-k that, for a few
rows over a 49,152-word vocabulary, takes torch's multi-block radix select, about a dozen kernels. On the H200 the
top-k alone was the search's largest cost (about 250 us of a 1.7 ms tree step, five calls; eleventh session).

Here the row is split as kernels/argmax.py splits it, and the softmax's normaliser rides along:

* stage 1, grid (rows, chunks): a program loads one CHUNK of its row in fp32 and writes the chunk's maximum m_c,
  its sum of exp(x - m_c), and its own top-k (k rounds of "take the largest, first position on ties, then mask it
  out") as k (value, position) pairs;
* stage 2, grid (rows,): a program combines its chunks' normalisers into log Z = M + log sum_c s_c exp(m_c - M)
  (M = max_c m_c), takes the top-k of the chunks' k * chunks candidates the same way, and writes value - log Z.

Any token of the row's top-k is in its chunk's top-k, so stage 2 sees every winner. Ties go to the earlier
position (torch.topk leaves their order unspecified). Logits may be -inf (masked tokens) but not NaN, and a row
needs k values above -inf; they are read in their own dtype and compared in fp32, exact for bf16 / fp16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.argmax import check_row_logits

CHUNK = 2048  # values per stage-1 program: 24 programs for SmolLM2's 49,152-word row
MAX_K = 64  # k rounds of a reduction per program: fine for a search's top-k, not for sampling's top-k of 1,000s


@triton.jit
def _topk_chunks_kernel(X, VALS, IDX, MAXES, SUMS, V, stride_x, n_chunks, CHUNK: tl.constexpr, K: tl.constexpr):
    """Program (row, c): the chunk's maximum and sum of exp(x - max), and its top-K values and positions."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    lanes = tl.arange(0, CHUNK)
    offs = c * CHUNK + lanes
    x = tl.load(X + row * stride_x + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    tl.store(MAXES + row * n_chunks + c, m)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a chunk of masked (-inf) logits adds exp(-inf) = 0, not NaN
    tl.store(SUMS + row * n_chunks + c, tl.sum(tl.exp(x - m_safe), axis=0))
    out = (row * n_chunks + c) * K
    for i in range(K):
        best, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(VALS + out + i, best)
        tl.store(IDX + out + i, c * CHUNK + at)
        x = tl.where(lanes == at, float("-inf"), x)


@triton.jit
def _topk_rows_kernel(VALS, IDX, MAXES, SUMS, OUT_V, OUT_I, n_chunks, K: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Program row: log Z from the chunks' (max, sum), then the top-K of the row's chunk candidates, minus log Z."""
    row = tl.program_id(0).to(tl.int64)
    cs = tl.arange(0, BLOCK_C)
    m = tl.load(MAXES + row * n_chunks + cs, mask=cs < n_chunks, other=float("-inf"))
    s = tl.load(SUMS + row * n_chunks + cs, mask=cs < n_chunks, other=0.0)
    top = tl.max(m, axis=0)
    log_z = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    lanes = tl.arange(0, BLOCK)
    first = row * n_chunks * K
    v = tl.load(VALS + first + lanes, mask=lanes < n_chunks * K, other=float("-inf"))
    for i in range(K):
        best, at = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(OUT_V + row * K + i, best - log_z)
        tl.store(OUT_I + row * K + i, tl.load(IDX + first + at).to(tl.int64))
        v = tl.where(lanes == at, float("-inf"), v)


def topk_log_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp32 [rows, k], indices int64 [rows, k]): torch.log_softmax(logits.float(), -1).topk(k) for 2-D
    [rows, vocab] logits contiguous in vocab, best first, computed by the two kernels above."""
    rows, vocab = check_row_logits(logits)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(MAX_K, vocab):
        raise ValueError(f"k must be an integer in [1, min({MAX_K}, vocab = {vocab})], got {k!r}")
    values = torch.empty((rows, k), dtype=torch.float32, device=logits.device)
    indices = torch.empty((rows, k), dtype=torch.int64, device=logits.device)
    if rows == 0:
        return values, indices
    n_chunks = triton.cdiv(vocab, CHUNK)
    vals = torch.empty((rows, n_chunks, k), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows, n_chunks, k), dtype=torch.int32, device=logits.device)
    maxes = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    sums = torch.empty((rows, n_chunks), dtype=torch.float32, device=logits.device)
    _topk_chunks_kernel[(rows, n_chunks)](logits, vals, idx, maxes, sums, vocab, logits.stride(0), n_chunks,
                                          CHUNK=CHUNK, K=k, num_warps=4)
    _topk_rows_kernel[(rows,)](vals, idx, maxes, sums, values, indices, n_chunks, K=k,
                               BLOCK_C=max(16, triton.next_power_of_2(n_chunks)),
                               BLOCK=max(16, triton.next_power_of_2(n_chunks * k)), num_warps=4)
    return values, indices
