# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 4 — Decode kernels: split-KV, fusion and CUDA graphs
#
# Chapter 3's FlashAttention is built for prefill: many queries, so every K/V tile loaded is reused by a whole
# query tile. Decode has **one** query per sequence. This chapter looks at what that changes:
#
# 1. why decode attention is memory-bound, whatever the kernel;
# 2. **paged decode with split-KV** (flash-decoding): cutting each sequence's keys among several programs to keep
#    the whole GPU busy, and merging the partial results exactly (exercise `ch04.merge_lse`);
# 3. **fusion**: the small element-wise kernels around attention move bytes, not FLOPs, so the only way to speed
#    them up is to move fewer: one pass instead of several (exercise `ch04.rms_norm_kernel`, a Triton kernel);
# 4. **CUDA graphs**: when each kernel is a few microseconds, launching it costs as much as running it;
# 5. the linear layers at decode: a **GEMV**, and why its best tile depends on the matrix and the rows;
# 6. interview questions, one a number you compute (exercise `ch04.decode_step_floor_s`).
#
# Write the exercises in `exercises/ch04_decode_and_fusion.py`, then `minillm grade ch04`. On this CPU the Triton
# kernels run through the interpreter at tiny sizes (correctness only); the GPU cells quote our H100 recordings
# and use the H200's measured roofline (shared/GPU.md: 4.24 TB/s copy, ~700 TFLOP/s bf16 GEMM).

# %%
import math

import matplotlib.pyplot as plt
import torch

from minillm.bench import roofline
from minillm.course.impl import load_chapter_module, load_function
from minillm.kernels import flash_attention as fa
from minillm.kernels import fused
from minillm.kernels import paged_attention as pa

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels run natively on a GPU, interpreted here
TOL = 5e-3 if device == "cuda" else 1e-5  # fp32 dots on a GPU go through TF32 tensor cores (~1e-3 relative)
merge_lse = load_function("ch04.merge_lse")
# the kernel exercise is a @triton.jit function; its chapter module also holds its launcher, rms_norm
ch04 = load_chapter_module("ch04.rms_norm_kernel")  # your kernel module, or the reference's until you start

# %% [markdown]
# ## 1. Decode attention reads the whole cache for one query
#
# One decode step of one sequence with `S` cached tokens does `4·S·D` FLOPs per query head (`q·k` and `p·v`)
# and reads `2·S·D` cache elements per kv head. With grouped-query attention, `H / KVH` query heads share each
# kv head, so the arithmetic intensity is about `2·H / KVH` FLOPs per cache element, whatever `S` is: 8 for
# Llama-3-8B (32 / 8 heads), 4 FLOPs per byte in bf16. The H200's ridge point is about 165 FLOPs/byte
# (chapter 1). Prefill reuses each key for every query of the tile, so its intensity grows with the tile.

# %%
# NBVAL_CHECK_OUTPUT
heads, kv_heads, d, bf16 = 32, 8, 128, 2
for name, q_tokens in [("decode, 1 query", 1), ("prefill tile, 128 queries", 128)]:
    for s in (1024, 8192):
        flops = 4 * q_tokens * s * d * heads
        bytes_ = bf16 * (2 * s * d * kv_heads + 2 * q_tokens * d * heads)  # K and V, plus q and out
        intensity = flops / bytes_
        share = roofline.H200_BF16.attainable(intensity) / roofline.H200_BF16.flops
        print(f"{name:<26} S={s:5d}: {intensity:6.1f} FLOPs/byte -> at most {100 * share:5.1f}% of bf16 peak")

# %% [markdown]
# So a decode kernel is judged by **bandwidth**: bytes of K and V read per second, against the ~4.2 TB/s an
# H200 copies (3.0 TB/s on the H100). Two things get in the way: the cache is **paged** (chapter 5: each sequence's tokens live in
# blocks scattered over a pool, found through a block table), and a batch may be too small to keep every SM
# streaming.
#
# `paged_decode_attention` reads K and V through the block table, all query heads of a kv group in one program
# (each K/V tile is read once for the whole group). Here it runs under the interpreter against a plain loop.

