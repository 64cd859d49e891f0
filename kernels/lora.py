"""Multi-LoRA serving: the segmented-gather LoRA kernels, shrink and expand (Punica's and S-LoRA's SGMV), and the
two fused into one launch for decode batches. Chapter 10, section 7 explains them (its exercise, lora_delta, is the
same product in torch: minillm/lora/layers.py).

A LoRA adapter changes a linear layer y = x W^T into y = x W^T + (x A^T) B^T with two thin matrices, A [R, K] and
B [N, R], of a small rank R (8 to 64; the scaling alpha / R is folded into B by the caller). Serving many adapters
at once means one step's batch mixes sequences that use *different* adapters: the base matmul x W^T is shared by
all tokens, but each token needs its own sequence's A and B. Running one small matmul per adapter would launch
L kernels per layer; merging the adapters into W is impossible when they differ per sequence. So the adapters are
stacked into slots,

    lora_a [L, R, K]    lora_b [L, N, R]    (ranks below R zero-padded; dtype = the activations')

and one launch serves the whole batch, every program looking up the adapter of *its* tokens. The batch is packed
(the new tokens of each sequence one after another, as the engine packs them) and described by segments, one per
sequence, contiguous in the token dimension:

    seg_starts [S], seg_lens [S]   the rows of segment i are seg_starts[i] .. seg_starts[i] + seg_lens[i] - 1
    seg_slots [S]                  the slot of its adapter, or -1: this sequence uses none (its rows are skipped)
    max_seg_len                    a host int, the longest segment: sizes the grid without reading the arrays

The LoRA term is computed in two steps, because R is tiny next to K and N:

* shrink: s [T, R] = x [T, K] @ A_slot^T, a reduction over the long K into R numbers per token (fp32 output, so
  the second step starts from unrounded values). Grid (S, cdiv(max_seg_len, BLOCK_M), SPLIT_K): program (i, m, k)
  multiplies rows m*BLOCK_M.. of segment i by A^T of its slot over one K range, streaming [BLOCK_M, BLOCK_K] tiles
  of x against [BLOCK_K, BLOCK_R] tiles of A^T with tl.dot (tensor cores; fp32 accumulation). BLOCK_R is the rank
  rounded up to a power of two, at least 16 (tl.dot's smallest side), so one program owns all R columns; rows past
  the segment's end are masked. A decode step has few programs (one per sequence) each walking all of K, so on a GPU
  K is split across SPLIT_K programs that add their partial sums into a zeroed output with atomics (the order of
  those fp32 adds varies from run to run: pass split_k=1 for bit-reproducible results).
* expand: y [T, N] += s @ B_slot^T, in place, a broadcast of R numbers per token into N outputs. Grid
  (S, cdiv(max_seg_len, BLOCK_M), cdiv(N, BLOCK_N)): program (i, m, n) reads s's [BLOCK_M, R] rows (fp32) and the
  [R, BLOCK_N] tile of B^T (cast to fp32), adds their product to y's tile in fp32 and stores it in y's dtype. The
  dot runs in fp32 operands: TF32 on tensor cores when y is 16-bit (its 10-bit mantissa rounds no worse than
  y's own fp16 / bf16 store), exact IEEE fp32 when y is fp32. Its flops are T*N*R, few: the kernel's cost is
  reading and writing y.
* fused (lora_fused): both in one launch, for decode-sized batches, where the two launches (and shrink's memset
  or split-K atomics) cost more than the products. Grid (S, cdiv(max_seg_len, BLOCK_M), cdiv(N, BLOCK_N)):
  program (i, m, n) runs the shrink of its rows over all of K (fp32, kept in registers), then adds its
  [BLOCK_M, BLOCK_N] tile of the expand into y (load, add, store: one program per tile, no atomics). The price is
  the shrink redone by each of the cdiv(N, BLOCK_N) programs of a row tile, A[slot] re-read from L2 each time;
  `lora_fused_pays` bounds that extra traffic (8 MiB) and K (a fused program walks all of it alone), which keeps
  wide or deep layers and prefills on the two kernels.

Segments of slot -1 cost one load of their slot per program: the program returns at once, leaving s's rows zero
(shrink: a zeroed output, or zeros the program stores when the caller says every row is in a segment,
`rows_covered`, which spares the memset) and y's rows untouched (expand, fused). So do programs past their
segment's end (a grid sized by the longest segment over-provisions the short ones). Every tensor is addressed
through its strides: x and y may be row-strided views (a slice of a fused qkv output, say), and lora_a / lora_b
need not be contiguous.

Launch sizes (no autotuning): BLOCK_M 16 / 32 / 64 from max_seg_len (decode segments are 1 to 8 tokens, prefill
segments up to thousands), smaller when the rank is large so the [BLOCK_M, BLOCK_R] accumulator stays in registers;
BLOCK_K 128 (less for a large rank), BLOCK_N 128 (64 with BLOCK_M 64; fused: at most 8192 / BLOCK_R, the whole
rank's B tile in fp32 registers); 4 warps. Compiled for sm_90 in bf16 (benchmarks/sass_lora.py, triton 3.9) the
decode launches hold 46 to 102 registers a thread, no spills: fused 84 at R 48, 62 at R 32.

`lora_shrink_reference` / `lora_expand_reference` (and `lora_fused_reference`, the two in a row) compute the same
in plain torch, one matmul per segment: the tests' oracle and a CPU path. The segment arrays' *values* (slots < L,
segments inside [0, T), no overlap, max_seg_len >= every length) are checked only when the arrays are on the CPU:
on a GPU that check would read them back, a device sync per layer; `check_segments` runs it anywhere, for a caller
that wants it (on host metadata before the copy to the GPU, say).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.kernels.hardware import num_sms

__all__ = ["lora_shrink", "lora_expand", "lora_fused", "lora_fused_pays", "lora_shrink_reference",
           "lora_expand_reference", "lora_fused_reference", "check_segments", "FUSED_REREAD_BUDGET", "FUSED_MAX_K"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _shrink_rows(X, A, rows, m_ok, slot, k_begin, k_end, R, stride_xm, stride_xk, stride_al, stride_ar, stride_ak,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_R]: X[rows, k_begin:k_end] @ A[slot, :R, k_begin:k_end]^T (rows where m_ok, columns
    below R; the rest zero), streaming [BLOCK_M, BLOCK_K] tiles of x against [BLOCK_K, BLOCK_R] tiles of A^T."""
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    # x tile [BLOCK_M, BLOCK_K]; A^T tile [BLOCK_K, BLOCK_R] read from A [R, K] (element (k, r) at A[r, k])
    x_ptrs = X + rows[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    a_ptrs = (A + slot.to(tl.int64) * stride_al + offs_r[None, :] * stride_ar
              + (k_begin + offs_k)[:, None] * stride_ak)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < k_end
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    return acc


@triton.jit
def _add_into_rows(Y, rows, m_ok, offs_n, n_ok, acc, stride_ym, stride_yn):
    """Y[rows, offs_n] = Y + acc, the sum in fp32, stored in Y's dtype (rows where m_ok, columns where n_ok)."""
    y_ptrs = Y + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_ok = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=y_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(Y.dtype.element_ty), mask=y_ok)


