"""The split-KV merge of paged decode attention (flash-decoding's phase 2), in Triton and in torch (chapter 4).

paged_attention.py's split kernel (phase 1) cuts each sequence's keys into `num_splits` contiguous ranges, one
program each, and each program writes a partial output normalised by its own softmax sum plus the log-sum-exp
(lse) of its scores. Phase 2 merges the partials exactly:

    lse = log(sum_s exp(lse_s)),   out = sum_s exp(lse_s - lse) * out_s

which is the online-softmax rescaling of flash_attention.py applied once, at the end, across programs
(merge_lse below is the same formula for two partials, in torch: chapter 4's exercise). _merge_row merges one
(query token, head) row over any number of splits; _merge_splits_kernel runs it as a kernel of its own, the
default, launched by paged_decode_attention after the split kernel.

Phase 2 inside phase 1 (the fused merge). As a kernel of its own, the merge cost a launch and a kernel boundary
per layer (on the H200 at batch 1: 1.65 us of merge after 4.4 us of split kernel, 32 times a step), while its
work is a few KB per head. But no program can merge before every split of its head has finished, and programs
of one launch cannot wait for each other (nothing guarantees they are resident together). So the program that
finishes *last* does it, as split-K GEMMs do (int4_mma.py's split_k_store):
  * each program writes its partial and lse, then bumps an int32 arrival counter of its (sequence, kv head, row
    tile) with an atomic add; the one that reads back num_splits - 1 knows every other partial is written, and
    merges the tile's rows into the output, one row at a time (_merge_row: the code the two-kernel path runs);
  * memory ordering: the partial is stored by all of the program's threads, the counter bumped by one. A
    barrier (tl.debug_barrier) first makes every thread's stores part of that thread's view, and the atomic's
    acq_rel semantics at GPU scope publish them (release) and, in the last program, make the others' visible
    (acquire). Its loads of the partials are `.cg`, served by L2, the point of coherence: an SM's L1 is not
    kept coherent with stores from other SMs, and a CUDA-graph replay could otherwise hit lines left from
    the previous replay;
  * the last program sets the counter back to 0 (atomic exchange), so the next call, or the next replay of a
    graph that recorded this launch, starts from zero without a memset kernel. The counters are one zeroed
    buffer per device, grown outside CUDA-graph capture only (warm a call up before recording it: a capture that
    would need more counters raises).
The price: the merge is serial at the tail, the last program reading its rows' partials alone (32 splits x 4
heads x 512 B = 64 KB at batch 1) where the merge kernel spread them over 128 programs. Measured on the H200
(2026-12-03, benchmarks/bench_decode_merge.py, CUDA graphs, Llama-3-8B attention) that price is larger than the
launch it saves: the fused merge was 3.5-4 us *slower* per call at every batch and context where the rule splits
(batch 1: 9.9 vs 6.2 us at 512 keys, 16.5 vs 12.5 at 4k; batch 8 x 4k: 46.9 vs 43.2), so the two kernels stay
the default and fused_merge=True is the experiment, kept for the lesson: a launch saved is not time saved when
the work it held becomes a serial tail.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minillm.hooks import dispatch
from minillm.kernels.decode_split_rule import MAX_SPLITS
from minillm.kernels.pdl import grid_dependency_sync


@triton.jit
def _merge_row(O_PART, LSE_PART, OUT, part_row, lse_row, out_row, offs_d, d_ok, stride_ps, num_splits,
               CHUNK_S: tl.constexpr):
    """Merge the split partials of one (query token, head) row over the head_dim slice offs_d:
    out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max lse). part_row / lse_row / out_row: the row's
    offsets into O_PART (split 0), LSE_PART (split 0) and OUT.

    The splits are walked CHUNK_S at a time with the online-softmax rescaling (a running max m, the total
    weight and the weighted sum are rescaled by exp(m_old - m_new) when a larger lse arrives), so 64 or 128
    splits never hold a [splits, head_dim] fp32 tile in registers, and the split count is not a compile-time
    constant. An empty split (lse -inf) weighs 0; a row with no key at all gets 0, never nan. The loads are
    `.cg` (cached in L2 only): the partials were written by programs on other SMs, whose stores an SM's L1
    does not see.
    """
    offs_s = tl.arange(0, CHUNK_S)
    m = float("-inf")
    total = 0.0
    acc = tl.zeros(offs_d.shape, dtype=tl.float32)
    for s0 in range(0, num_splits, CHUNK_S):
        s_ok = s0 + offs_s < num_splits
        lse = tl.load(LSE_PART + lse_row + s0 + offs_s, mask=s_ok, other=float("-inf"), cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all splits so far empty: weights stay 0
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)  # an empty split weighs exp(-inf) = 0
        part = part_row + (s0 + offs_s) * stride_ps
        o = tl.load(O_PART + part[:, None] + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0,
                    cache_modifier=".cg")
        acc = acc * alpha + tl.sum(o * w[:, None], 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + out_row + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "num_splits"])
def _merge_splits_kernel(O_PART, LSE_PART, OUT, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                         stride_ob, stride_oh, num_splits, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         CHUNK_S: tl.constexpr, PDL: tl.constexpr = False):
    """The merge as a second kernel (the default; fused_merge=True runs _merge_row in the split kernel instead):
    one program per (query token, head, BLOCK_D slice of head_dim).
    Slicing head_dim gives a batch-1 merge more than one program per head."""
    grid_dependency_sync(PDL)
    token = tl.program_id(0).to(tl.int64)  # a query token (one per sequence, or q_len per sequence)
    head = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    _merge_row(O_PART, LSE_PART, OUT, token * stride_pb + head * stride_ph, token * stride_lb + head * stride_lh,
               token * stride_ob + head * stride_oh, offs_d, offs_d < HEAD_DIM, stride_ps, num_splits, CHUNK_S)


# Arrival counters of the fused merge: one int32 per (sequence, kv head, row tile) of a launch, zero between launches
# (the last program of each puts its counter back to 0). One buffer per device, shared by every call on it: calls on
# one stream run one after another, which is how the engine runs its layers (two streams running decode attention
# on one device at the same time would need a buffer each).
_ARRIVALS: dict[torch.device, torch.Tensor] = {}
# Outgrown buffers are kept, never freed: a CUDA graph captured earlier still points at its buffer, and a replay
# must not count into memory the allocator has handed to someone else.
_RETIRED_ARRIVALS: list[torch.Tensor] = []
MIN_ARRIVALS = 4096  # entries of a first buffer (16 KB): batch 512 x 8 kv heads without growing
MERGE_ELEMENTS_PER_THREAD = 32  # fp32 partials a thread loads per merge step (sets CHUNK_S)


def _arrival_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """A zeroed int32 buffer of at least `needed` counters on `device`, or None while a CUDA graph is being
    captured and the buffer is too small: allocating then would put it in the graph's private pool (and the
    engine warms every graph shape up first, which grows the buffer outside the capture)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _ARRIVALS.get(device)
    if buf is not None and buf.numel() >= needed:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if buf is not None:
        _RETIRED_ARRIVALS.append(buf)
    size = max(needed, MIN_ARRIVALS, 2 * buf.numel() if buf is not None else 0)
    _ARRIVALS[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return _ARRIVALS[device]


def _merge_chunk(block_d: int, num_warps: int) -> int:
    """CHUNK_S of the fused merge: splits per merge step, [CHUNK_S, BLOCK_D] fp32 partials within
    MERGE_ELEMENTS_PER_THREAD values a thread, at most MAX_SPLITS (the rule's 32 splits in one step). It does not
    depend on the split count: one compiled variant serves every count."""
    chunk_s = 2
    while chunk_s < MAX_SPLITS and 2 * chunk_s * block_d <= MERGE_ELEMENTS_PER_THREAD * 32 * num_warps:
        chunk_s *= 2
    return chunk_s


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two attentions of the same queries over disjoint key sets: out [T, H, D], lse fp32 [H, T].

    Returns (out, lse) as if one softmax had seen both key sets (e.g. a cached prefix and the new chunk,
    or two KV splits). A side with lse = -inf (no keys) weighs 0; both -inf gives out = 0, lse = -inf.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape:
        raise ValueError(f"shapes differ: out {tuple(out_a.shape)} vs {tuple(out_b.shape)}, "
                         f"lse {tuple(lse_a.shape)} vs {tuple(lse_b.shape)}")
    if out_a.dim() != 3 or lse_a.shape != (out_a.shape[1], out_a.shape[0]):
        raise ValueError(f"need out [T, H, D] and lse [H, T], got {tuple(out_a.shape)} and {tuple(lse_a.shape)}")
    return dispatch("ch04.merge_lse", merge_lse)(out_a, lse_a, out_b, lse_b)


# >>> exercise ch04.merge_lse
def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions of the same queries over disjoint key sets A and B: returns (out, lse).

    out_a, out_b [T, H, D]: each side's softmax-weighted values, normalised by its own softmax sum;
    lse_a, lse_b [H, T]: the natural-log log-sum-exp of each side's scaled scores. The merge is exact:
    lse = log(exp(lse_a) + exp(lse_b)) and out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b
    (compute it without overflow: never exp() a large lse on its own). A side with lse = -inf saw no key and
    weighs 0; both -inf gives out = 0 and lse = -inf, never nan. Math in fp32; out in out_a's dtype, lse fp32.
    """
    # >>> solution
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)  # [H, T]
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)  # keeps -inf - -inf away
    w_a = torch.exp(lse_a - safe).T.unsqueeze(-1)  # [T, H, 1]: the share of side A's softmax mass
    w_b = torch.exp(lse_b - safe).T.unsqueeze(-1)
    out = out_a.float() * w_a + out_b.float() * w_b
    return out.to(out_a.dtype), lse
    # <<< solution
# <<< exercise