# %%
def toy_paged_cache(seq_lens, block_size=4, kv_heads=2, d=16, seed=0):
    """Random K/V in a paged pool with shuffled block tables; returns the pool, tables and contiguous copies."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.full((len(seq_lens), max(blocks_per_seq)), -1, dtype=torch.int32)
    contiguous = []
    for b, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = [free.pop() for _ in range(nb)]
        tables[b, :nb] = torch.tensor(ids, dtype=torch.int32)
        contiguous.append((k_cache[ids].reshape(-1, kv_heads, d)[:n], v_cache[ids].reshape(-1, kv_heads, d)[:n]))
    return k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32), contiguous


def decode_reference(q, contiguous):
    """q [B, H, D]; one softmax over each sequence's keys, GQA by repetition."""
    out = []
    for b, (k, v) in enumerate(contiguous):
        group = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [S, H, D]
        p = torch.softmax(torch.einsum("hd,shd->hs", q[b], kk) / math.sqrt(q.shape[-1]), dim=-1)
        out.append(torch.einsum("hs,shd->hd", p, vv))
    return torch.stack(out)


seq_lens = [1, 13, 40]  # one token, a partial last block, several blocks
k_cache, v_cache, tables, lens, contiguous = toy_paged_cache(seq_lens)
q = torch.randn(3, 4, 16)  # 4 query heads share 2 kv heads

# %%
# NBVAL_CHECK_OUTPUT
want = decode_reference(q, contiguous)
for splits in (1, 2, 4):
    out = pa.paged_decode_attention(*(t.to(device) for t in (q, k_cache, v_cache, tables, lens)), num_splits=splits)
    print(f"num_splits={splits}: paged == reference: {bool((out.cpu() - want).abs().max() < TOL)}")

# %% [markdown]
# ## 2. Split-KV, and the merge that makes it exact
#
# A batch of 8 sequences with 8 kv heads makes 64 programs; an H100 or H200 has 132 SMs that each want several
# programs in flight. With one program per (sequence, kv head), most of the chip idles while a few programs
# walk 4k tokens one after the other. **Flash-decoding** cuts each sequence's keys into `num_splits` ranges,
# one program each; each writes its partial output (normalised by its own softmax sum) and the log-sum-exp
# `lse` of its scores. A second tiny kernel merges them. For two partials over disjoint keys A and B:
#
# $$ \mathrm{lse} = \log(e^{\mathrm{lse}_A} + e^{\mathrm{lse}_B}), \qquad
#    \mathrm{out} = e^{\mathrm{lse}_A - \mathrm{lse}}\,\mathrm{out}_A + e^{\mathrm{lse}_B - \mathrm{lse}}\,\mathrm{out}_B $$
#
# Each side's weight is its share of the total softmax mass: the online softmax's rescaling, done once at the
# end. The same merge joins attention over a cached prefix with attention over a new chunk.
#
# **Exercise `ch04.merge_lse`**: write it (fp32 math, no overflow, an empty side weighs 0). The engine's
# `merge_attention_states` calls it through `dispatch`. Below: attention over 37 keys, as two partials from the
# chapter 3 kernel (`return_lse=True`), merged by your function.

# %%
# NBVAL_CHECK_OUTPUT
T, H, S, D = 5, 4, 37, 16
qv, kv, vv = torch.randn(T, H, D), torch.randn(S, H, D), torch.randn(S, H, D)
cu_q = torch.tensor([0, T], dtype=torch.int32)


def partial(lo, hi):
    cu_k = torch.tensor([0, hi - lo], dtype=torch.int32)
    out, lse = fa.flash_attn_varlen(*(t.to(device) for t in (qv, kv[lo:hi], vv[lo:hi], cu_q, cu_k)), T, hi - lo,
                                    causal=False, return_lse=True)
    return out.cpu(), lse.cpu()