@triton.jit
def _lora_shrink_kernel(X, A, S_OUT, SEG_STARTS, SEG_LENS, SEG_SLOTS, K, R, K_PER_SPLIT,
                        stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_sm, stride_sr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                        SPLIT_K: tl.constexpr, ZERO_SKIPPED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (seg, m, k): S_OUT[rows, :R] (+)= X[rows, K range] @ A[slot, :, K range]^T for rows
    seg_start + m*BLOCK_M .. of the segment, K range = k*K_PER_SPLIT .. + K_PER_SPLIT (all of K when SPLIT_K = 1).
    ZERO_SKIPPED (with SPLIT_K = 1, into an uninitialised S_OUT): a slot -1 segment stores zeros into its rows."""
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(SEG_SLOTS + seg)
    seg_len = tl.load(SEG_LENS + seg)
    if pid_m * BLOCK_M >= seg_len:
        return  # past the segment's end
    start = tl.load(SEG_STARTS + seg)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seg_len
    rows = (start + offs_m).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    s_ptrs = S_OUT + rows[:, None] * stride_sm + offs_r[None, :] * stride_sr
    s_ok = m_ok[:, None] & (offs_r < R)[None, :]
    if slot < 0:  # no adapter: its rows stay zero (a zeroed S_OUT), or are zeroed here
        if ZERO_SKIPPED:
            tl.store(s_ptrs, tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32), mask=s_ok)
        return
    k_begin = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    acc = _shrink_rows(X, A, rows, m_ok, slot, k_begin, k_end, R, stride_xm, stride_xk, stride_al, stride_ar,
                       stride_ak, BLOCK_M, BLOCK_K, BLOCK_R, DOT_PRECISION)
    if SPLIT_K == 1:
        tl.store(s_ptrs, acc, mask=s_ok)
    else:
        tl.atomic_add(s_ptrs, acc, mask=s_ok, sem="relaxed")  # the splits of one tile add into zeros


@triton.jit
def _lora_expand_kernel(S_IN, B, Y, SEG_STARTS, SEG_LENS, SEG_SLOTS, N, R,
                        stride_sm, stride_sr, stride_bl, stride_bn, stride_br, stride_ym, stride_yn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """Program (seg, m, n): Y[rows, cols] += S_IN[rows, :R] @ B[slot, cols, :R]^T in fp32, stored in Y's dtype, for
    rows seg_start + m*BLOCK_M .. of the segment and cols n*BLOCK_N .. + BLOCK_N."""
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(SEG_SLOTS + seg)
    seg_len = tl.load(SEG_LENS + seg)
    if (slot < 0) | (pid_m * BLOCK_M >= seg_len):
        return  # no adapter (its rows of y untouched), or past the segment's end
    start = tl.load(SEG_STARTS + seg)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seg_len
    rows = (start + offs_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    b_base = B + slot.to(tl.int64) * stride_bl + offs_n[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):  # one pass for a rank up to 64
        r_ok = (r0 + offs_r) < R
        s = tl.load(S_IN + rows[:, None] * stride_sm + (r0 + offs_r)[None, :] * stride_sr,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        # B^T tile [BLOCK_R, BLOCK_N] read from B [N, R] (element (r, n) at B[n, r]), widened to fp32
        b = tl.load(b_base + (r0 + offs_r)[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(s, b, acc, input_precision=DOT_PRECISION)
    _add_into_rows(Y, rows, m_ok, offs_n, n_ok, acc, stride_ym, stride_yn)


@triton.jit
def _lora_fused_kernel(X, A, B, Y, SEG_STARTS, SEG_LENS, SEG_SLOTS, K, N, R,
                       stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_bl, stride_bn, stride_br,
                       stride_ym, stride_yn,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       SHRINK_PRECISION: tl.constexpr, EXPAND_PRECISION: tl.constexpr):
    """Program (seg, m, n): Y[rows, cols] += (X[rows, :] @ A[slot]^T) @ B[slot, cols, :R]^T for rows
    seg_start + m*BLOCK_M .. of the segment and cols n*BLOCK_N .. + BLOCK_N: the whole shrink over K (fp32, kept in
    registers; every n program of a row tile computes it again), then this program's N tile of the expand."""
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(SEG_SLOTS + seg)
    seg_len = tl.load(SEG_LENS + seg)
    if (slot < 0) | (pid_m * BLOCK_M >= seg_len):
        return  # no adapter (its rows of y untouched), or past the segment's end
    start = tl.load(SEG_STARTS + seg)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seg_len
    rows = (start + offs_m).to(tl.int64)
    s = _shrink_rows(X, A, rows, m_ok, slot, 0, K, R, stride_xm, stride_xk, stride_al, stride_ar, stride_ak,
                     BLOCK_M, BLOCK_K, BLOCK_R, SHRINK_PRECISION)  # [BLOCK_M, BLOCK_R], zero past R
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    # B^T tile [BLOCK_R, BLOCK_N] read from B [N, R] (element (r, n) at B[n, r]), widened to fp32
    b = tl.load(B + slot.to(tl.int64) * stride_bl + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=(offs_r < R)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    acc = tl.dot(s, b, input_precision=EXPAND_PRECISION)
    _add_into_rows(Y, rows, m_ok, offs_n, n_ok, acc, stride_ym, stride_yn)


# ---------------------------------------------------------------------------------------------------- checks


def _check_segment_arrays(fn: str, seg_starts, seg_lens, seg_slots, max_seg_len, device: torch.device) -> int:
    """The segment arrays' types and shapes (no values read); returns S."""
    arrays = {"seg_starts": seg_starts, "seg_lens": seg_lens, "seg_slots": seg_slots}
    for name, arr in arrays.items():
        if not isinstance(arr, torch.Tensor) or arr.dim() != 1 or arr.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{fn}: {name} must be a 1-D int32 (or int64) tensor, got "
                             f"{getattr(arr, 'dtype', type(arr).__name__)} {tuple(getattr(arr, 'shape', ()))}")
        if arr.device != device:
            raise ValueError(f"{fn}: {name} is on {arr.device}, the activations on {device}")
    lens = {name: arr.shape[0] for name, arr in arrays.items()}
    if len(set(lens.values())) != 1:
        raise ValueError(f"{fn}: seg_starts, seg_lens and seg_slots must have the same length S, got {lens}")
    if isinstance(max_seg_len, bool) or not isinstance(max_seg_len, int) or max_seg_len < 0:
        raise ValueError(f"{fn}: max_seg_len must be a host int >= 0, got {max_seg_len!r}")
    return seg_starts.shape[0]


def check_segments(seg_starts: torch.Tensor, seg_lens: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int,
                   num_tokens: int, num_slots: int) -> None:
    """Raise ValueError unless the segments' values are valid: every slot in [-1, num_slots), every length in
    [0, max_seg_len], every segment inside [0, num_tokens), no two non-empty segments overlapping. Reads the arrays
    back (a device sync on a GPU): lora_shrink / lora_expand run it themselves only for CPU arrays."""
    starts, lens, slots = seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist()
    for i, (start, length, slot) in enumerate(zip(starts, lens, slots)):
        if not -1 <= slot < num_slots:
            raise ValueError(f"seg_slots[{i}] = {slot} is out of range: a slot must be in [-1, {num_slots}) "
                             f"(L = {num_slots} adapter slots; -1 = no adapter)")
        if not 0 <= length <= max_seg_len:
            raise ValueError(f"seg_lens[{i}] = {length} is out of range [0, max_seg_len = {max_seg_len}]")
        if start < 0 or start + length > num_tokens:
            raise ValueError(f"segment {i} covers rows [{start}, {start + length}), outside the batch's "
                             f"[0, T = {num_tokens}) (seg_starts[{i}] = {start}, seg_lens[{i}] = {length})")
    spans = sorted((start, start + length, i) for i, (start, length) in enumerate(zip(starts, lens)) if length > 0)
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"segments {i} and {j} overlap (segment {j} starts at row {start}, segment {i} ends "
                             f"at row {end}): each row must belong to at most one segment")