(out_a, lse_a), (out_b, lse_b), (out_full, lse_full) = partial(0, 16), partial(16, S), partial(0, S)
out, lse = merge_lse(out_a, lse_a, out_b, lse_b)
print(f"merged out == one softmax over all 37 keys: {bool((out - out_full).abs().max() < TOL)}")
print(f"merged lse == lse over all keys: {bool((lse - lse_full).abs().max() < TOL)}")
empty = torch.full_like(lse_a, float("-inf"))
out_e, lse_e = merge_lse(out_a, lse_a, torch.zeros_like(out_a), empty)
print(f"merging with an empty side changes nothing (1e-6): {bool((out_e - out_a).abs().max() < 1e-6)}")

# %%
splits = [(0, 10), (10, 20), (20, 30), (30, S)]
parts = [partial(lo, hi) for lo, hi in splits]
merged_out, merged_lse = parts[0]
running = [float(merged_lse[0, 0])]  # head 0, token 0: the lse of the keys merged so far
for out_s, lse_s in parts[1:]:  # fold the splits in one by one with your merge_lse
    merged_out, merged_lse = merge_lse(merged_out, merged_lse, out_s, lse_s)
    running.append(float(merged_lse[0, 0]))
lses = torch.stack([p[1][0, 0] for p in parts])
weights = torch.exp(lses - merged_lse[0, 0])  # each split's share of the softmax mass, from your merged lse
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), layout="constrained")
labels = [f"keys {lo}-{hi - 1}" for lo, hi in splits]
axes[0].bar(labels, lses, color="0.75", label="lse of the split alone")
axes[0].plot(labels, running, "o-", color="C0", label="lse after merging it in (your merge_lse)")
axes[0].axhline(float(lse_full[0, 0]), color="k", ls=":", label="lse over all 37 keys at once")
axes[0].set_ylim(min(0.0, float(lses.min()) - 0.5), max(running + [float(lse_full[0, 0])]) * 1.35 + 0.5)
axes[0].set_title("head 0, token 0: the merged lse climbs to the full one", fontsize=10)
axes[0].legend(fontsize=8, loc="upper left")
axes[1].bar([f"split {i}" for i in range(4)], weights, color="C1")
axes[1].set_title(f"merge weights exp(lse_s - lse): they sum to {float(weights.sum()):.3f}", fontsize=10)
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print(f"4 splits folded with merge_lse == one softmax over all keys: {bool((merged_out - out_full).abs().max() < TOL)}, "
      f"lse: {bool((merged_lse - lse_full).abs().max() < TOL)}")

# %% [markdown]
# How many splits? `choose_decode_config` (fitted to a sweep on the H200) takes the largest power of two that
# keeps batch x kv heads x splits within one wave of 4 programs per SM, with splits of at least 64 keys, or of
# 1024 keys once every SM already has a program (then a split must pay for the merge), and at most 32 splits (more
# partials make the merge a long dependent chain). At batch 64 with 8 kv heads there are already 512 programs:
# one split, and the merge kernel is skipped. It also picks the tile: 128 keys per iteration when the grid is
# thin (at most two programs per SM), so each program keeps more bytes in flight.

# %%
# NBVAL_CHECK_OUTPUT
from minillm.kernels.decode_split_rule import choose_decode_config

num_sms = 132  # H100 SXM and H200 alike
for batch in (1, 8, 64):
    programs = batch * kv_heads
    launch = choose_decode_config(batch, kv_heads, 4096, num_sms)
    print(f"batch {batch:2d} x {kv_heads} kv heads = {programs:3d} programs -> {launch.num_splits:2d} splits, "
          f"{programs * launch.num_splits:4d} programs for {num_sms} SMs, {launch.block_n} keys per tile")

# %% [markdown]
# ## 3. Fusion: move each byte once
#
# Around attention sit small element-wise operations: the residual add and RMSNorm, RoPE, the SwiGLU gate,
# writing K and V into the cache. Each does a few FLOPs per byte, so each runs at memory speed, and the only
# way to make them faster is to touch memory fewer times. Eager torch runs `h = x + residual` and then
# `rms_norm(h)` as separate kernels: the sum goes to memory and comes straight back. A fused kernel reads
# `x` and `residual` once, keeps the sum in registers, and writes the new residual and the normalised output.

# %%
# NBVAL_CHECK_OUTPUT
# row transfers per token (one row = hidden elements), ignoring the small weight vector
ops = {"residual add + RMSNorm": (2 + 1 + 1 + 1, 2 + 2),  # eager: add reads 2, writes 1; norm reads 1, writes 1
       "SwiGLU silu(gate) * up": (1 + 1 + 2 + 1, 2 + 1)}  # eager: silu reads 1, writes 1; mul reads 2, writes 1
for name, (eager, fused_rows) in ops.items():
    print(f"{name:<24} eager {eager} row transfers, fused {fused_rows}: {eager / fused_rows:.2f}x fewer bytes")

# %% [markdown]
# Eager torch also makes temporaries, upcasts to fp32 in separate passes and launches a kernel per operation,
# which is why the measured gains are larger than these byte counts.
#
# **Exercise `ch04.rms_norm_kernel`**: the body of the fused residual + RMSNorm Triton kernel: one program per
# row, load the row (masked: the block is the next power of two of `hidden`), add the residual and store it,
# reduce the sum of squares, scale, store. The launcher `rms_norm` beside it in your chapter module runs it; the
# engine's `minillm.kernels.fused.rms_norm` is the same launcher with the reference kernel.

# %%
# NBVAL_CHECK_OUTPUT
for shape in [(3, 7), (4, 576), (2, 5, 100)]:
    x, res, w = torch.randn(*shape), torch.randn(*shape), torch.randn(shape[-1])
    out = ch04.rms_norm(x.to(device), w.to(device), 1e-5).cpu()
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    out_r, new_res = (t.cpu() for t in ch04.rms_norm(x.to(device), w.to(device), 1e-5, res.to(device)))
    h = x + res
    want_r = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    print(f"x {str(shape):<11} plain: {bool((out - want).abs().max() < TOL)}, "
          f"+residual: {bool((out_r - want_r).abs().max() < TOL)}, residual out: {bool(torch.equal(new_res, h))}")

# %% [markdown]
# ## 4. CUDA graphs
#
# A decode step of SmolLM2 (30 layers) launches a few hundred kernels, each working for a few microseconds at
# small batch. Launching one from Python costs about as much (5-10 µs of CPU time), so the GPU waits on the CPU.
# A **CUDA graph** records the whole step's kernel launches once and replays them with one call: the launch
# cost disappears, but every tensor address and shape is frozen. Engines therefore capture one graph per batch
# size (padding the batch up to the next captured size), keep the inputs in static buffers, and autotune the
# kernels before capturing (chapter 3's kernel autotunes on its first call). While a graph records, CUDA refuses
# anything that is not stream work, and a refused call spoils the recording: the engine records with Python's
# garbage collector paused (`minillm.kernels.hardware.graph_capture`), or a dead engine's graph freed by a
# collection mid-capture takes the new one down. On this CPU there is nothing to capture; the next cell measures
# eager launches against a graph replay on a GPU.
#
# Frozen too: every choice a kernel made from the shapes it saw at capture. Section 2's split-KV kernel picks its
# number of splits from the longest sequence the metadata allows, and a graph's block table is max_model_len wide,
# so a graph captured for 8,192 tokens splits a 100-token context 32 ways (31 splits with nothing to read, plus
# the merge). We built *narrow* graphs for small batches, captured for a 512-token longest sequence and replayed
# while every sequence of the step fits. Measured on the H200 they saved a couple of microseconds per layer, less
# than decode speed varies from run to run, so they were taken out again (minillm/engine/cuda_graph.py tells the
# figures): a fix is worth its capture time and memory only if the clock says so.
#
# Prefill steps do not fit one graph per batch size: their lengths change every step. The engine records two more
# kinds. *Piecewise* graphs (vLLM's idea, minillm/engine/piecewise_graph.py) hold everything but attention, one set
# per token-count bucket, and call attention eagerly in between: any mix of prompts, chunks and decodes fits.
# For the commonest prefill, one fresh prompt alone, a *prompt graph* (minillm/engine/prompt_graph.py) holds the
# whole forward, attention included: FlashAttention's grid covers the bucket and its programs read the prompt's
# real length from a device tensor, so the padding tiles return at once. On the H200 a lone 40-token SmolLM2
# prompt's time to first token went from 10.0 ms piecewise (30 eager attention calls, each paying Python and
# launch work around 0.05 ms of GPU work) to 1.6 ms (benchmarks/RESULTS.md, "Prompt graphs").
#
# A graph can hold more than the model. With *async scheduling* (vLLM's name; on by default on CUDA) the host
# prepares step N+1 while the GPU runs step N, so a step costs max(host, GPU), and once the GPU is hidden, the host's
# leftover launches are the step. The engine's decode graphs therefore also record the LM head, the greedy argmax
# and the gather of the previous step's tokens into this step's inputs: on the H200 that took 250-850 us of host
# work out of each SmolLM2 step (1.05-1.4x the tokens/s at batch 1 and 32; benchmarks/RESULTS.md, "Decode graphs
# that sample").
#
# A graph removes the CPU's launch cost, not the GPU's: between two kernels of a replay the GPU still waits for
# every program of the first to finish and its writes to land before the second is scheduled. On the H200 a 4-bit
# Llama-3-8B step ran 2.26 ms of kernels in 2.54 ms, ~0.24 ms lost at ~300 boundaries of under a microsecond each.
# Hopper's **programmatic dependent launch** (PDL; TensorRT-LLM uses it throughout) lets a kernel launched with
# the attribute start while its predecessor drains: its programs run what does not depend on the predecessor (the
# INT4 GEMV asks for its first tile of weights, which no kernel writes), then block in `griddepcontrol.wait` until
# the predecessor's memory is visible, and `launch_dependents` lets the next kernel in turn be scheduled.
# kernels/pdl.py holds the rule every participating kernel follows (wait first, so the chain of dependencies stays
# transitive); on the H200 it made that INT4 step 3.3% faster (benchmarks/RESULTS.md, "Programmatic dependent
# launch") and left the bf16 one, 4.5 ms of mostly weight reads, where it was.