def _check_x_a(fn: str, x, lora_a) -> None:
    """x [T, K] and lora_a [L, R, K]: float, the same dtype and device, agreeing on K."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: x must be a 2-D [T, K] fp16 / bf16 / fp32 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 3:
        raise ValueError(f"{fn}: lora_a must be a 3-D [L, R, K] tensor, got {tuple(getattr(lora_a, 'shape', ()))}")
    if x.shape[1] != lora_a.shape[2] or lora_a.shape[1] < 1 or x.shape[1] < 1:
        raise ValueError(f"{fn}: x [T, K] and lora_a [L, R, K] must agree on K >= 1 with R >= 1, got x "
                         f"{tuple(x.shape)} and lora_a {tuple(lora_a.shape)}")
    if lora_a.dtype != x.dtype:
        raise ValueError(f"{fn}: lora_a's dtype {lora_a.dtype} must equal x's {x.dtype}")
    if lora_a.device != x.device:
        raise ValueError(f"{fn}: lora_a is on {lora_a.device}, x on {x.device}")


def _check_y_b(fn: str, lora_b, y) -> None:
    """y [T, N] and lora_b [L, N, R]: float, the same dtype, agreeing on N (devices: the caller's check)."""
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{fn}: y must be a 2-D [T, N] fp16 / bf16 / fp32 tensor, got "
                         f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    if not isinstance(lora_b, torch.Tensor) or lora_b.dim() != 3 or lora_b.shape[2] < 1:
        raise ValueError(f"{fn}: lora_b must be a 3-D [L, N, R] tensor with R >= 1, got "
                         f"{tuple(getattr(lora_b, 'shape', ()))}")


def _check_b_agrees(fn: str, lora_b, y) -> None:
    if y.shape[1] != lora_b.shape[1]:
        raise ValueError(f"{fn}: y must be [T, N] with N = lora_b.shape[1] = {lora_b.shape[1]}, got y "
                         f"{tuple(y.shape)}")
    if lora_b.dtype != y.dtype:
        raise ValueError(f"{fn}: lora_b's dtype {lora_b.dtype} must equal y's {y.dtype}")


def _check_segments_of(fn: str, seg_starts, seg_lens, seg_slots, max_seg_len, device: torch.device, num_tokens: int,
                       num_slots: int) -> None:
    """The segment arrays' types and shapes; their values too when they are on the CPU (no device sync)."""
    _check_segment_arrays(fn, seg_starts, seg_lens, seg_slots, max_seg_len, device)
    if device.type == "cpu":
        check_segments(seg_starts, seg_lens, seg_slots, max_seg_len, num_tokens, num_slots)


def _check_shrink(fn: str, x, lora_a, seg_starts, seg_lens, seg_slots, max_seg_len) -> None:
    _check_x_a(fn, x, lora_a)
    _check_segments_of(fn, seg_starts, seg_lens, seg_slots, max_seg_len, x.device, x.shape[0], lora_a.shape[0])


def _check_expand(fn: str, s, lora_b, seg_starts, seg_lens, seg_slots, max_seg_len, y) -> None:
    _check_y_b(fn, lora_b, y)
    num_tokens, rank = y.shape[0], lora_b.shape[2]
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != (num_tokens, rank):
        raise ValueError(f"{fn}: s must be the float32 [T, R] = [{num_tokens}, {rank}] output of lora_shrink, got "
                         f"{getattr(s, 'dtype', type(s).__name__)} {tuple(getattr(s, 'shape', ()))}")
    _check_b_agrees(fn, lora_b, y)
    for name, t in (("s", s), ("lora_b", lora_b)):
        if t.device != y.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, y on {y.device}")
    _check_segments_of(fn, seg_starts, seg_lens, seg_slots, max_seg_len, y.device, num_tokens, lora_b.shape[0])


def _check_fused(fn: str, x, lora_a, lora_b, seg_starts, seg_lens, seg_slots, max_seg_len, y) -> None:
    _check_x_a(fn, x, lora_a)
    _check_y_b(fn, lora_b, y)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: x [T, K] and y [T, N] must have the same T, got x {tuple(x.shape)} and y "
                         f"{tuple(y.shape)}")
    if lora_b.shape[0] != lora_a.shape[0] or lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(f"{fn}: lora_a [L, R, K] and lora_b [L, N, R] must agree on L and R, got lora_a "
                         f"{tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)}")
    _check_b_agrees(fn, lora_b, y)
    for name, t in (("lora_b", lora_b), ("y", y)):
        if t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, x on {x.device}")
    _check_segments_of(fn, seg_starts, seg_lens, seg_slots, max_seg_len, x.device, x.shape[0], lora_a.shape[0])