# %%
if torch.cuda.is_available():
    from triton.testing import do_bench
    xs = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    wg = torch.ones(4096, device="cuda", dtype=torch.bfloat16)

    def step():  # 30 layers' worth of two fused norms: tiny kernels, launch-bound at batch 8
        h = xs
        for _ in range(60):
            h = fused.rms_norm(h, wg, 1e-5)
        return h

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    eager_ms, graph_ms = do_bench(step), do_bench(graph.replay)
    print(f"60 rms_norm launches: eager {1e3 * eager_ms:.0f} us, CUDA graph {1e3 * graph_ms:.0f} us "
          f"({eager_ms / graph_ms:.1f}x)")
    kc, vc, tb, ln, _ = toy_paged_cache([4096] * 64, block_size=16, kv_heads=8, d=128)
    qg = torch.randn(64, 32, 128).cuda().bfloat16()
    kc, vc, tb, ln = kc.cuda().bfloat16(), vc.cuda().bfloat16(), tb.cuda(), ln.cuda()
    ms = do_bench(lambda: pa.paged_decode_attention(qg, kc, vc, tb, ln))
    print(f"paged decode, batch 64, ctx 4096: {2 * 64 * 4096 * 8 * 128 * 2 / ms / 1e9:.2f} TB/s")
else:
    print("no GPU here. On an H100 this cell compares 60 eager rms_norm launches with one CUDA-graph replay, and\n"
          "times paged decode. Recorded with benchmarks/bench_kernels.py on 2026-11-25 (H100 SXM, triton 3.6):\n"
          "  paged decode, batch 64, context 4096, 32/8 heads, d 128: 2.88 TB/s = 96% of 3.0 TB/s, 0.97x SDPA\n"
          "  fused rms_norm+residual, rotary, silu_and_mul, store_kvcache at Llama-3-8B sizes:\n"
          "  90-96% of the copy bandwidth, 2.7-14x faster than the eager torch code they replace")

# %% [markdown]
# ## 5. The linear layers at decode: a GEMV
#
# At batch 1 every linear layer multiplies one row of activations by a weight matrix: 2 FLOPs per weight for 2
# bytes read, so its time is the weight's bytes over the bandwidth (the decoder's linears hold 87% of
# Llama-3-8B's 16 GB; with the LM head, 93%).
# cuBLAS's kernels are built for matrices and leave a few microseconds of ramp-up on the table for each small one;
# `minillm.kernels.gemv` is the decode GEMV the engine times against cuBLAS per shape and keeps where it wins. Each
# program owns a few rows of W and streams them along K in 16-byte loads, every byte read once. Which tile is best
# depends on the shape, and the H200 said so in numbers (benchmarks/RESULTS.md, twenty-first session):
# * Llama-3-8B's rows of 4096-14336 weights: 8 rows x 1024 columns a program, looping along K.
# * SmolLM2's rows of 576 and 1536: a whole row in one tile (one load round, no loop): 1.5 us against 2.1-3.6.
# * Two rows of x (a batch of 2, or a verify step with one draft): load W's tile once, one pass per row of x.
# * Six or eight rows: each pass ends in a sum across threads, and the tensor cores (rows padded to 16) win. A
#   6-row speculative verify step therefore spends ~1.6x a plain step's time in its linear layers (chapter 9).
#
# At SmolLM2's size a kernel's launch and boundary cost as much as its work, so the GEMV also takes in the
# element-wise kernels around it: the RMSNorm before qkv and gate_up (`gemv_rms_norm`: every program recomputes
# its rows' RMS from L2, one program writes the new residual) and SwiGLU before down. Whether a fusion pays is
# measured, not assumed: the engine times each against the two launches it replaces, per shape and row count.
# On the H200 the norm fusion made a batch-1 step 0.665 -> 0.523 ms; at 6 rows both fusions lost (the extra
# loads stall the tensor-core tile's pipeline: SwiGLU's down GEMV took 7.9 us fused against 4.4 + 1.5 apart), and
# a tile that won a sweep at 6 rows took 20 us with SwiGLU fused, which is how a verify step once lost 0.3 ms.

# %%
# NBVAL_CHECK_OUTPUT
from minillm.kernels.gemv import default_config, gemv

for name, (m, n, k) in {"Llama-3-8B qkv, batch 1": (1, 6144, 4096), "SmolLM2 down, batch 1": (1, 576, 1536),
                        "SmolLM2 qkv, 2 rows": (2, 960, 576), "SmolLM2 qkv, 6 rows": (6, 960, 576)}.items():
    c = default_config(m, n, k)
    path = "tensor cores" if c.use_dot else "one pass per row" if c.row_passes else "CUDA cores"
    print(f"{name:24s} {c.block_n:3d} rows x {c.block_k:4d} columns a program, {path}")
x, w = torch.randn(2, 576).to(device), torch.randn(96, 576).to(device)  # on a CPU: interpreted, at a small size
print("2 rows through gemv equal F.linear:", bool((gemv(x, w) - torch.nn.functional.linear(x, w)).abs().max() < 1e-3))
from minillm.kernels.fused import rms_norm
from minillm.kernels.gemv import gemv_rms_norm

residual, norm_w = torch.randn(2, 576).to(device), torch.rand(576).to(device)
y, new_residual = gemv_rms_norm(x, residual, norm_w, 1e-5, w)  # RMSNorm(x + residual) @ w^T in one kernel
normed, h = rms_norm(x, norm_w, 1e-5, residual)  # the two-launch version
print("the norm inside the GEMV equals rms_norm then gemv:",
      bool((y - gemv(normed, w)).abs().max() < 1e-3) and torch.equal(new_residual, h))

# %%
import json

from minillm.course.registry import repo_root

sweep = json.loads((repo_root() / "benchmarks/results/gemv_smollm2_rows_sweep_s21_h200.json").read_text())
print(f"{sweep['device']}, {sweep['date'][:10]}: us per call, CUDA graphs, cold weights (benchmarks/sweep_gemv.py)")
for r in sweep["rows"]:
    best = r["best_config"]
    kind = "tensor cores" if best["use_dot"] else "row passes" if best["row_passes"] else "CUDA cores"
    print(f"  {r['shape']:13s} M={r['m']}: cuBLAS {r['cublas_us']:4.1f}, best {r['best_us']:4.1f} ({kind})")