# ---------------------------------------------------------------------------------------------------- launches


def _block_m(max_seg_len: int, block_r: int) -> int:
    """Rows per program: a decode segment (1 to 8 tokens) wastes least at 16, a prefill amortises B / A tiles at
    64; a large rank shrinks it so the [BLOCK_M, BLOCK_R] fp32 tile stays at most 64 x 64."""
    bm = 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64
    return max(16, min(bm, 4096 // block_r))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact for fp32 operands of fp32 tensors; TF32 for the fp32 operands the kernels
    widen 16-bit ones to (no worse than the 16-bit store that follows; ignored for 16-bit operands)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _shrink_blocks(max_seg_len: int, k: int, rank: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_R) of the shrink (lora_shrink's and lora_fused's): all R columns in one program, the
    [BLOCK_K, BLOCK_R] A tile at most 8,192 elements."""
    block_r = max(16, triton.next_power_of_2(rank))
    return _block_m(max_seg_len, block_r), max(16, min(128, triton.next_power_of_2(k), 8192 // block_r)), block_r


def _fused_blocks(max_seg_len: int, k: int, n: int, rank: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N, BLOCK_R) of lora_fused: the shrink's tiles as lora_shrink picks them; BLOCK_N as
    lora_expand's but with the [BLOCK_R, BLOCK_N] fp32 B tile at most 8,192 elements (64 registers a thread at 4
    warps), since the fused kernel holds all R columns at once where lora_expand loops over 64 at a time."""
    block_m, block_k, block_r = _shrink_blocks(max_seg_len, k, rank)
    block_n = max(16, min(128 if block_m <= 32 else 64, triton.next_power_of_2(n), 8192 // block_r))
    return block_m, block_k, block_n, block_r


# lora_fused's budget of L2 traffic beyond shrink + expand's, and the longest K it walks (see lora_fused_pays)
FUSED_REREAD_BUDGET = 8 << 20
FUSED_MAX_K = 2048


def lora_fused_pays(num_segments: int, max_seg_len: int, k: int, n: int, rank: int, element_size: int = 2) -> bool:
    """Whether one lora_fused launch should replace lora_shrink + lora_expand for a [T, K] -> [T, N] layer of rank R
    (the stacked rank, R_total) over `num_segments` segments of at most `max_seg_len` rows; host ints only.

    What fusing saves is fixed: a launch (the expand's), shrink's memset or split-K atomics, and the fp32 [T, R]
    round trip; a few microseconds per adapted layer inside a CUDA graph, most of a decode step's LoRA cost. What it
    costs grows with the batch: each of the cdiv(N, BLOCK_N) programs of a row tile redoes that tile's shrink, so
    A[slot] ([R, K]) and the tile's x rows are read cdiv(N, BLOCK_N) times instead of once (from L2: a few hundred
    KB per slot), plus the recomputed flops. The rule bounds that extra traffic,

        num_segments * cdiv(max_seg_len, BLOCK_M) * (cdiv(N, BLOCK_N) - 1) * (R + min(max_seg_len, BLOCK_M)) * K
            * element_size  <=  FUSED_REREAD_BUDGET (8 MiB)

    an upper bound (slot -1 segments and short segments' empty tiles read nothing). 8 MiB of L2 reads take ~1.5-2 us
    on an H100 spread over its SMs, below the launch saved. And K at most FUSED_MAX_K: a fused program walks all of K
    alone, where shrink splits it across programs. Timed inside CUDA graphs on an H100 (2026-12-06, bf16, 20 calls
    per graph, benchmarks/probe_lora_graphs.py): SmolLM2-135M's layers at rank 16 (K 576 / 1536) take 3.5-5.3 us
    fused against 5.7-7.1 for the two kernels at 1-16 decode rows; Llama-3-8B's (K 4096 / 14336) 10-29 us fused
    against 6.1-6.8 even at one row. So decode batches of small models fuse (qkv up to ~21 sequences, o_proj ~100,
    gate_up ~9, down ~40), wide or deep layers and prefills keep the two kernels."""
    if num_segments <= 0 or max_seg_len <= 0:
        return True  # nothing to launch either way
    if k > FUSED_MAX_K:
        return False
    block_m, _, block_n, _ = _fused_blocks(max_seg_len, k, n, rank)
    extra = (num_segments * triton.cdiv(max_seg_len, block_m) * (triton.cdiv(n, block_n) - 1)
             * (rank + min(max_seg_len, block_m)) * k * element_size)
    return extra <= FUSED_REREAD_BUDGET


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
                seg_slots: torch.Tensor, max_seg_len: int, *, split_k: int | None = None,
                rows_covered: bool = False) -> torch.Tensor:
    """s = float32 [T, R]: s[t] = x[t] @ lora_a[slot]^T for the rows t of every segment whose slot is >= 0, zero for
    the other rows (slot -1 segments, rows in no segment).

    x [T, K] fp16 / bf16 / fp32 (any strides); lora_a [L, R, K] of x's dtype (any strides); the segment arrays
    int32 [S] on x's device (see the module docstring); max_seg_len >= every seg_lens value. split_k: programs per
    K range (None: enough to fill the GPU's SMs, 1 off CUDA); above 1 the partial sums meet through fp32 atomics,
    whose order varies between runs, so pass 1 for bit-reproducible results. rows_covered: the caller promises that
    every row 0..T-1 lies in some segment (a decode graph's one segment per row, padding rows of slot -1): then,
    when K is not split, s is allocated uninitialised and every row written by the kernel (zeros for slot -1),
    saving the zeroing memset; a broken promise leaves garbage in the uncovered rows (checked on CPU arrays)."""
    _check_shrink("lora_shrink", x, lora_a, seg_starts, seg_lens, seg_slots, max_seg_len)
    num_tokens, k = x.shape
    rank = lora_a.shape[1]
    num_segs = seg_starts.shape[0]
    if rows_covered and seg_lens.device.type == "cpu" and int(seg_lens.sum()) != num_tokens:
        raise ValueError(f"lora_shrink: rows_covered=True, but the segments cover {int(seg_lens.sum())} of the "
                         f"T = {num_tokens} rows")
    if num_tokens == 0 or num_segs == 0 or max_seg_len == 0:
        return torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)
    block_m, block_k, block_r = _shrink_blocks(max_seg_len, k, rank)
    grid_m = triton.cdiv(max_seg_len, block_m)
    k_tiles = triton.cdiv(k, block_k)
    if split_k is None:  # each split walks at least 4 K tiles; only as many as it takes to cover the SMs
        split_k = 1 if not x.is_cuda else max(1, min(triton.cdiv(k_tiles, 4), num_sms(x.device) // (num_segs * grid_m)))
    if isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"lora_shrink: split_k must be an int >= 1 (or None), got {split_k!r}")
    k_per_split = triton.cdiv(k_tiles, min(split_k, k_tiles)) * block_k  # whole tiles per split
    split = triton.cdiv(k, k_per_split)  # no empty splits
    zero_skipped = rows_covered and split == 1  # every row stored by its program: no memset
    out = (torch.empty if zero_skipped else torch.zeros)(num_tokens, rank, dtype=torch.float32, device=x.device)
    seg_starts, seg_lens, seg_slots = seg_starts.contiguous(), seg_lens.contiguous(), seg_slots.contiguous()
    _lora_shrink_kernel[(num_segs, grid_m, split)](
        x, lora_a, out, seg_starts, seg_lens, seg_slots, k, rank, k_per_split,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, SPLIT_K=split, ZERO_SKIPPED=zero_skipped,
        DOT_PRECISION=_precision(x.dtype), num_warps=4)
    return out


def lora_expand(s: torch.Tensor, lora_b: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
                seg_slots: torch.Tensor, max_seg_len: int, y: torch.Tensor) -> None:
    """In place: y[t] += s[t] @ lora_b[slot]^T for the rows t of every segment whose slot is >= 0 (the sum in fp32,
    stored in y's dtype); the other rows of y are not written.

    s float32 [T, R] (lora_shrink's output; any strides); lora_b [L, N, R] of y's dtype (any strides); y [T, N]
    fp16 / bf16 / fp32, any strides (a column slice of a wider output is fine); the segment arrays as in
    lora_shrink. Segments must not overlap (two programs would add into the same rows)."""
    _check_expand("lora_expand", s, lora_b, seg_starts, seg_lens, seg_slots, max_seg_len, y)
    num_tokens, n = y.shape
    rank = lora_b.shape[2]
    num_segs = seg_starts.shape[0]
    if num_tokens == 0 or num_segs == 0 or max_seg_len == 0 or n == 0:
        return
    block_r = max(16, min(64, triton.next_power_of_2(rank)))  # the kernel loops over ranks above 64
    block_m = 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64
    block_n = max(16, min(128 if block_m <= 32 else 64, triton.next_power_of_2(n)))
    seg_starts, seg_lens, seg_slots = seg_starts.contiguous(), seg_lens.contiguous(), seg_slots.contiguous()
    grid = (num_segs, triton.cdiv(max_seg_len, block_m), triton.cdiv(n, block_n))
    _lora_expand_kernel[grid](
        s, lora_b, y, seg_starts, seg_lens, seg_slots, n, rank,
        s.stride(0), s.stride(1), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, DOT_PRECISION=_precision(y.dtype), num_warps=4)


def lora_fused(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, seg_starts: torch.Tensor,
               seg_lens: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int, y: torch.Tensor) -> None:
    """In place, one launch: y[t] += (x[t] @ lora_a[slot]^T) @ lora_b[slot]^T for the rows t of every segment whose
    slot is >= 0 (the shrink summed in fp32 over all of K and kept in fp32, the expand's sum in fp32, stored in y's
    dtype); the other rows of y are not written. lora_shrink then lora_expand, without the [T, R] intermediate,
    its memset and the second launch: for decode-sized batches (lora_fused_pays says when it pays).

    x [T, K] and lora_a [L, R, K] as in lora_shrink; lora_b [L, N, R] and y [T, N] as in lora_expand (y any strides,
    a column slice of a wider output is fine; x and y may differ in dtype); the segment arrays as in both. Grid
    (S, cdiv(max_seg_len, BLOCK_M), cdiv(N, BLOCK_N)): each (row tile, N tile) of y belongs to one program (no
    atomics, the result is bit-reproducible), which computes its rows' shrink itself."""
    _check_fused("lora_fused", x, lora_a, lora_b, seg_starts, seg_lens, seg_slots, max_seg_len, y)
    (num_tokens, k), n = x.shape, y.shape[1]
    rank = lora_a.shape[1]
    num_segs = seg_starts.shape[0]
    if num_tokens == 0 or num_segs == 0 or max_seg_len == 0 or n == 0:
        return
    block_m, block_k, block_n, block_r = _fused_blocks(max_seg_len, k, n, rank)
    seg_starts, seg_lens, seg_slots = seg_starts.contiguous(), seg_lens.contiguous(), seg_slots.contiguous()
    grid = (num_segs, triton.cdiv(max_seg_len, block_m), triton.cdiv(n, block_n))
    _lora_fused_kernel[grid](
        x, lora_a, lora_b, y, seg_starts, seg_lens, seg_slots, k, n, rank,
        x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_R=block_r,
        SHRINK_PRECISION=_precision(x.dtype), EXPAND_PRECISION=_precision(y.dtype), num_warps=4)


# ---------------------------------------------------------------------------------------------------- references


def lora_shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
                          seg_slots: torch.Tensor, max_seg_len: int) -> torch.Tensor:
    """lora_shrink in plain torch, one fp32 matmul per segment: the same arguments, checks and result (float32
    [T, R], zero outside the segments of slot >= 0)."""
    _check_shrink("lora_shrink_reference", x, lora_a, seg_starts, seg_lens, seg_slots, max_seg_len)
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist()):
        if slot < 0 or length == 0:
            continue
        out[start:start + length] = x[start:start + length].float() @ lora_a[slot].float().T
    return out


def lora_expand_reference(s: torch.Tensor, lora_b: torch.Tensor, seg_starts: torch.Tensor, seg_lens: torch.Tensor,
                          seg_slots: torch.Tensor, max_seg_len: int, y: torch.Tensor) -> None:
    """lora_expand in plain torch, one fp32 matmul per segment: y[rows] = (y[rows] + s[rows] @ B^T) in fp32, stored
    in y's dtype, in place; rows of slot -1 (or in no segment) untouched."""
    _check_expand("lora_expand_reference", s, lora_b, seg_starts, seg_lens, seg_slots, max_seg_len, y)
    for start, length, slot in zip(seg_starts.tolist(), seg_lens.tolist(), seg_slots.tolist()):
        if slot < 0 or length == 0:
            continue
        rows = slice(start, start + length)
        y[rows] = (y[rows].float() + s[rows] @ lora_b[slot].float().T).to(y.dtype)


def lora_fused_reference(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, seg_starts: torch.Tensor,
                         seg_lens: torch.Tensor, seg_slots: torch.Tensor, max_seg_len: int, y: torch.Tensor) -> None:
    """lora_fused in plain torch: lora_shrink_reference then lora_expand_reference (the same arguments and checks)."""
    _check_fused("lora_fused_reference", x, lora_a, lora_b, seg_starts, seg_lens, seg_slots, max_seg_len, y)
    s = lora_shrink_reference(x, lora_a, seg_starts, seg_lens, seg_slots, max_seg_len)
    lora_expand_reference(s, lora_b, seg_starts, seg_lens, seg_slots, max_seg_len, y)