# %% [markdown]
# ## 6. Interview questions
#
# 1. *Why is decode attention memory-bound even with a perfect kernel?* <details><summary>answer</summary>One query
#    per sequence: each cached K/V element is used for ~2·H/KVH FLOPs, far below the ridge point. Only the bytes
#    (KV heads, KV precision) can change.</details>
# 2. *What is flash-decoding (split-KV), and when does it help?* <details><summary>answer</summary>Cut each
#    sequence's keys among several programs and merge their partial outputs by log-sum-exp. It helps when
#    batch × KV heads is too small to fill the SMs (small batch, long context).</details>
# 3. *What is kernel fusion, and why does it speed up element-wise ops?* <details><summary>answer</summary>They do a
#    few FLOPs per byte: fusing several into one pass reads and writes each tensor once instead of once per op.</details>
# 4. *What do CUDA graphs remove, and what do they constrain?* <details><summary>answer</summary>The CPU launch cost
#    of each kernel; shapes and addresses are frozen at capture, hence static buffers and one graph per padded
#    batch size.</details>
# 5. *A decode step runs in a CUDA graph and the GPU is never idle for a microsecond, yet the step takes longer than
#    the sum of its kernels. Where does the time go, and what recovers it?* <details><summary>answer</summary>The
#    boundaries: each kernel starts only after the previous one has fully finished and flushed. Fewer kernels
#    (fusion), or programmatic dependent launch on Hopper, which overlaps a kernel's launch and prologue with its
#    predecessor's tail.</details>
# 6. *Can the RMSNorm before a projection be fused into the GEMV before it, or the one after it?*
#    <details><summary>answer</summary>Not into the one before: the norm needs the sum of squares of the whole row,
#    and each program of that GEMV computes only a slice of the row. Into the one after, yes: at decode the row is a
#    few KB, so every program can recompute its RMS from L2 and normalise x as it loads it (one program writes the
#    new residual). Whether it pays depends on the shape: the redundant reads grow with programs x K.</details>
#
# A question whose answer is a number (exercise `ch04.decode_step_floor_s`): *Llama-3-8B in bf16 (16.06 GB of
# weights, 128 KiB of KV per token) on an H200 (4.24 TB/s): what is the lowest possible time of one decode step
# at batch 1 and at batch 64, every sequence at 4096 tokens of context? How many tokens per second is that, and
# from which batch does reading the KV cost more than reading the weights?*

# %%
# NBVAL_CHECK_OUTPUT
decode_step_floor_s = load_function("ch04.decode_step_floor_s")
weights, kv_token, h200 = 16.06e9, 131072, roofline.H200_BF16.bandwidth
for batch in (1, 64):
    step = decode_step_floor_s(weights, kv_token, [4096] * batch, h200)
    print(f"batch {batch:2d}, 4k context: step >= {1e3 * step:5.2f} ms -> at most {batch / step:6.0f} tokens/s")
kv_only = decode_step_floor_s(0, kv_token, [4096], h200)
print(f"KV reads outweigh the weights from batch {math.ceil(decode_step_floor_s(weights, 0, [0], h200) / kv_only)}")

# %% [markdown]
# At batch 64 the KV cache is two thirds of the bytes: longer contexts make each decoded token dearer whatever the
# batch, which is why KV precision (FP8 KV cache) and fewer KV heads (GQA, MLA) matter as much as weight quantization.
#
# **What to remember**
# * decode attention does ~`2·H / KVH` FLOPs per cache element: it is memory-bound, so a decode kernel is judged
#   by the fraction of memory bandwidth it reaches (ours: 96% of an H100's measured copy bandwidth, 3.0 TB/s);
# * split-KV keeps every SM busy when batch × kv heads is small; partial results merge exactly through their
#   log-sum-exp (your `merge_lse`), the online softmax's rescaling applied once across programs;
# * element-wise kernels are bandwidth-bound: fuse them so each byte moves once;
# * at small batch the CPU's kernel launches dominate a decode step: CUDA graphs replay them in one call.
