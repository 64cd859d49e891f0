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
# # Chapter 8 — GPTQ, AWQ, the INT4 kernel and 2:4 pruning
#
# Chapter 7 rounded every weight to its nearest grid point, on its own. This chapter uses what round-to-nearest
# ignores: the *inputs* a layer sees. Then it looks at the kernel that turns 4-bit weights into speed, and at the
# other way to drop bytes, pruning:
#
# 1. **GPTQ** quantizes a layer one column at a time and pushes each column's rounding error onto the columns not
#    yet quantized, weighted by the inverse Hessian of the layer's inputs (exercise `ch08.gptq_column_update`);
# 2. **AWQ** finds the ~1% of input channels that carry the largest activations and scales their weights up before
#    rounding (exercise `ch08.awq_scale_step`);
# 3. the **INT4 GEMM** unpacks eight 4-bit codes per int32 word inside the K loop, in registers
#    (exercise `ch08.int4_unpack_kernel`, a Triton helper);
# 4. **2:4 pruning** keeps two of every four weights, the pattern sparse tensor cores run at twice the rate
#    (exercise `ch08.two_four_mask`);
# 5. the quality and speed of every method, read from our benchmark runs.
#
# Write the exercises in `exercises/ch08_gptq_awq_pruning.py`, then `minillm grade ch08`. Everything runs on CPU:
# SmolLM2's first four layers, its real activations on Python docstrings (calibration and held-out parts), the
# Triton kernel through the interpreter. GPU figures come from our H200 runs (`benchmarks/results/`).

# %%
import glob
import json
import os
import subprocess
import sys

import matplotlib.pyplot as plt
import torch

from minillm.course.impl import load_chapter_module, load_function
from minillm.course.overrides import use_overrides
from minillm.course.registry import repo_root
from minillm.kernels.int4_layout import dequantize_int4, repack_int4
from minillm.quant.awq import activation_scale, search_scales
from minillm.quant.gptq import HessianAccumulator, gptq_quantize
from minillm.quant.layer_inputs import first_layers, linear_inputs
from minillm.quant.prune import magnitude_scores, unstructured_mask
from minillm.quant.rtn import fake_quantize, quantize

gptq_column_update = load_function("ch08.gptq_column_update")
awq_scale_step = load_function("ch08.awq_scale_step")
nm_mask = load_function("ch08.two_four_mask")
# the kernel exercise is a @triton.jit helper; its chapter module also holds the GEMM kernel and launch_int4_gemm
ch08 = load_chapter_module("ch08.int4_unpack_kernel")  # your module, or the reference's until you start
device = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


model, tokenizer = first_layers(4)
calib = linear_inputs(model, tokenizer, n_samples=16, seq_len=128, split="calibration")
held = linear_inputs(model, tokenizer, n_samples=4, seq_len=128, split="held_out")
layer = model.model.layers[3]
W = {"qkv_proj": layer.self_attn.qkv_proj.weight.detach().float(),
     "gate_up_proj": layer.mlp.gate_up_proj.weight.detach().float(),
     "down_proj": layer.mlp.down_proj.weight.detach().float()}
print({k: tuple(x.shape) for k, x in calib.items()}, "held out:", tuple(held["qkv_proj"].shape))

# %% [markdown]
# ## 1. GPTQ: error feedback
#
# GPTQ minimises the layer's *output* error on calibration inputs X, `‖X Wᵀ − X Qᵀ‖²`, whose curvature is the
# Hessian `H = 2 XᵀX`. It quantizes the columns left to right; column `i` rounds to `q` with error `w_i − q`, and
# instead of accepting it, GPTQ moves the columns not yet quantized to compensate: with `U` the upper Cholesky
# factor of `H⁻¹`, `err = (w_i − q) / U[i, i]` and `W[:, i:] −= err · U[i, i:]` (Optimal Brain Surgeon's update,
# one factorisation for all columns). **Exercise `ch08.gptq_column_update`**; the engine's `gptq_quantize` calls
# it for every column.
#
# GPTQ fits the calibration set: it needs many more tokens than the layer has inputs (here 2,048 tokens for 576
# inputs, few by the paper's standard, so we dampen H by 10% of its mean diagonal instead of 1%).
# The errors below are on **held-out** text.

# %%
# NBVAL_CHECK_OUTPUT
print(f"{'weight':12s} {'bits':>4s} {'group':>5s} {'RTN':>7s} {'GPTQ':>7s}   (relative output error, held-out)")
gptq_weights = {}
for name, bits in (("qkv_proj", 4), ("qkv_proj", 3)):
    w, x_cal, x_test = W[name], calib[name], held[name]
    acc = HessianAccumulator(w.shape[1])
    acc.add(x_cal)
    with use_overrides({"ch08.gptq_column_update": gptq_column_update}):
        gptq_weights[name, bits] = gptq_quantize(w, acc.H, bits=bits, group_size=64, percdamp=0.1).weight_dq
    rtn = fake_quantize(w, bits, 64)
    print(f"{name:12s} {bits:4d} {64:5d} {rel_err(x_test @ rtn.T, x_test @ w.T):7.3f} "  # 3 decimals: the 4th
          f"{rel_err(x_test @ gptq_weights[name, bits].T, x_test @ w.T):7.3f}")  # differs between CPU models

# %% [markdown]
# The weights themselves move *further* from W with GPTQ (each column absorbed its neighbours' errors); the outputs
# move less. Where the error went, column by column, at 3 bits:

# %%
w = W["qkv_proj"]
fig, ax = plt.subplots(figsize=(9, 2.6))
for label, w_hat in (("RTN", fake_quantize(w, 3, 64)), ("GPTQ", gptq_weights["qkv_proj", 3])):
    ax.plot(((w_hat - w) ** 2).mean(0), lw=0.6, label=f"{label}: weight error {rel_err(w_hat, w):.3f}")
ax.set_xlabel("input column")
ax.set_ylabel("mean squared weight error")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. AWQ: protect the salient channels
#
# AWQ (Lin et al. 2023) observes that a few input channels carry far larger activations than the rest, and that a
# rounding error on a weight in such a column is multiplied by that large input. It cannot keep those columns in
# fp16 (one kernel for the whole matrix), so it scales them: `W x = (W·s)(x / s)`. Rounding `W·s` with `s > 1` on a
# salient column shrinks that column's error *relative to its weight*. The scales are `s = s_xᵅ` with `s_x` the mean
# |x| per channel, centred on 1, and α is searched on a grid for the smallest block output error.
# **Exercise `ch08.awq_scale_step`**: the scales for one α and the scaled problem; the engine's `search_scales`
# quantizes `W·s` and measures.

# %%
# NBVAL_CHECK_OUTPUT
w, x_cal, x_test = W["gate_up_proj"], calib["gate_up_proj"], held["gate_up_proj"]
s_x = activation_scale(x_cal)
top = s_x.topk(6)
print(f"mean |x| per channel: median {float(s_x.median()):.3f}, top 1% {[round(v, 2) for v in top.values.tolist()]} "
      f"(channels {top.indices.tolist()})")
with use_overrides({"ch08.awq_scale_step": awq_scale_step}):
    scales, alpha, errors = search_scales([w], x_cal[::4], bits=3, group_size=64, n_grid=10)
w_awq = fake_quantize(w * scales, 3, 64)  # the scaled weight, quantized; 1/s folds into the RMSNorm before it
print(f"best alpha {alpha:.1f}; held-out output error: RTN {rel_err(x_test @ fake_quantize(w, 3, 64).T, x_test @ w.T):.4f}, "
      f"AWQ {rel_err((x_test / scales) @ w_awq.T, x_test @ w.T):.4f}")

# %%
fig, ax = plt.subplots(figsize=(5, 2.6))
ax.plot([k / 10 for k in range(10)], errors, "o-")
ax.set_xlabel("alpha (s = s_x^alpha)")
ax.set_ylabel("block output error")
ax.set_title("AWQ's grid search, gate/up of layer 3, 3 bits")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The INT4 GEMM: unpacking in registers
#
# At decode a linear layer is a matrix-vector product: every weight is read once, so the time is the time to read
# the weights, and 4-bit weights read 4x fewer bytes than bf16 *only if* the kernel never writes a bf16 copy. Our
# kernel (`minillm.kernels.int4_gemm`, GPTQ's layout: eight codes per int32 word along K) loads one word per eight
# weights and unpacks them inside the K loop. The fast unpack is a float trick: OR the bits of 2²³ (0x4B000000)
# into the word once; then one AND per code keeps the nibble *where it lies* with that exponent, a float worth
# `2²³ + code·16ʲ` exactly, and one FMA leaves `code − zero`. No shift, no integer-to-float conversion.
#
# **Exercise `ch08.int4_unpack_kernel`**: write `int4_unpack`, the helper the kernel calls for each of the 8 codes.
# Any exact way passes (shift and mask is fine); the trick is what makes it fast. First the trick in plain torch:

# %%
# NBVAL_CHECK_OUTPUT
word = torch.tensor([0x7A3F_91C5], dtype=torch.int32)
w_lo, w_hi = word | 0x4B000000, (word >> 16) | 0x4B000000
for i in range(8):
    j = i % 4
    f = ((w_lo if i < 4 else w_hi) & (0x4B000000 | (0xF << (4 * j)))).view(torch.float32)
    print(f"code {i}: float {float(f):.1f} = 2^23 + {int((f - 2 ** 23) / 16 ** j)} * 16^{j}")
print("nibbles of 0x7A3F91C5 from the low end:", [(0x7A3F91C5 >> (4 * i)) & 0xF for i in range(8)])

# %% [markdown]
# Now your helper inside the GEMM: `launch_int4_gemm` (in your chapter module) runs the real kernel with one small
# tile; against `x @ dequant(W)ᵀ` in plain torch, on the first 64 rows of layer 3's `down_proj`, 4 bits, group 64.

# %%
# NBVAL_CHECK_OUTPUT
w = W["down_proj"][:64].to(device)  # the kernel runs natively on a GPU, through the interpreter here
iw = repack_int4(quantize(w, bits=4, group_size=64), torch.float32)
print(f"qweight {tuple(iw.qweight.shape)} int32, scales {tuple(iw.scales.shape)}, qzeros {tuple(iw.qzeros.shape)}: "
      f"{(iw.qweight.numel() * 4 + iw.scales.numel() * 2 + iw.qzeros.numel() * 4) * 8 / w.numel():.2f} bits per weight "
      "(fp16 scales)")
reference = dequantize_int4(iw.qweight, iw.scales, iw.qzeros, 64)
for m, use_dot in ((1, False), (16, True)):
    x = held["down_proj"][:m].to(device)
    y = ch08.launch_int4_gemm(x, iw.qweight, iw.scales, iw.qzeros, 64, use_dot=use_dot)
    ok = torch.allclose(y, x @ reference.T, atol=1e-4, rtol=1e-4)
    print(f"M = {m:2d} ({'tensor-core' if use_dot else 'CUDA-core'} path): y matches x dequant(W)^T: {ok}")

# %% [markdown]
# On a GPU the engine's `int4_gemm` (autotuned tiles, split-K for small M, CUDA graphs) is what serving uses.
# The H200 figures below are from `benchmarks/bench_quant_gemm.py` (Llama-3-8B's 14336 x 4096 `up_proj`, group 128):
# times in microseconds and the fraction of the 4.24 TB/s bandwidth the int4 weights reach.

# %%
if device == "cuda":
    from minillm.kernels.int4_gemm import int4_gemm
    big = repack_int4(quantize(torch.randn(14336, 4096, device=device), 4, 128), torch.bfloat16)
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    dense = dequantize_int4(big.qweight, big.scales, big.qzeros, 128).to(torch.bfloat16)
    for fn, label in ((lambda: int4_gemm(x, *big.args()), "int4_gemm"), (lambda: x @ dense.T, "bf16 matmul")):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            fn()
        end.record()
        torch.cuda.synchronize()
        print(f"{label}: {start.elapsed_time(end) * 10:.1f} us per call (M = 1, this GPU)")
else:
    print("On a GPU this cell times int4_gemm against a bf16 matmul at M = 1; our H200 run:")
for path in sorted(glob.glob(f"{repo_root()}/benchmarks/results/quant_gemm*.json")):
    run = json.load(open(path))
    print(f"{run['device']} (triton {run['triton']}):")
    for r in run["int4"]:
        print(f"  M = {r['M']:3d}: int4 {r['int4_us']:6.1f} us, with CUDA graphs {r['int4_graph_us']:6.1f} us, "
              f"bf16 {r['bf16_us']:5.1f} us, torch int4pack {r['int4pack_us']:6.1f} us, "
              f"{100 * r['int4_bw_fraction']:4.1f}% of HBM bandwidth")

# %% [markdown]
# Those first kernels read the weights at 35-42% of bandwidth, whatever their tiles. Fewer instructions per weight
# (two weights per packed fp16 instruction) bought 2%. What was wrong showed up only under Nsight Compute
# (`benchmarks/probe_int4_loads.py` has the command): the GEMV used 254 registers per thread, so few warps fitted
# on an SM, the grid gave fewer still (1.7 per SM), and each warp sat waiting on its own loads: DRAM 19% busy,
# issue slots 18% busy. A kernel that only *loaded* the same tiles with the same grid was just as slow. Neither
# bytes nor arithmetic: **latency**, which only more bytes in flight can hide (more warps, fewer registers each,
# or the next tile requested before this one is used). `minillm.kernels.int4_gemv` is the rewrite (96-128
# registers, 2.6-2.9 instructions per weight, a prefetch of the next tile), and the dispatcher (`int4_dispatch`)
# times every kernel's launches per shape from CUDA graphs with a cold L2 and keeps the fastest. Its figures:

# %%
p3 = json.load(open(f"{repo_root()}/benchmarks/results/int4_p3_s14_h200.json"))
print(f"{p3['device']}, {p3['date'][:10]}: us per call at M = 1 and 2 (best launch of each kernel; bf16 = cuBLAS)")
for r in p3["rows"]:
    if r["M"] <= 2:
        kernels = ", ".join(f"{k} {us:.1f}" for k, us in r["best_by_kernel"].items() if us == us)
        print(f"  {r['shape']:>12} M={r['M']}: bf16 {r['bf16_us']:5.1f} | {kernels} | floor {r['floor_us']:.1f}")

# %% [markdown]
# The rewrite moved the limit. Timed beside a kernel that only loads its tiles (same grid), the GEMV now costs
# 14.3 us where its loads alone take 9.1, as long as a flat read of the same 29 MB (H200, benchmarks/RESULTS.md,
# sixteenth session): the bytes arrive in time, and what is left is **instructions**. Holding two tiles in flight
# made it slower (20 us: more registers, fewer warps). Instructions can be counted without a GPU: Triton ships
# NVIDIA's assembler, so the next cell compiles the GEMV for Hopper (sm_90) on this machine and counts the machine
# instructions of its inner loop per weight (`benchmarks/sass_count.py`). The weights' share is fixed (a LOP3 and
# two packed fp16 FMAs per two weights); the activations' is not: bf16 ones come two per 32-bit load and are
# widened and rounded to fp16 pairs, an fp16 model's are permuted straight out of 64-bit loads (one loaded 16
# bits at a time before: 64 of the loop's 74 load instructions).

# %%
script = f"{repo_root()}/benchmarks/sass_count.py"
done = subprocess.run([sys.executable, script, "--json"], capture_output=True, text=True, timeout=300,
                      env=dict(os.environ, TRITON_INTERPRET="0"))
if done.returncode != 0:
    print("could not compile for sm_90 here:", done.stderr.strip().splitlines()[-1:])
else:
    for row in json.loads(done.stdout.strip().splitlines()[-1]):
        if row["kernel"] == "gemv":
            rows = f" ({row['per_weight_row']:.2f} per weight and row)" if row["rows"] > 1 else ""
            print(f"  {row['tile']:32s} {row['registers']:4d} registers, {row['per_weight']:.2f} instructions per "
                  f"weight{rows}; most common: {', '.join(list(row['top'])[:4])}")

# %% [markdown]
# The `gemv_M4` tile is the GEMV for a few rows at once (M = 3..4: a small decode batch, or a verify step): each
# word is unpacked once and then multiplied into all four rows, so the instructions per weight *and row* drop to
# ~1.3. On the H200 it is the fastest INT4 kernel at M = 4 on every Llama-3-8B shape (5-24% under the
# tensor-core kernel), yet four rows take ~1.9x one row's time, not 1x: ~220 registers leave 9 warps per SM, and
# the kernel is latency-bound again. At M = 2 two one-row programs per tile are as fast, and from M = 8 the
# tensor-core kernel wins (benchmarks/RESULTS.md, nineteenth session). The lesson of this section once more:
# count instructions, but time the kernel.
#
# Why not the tensor cores at M = 1, as Marlin does? On Hopper a wgmma reads its *second* operand from shared
# memory, so `x @ W^T` must store every unpacked weight there first. `minillm.kernels.int4_wgmma` swaps the
# operands (`y^T = W x^T`: the weights become the first operand, which may live in registers) and orders K so
# that one shift and one LOP3 leave two weights exactly where the operand wants them. Compiled for sm_90 its loop
# is lean; on the H200 it takes 50 us where the GEMV takes 12. Nsight Compute says why: Triton still routes the
# tile through shared memory to reach the operand's register layout, 118 registers leave 16 warps per SM, and each
# warp's iteration is one dependent chain (load, unpack, store, barrier, wgmma, shuffles) that nothing overlaps.
# The idea is right; what makes it fast in Marlin is weights pre-shuffled offline into the register order and
# multi-stage asynchronous (cp.async) load pipelines. The dispatcher keeps it where it wins: M = 32 (twenty-first
# session).
#
# End to end, the kernel is not the whole step. A 4-bit Llama-3-8B decode step at batch 1 spent 1.54 ms in its
# 128 GEMVs and 0.24 ms in the fp16 LM head (128,256 x 4,096, 1 GB, read once per token): with the decoder's bytes
# cut to a quarter the head became a tenth of the step. RTN takes `lm_head=True` (GPTQModel's option) to round it
# as well: 1.85x the bf16 engine's tokens/s instead of 1.73x on the H200. AWQ and GPTQ leave the head dense by
# default, and SmolLM2, whose head *is* its embedding, shows why: rounding it too took the RTN model's perplexity
# from +33% to +55% of fp32 (`benchmarks/quant_quality.py`; benchmarks/RESULTS.md, twentieth session).

# %% [markdown]
# ## 4. 2:4 pruning
#
# Pruning drops weights instead of shortening them. Unstructured sparsity (any 50%) saves nothing on a GPU: the
# zeros are scattered. **2:4** semi-structured sparsity keeps exactly two of every four consecutive weights of a
# row, so a sparse tensor core can skip the zeros from a 2-bit index per kept weight: twice the math rate and about
# half the bytes. **Exercise `ch08.two_four_mask`** (`nm_mask(scores, n, m)`): keep the n best of every m. The scores
# here are magnitudes |w|; Wanda (`minillm quantize --method prune-2:4`) uses |w| times the input's norm.

# %%
# NBVAL_CHECK_OUTPUT
for name in ("qkv_proj", "down_proj"):
    w, x = W[name], held[name]
    scores = magnitude_scores(w)
    masks = {"2:4": nm_mask(scores, 2, 4), "unstructured 50%": unstructured_mask(scores, 0.5), "4:8": nm_mask(scores, 4, 8)}
    errs = ", ".join(f"{k} {rel_err(x @ (w * m).T, x @ w.T):.3f}" for k, m in masks.items())
    print(f"{name:10s} kept {float(masks['2:4'].float().mean()):.2f}; output error: {errs}; "
          f"RTN int4 g64 {rel_err(x @ fake_quantize(w, 4, 64).T, x @ w.T):.3f}")

# %% [markdown]
# Half the weights gone costs far more than three of their four bits: one-shot pruning of a small model needs
# calibration (Wanda, SparseGPT) and usually some retraining, which is why 4-bit quantization, not pruning, is what
# serving stacks ship. On a GPU the 2:4 pattern runs through `torch.sparse.to_sparse_semi_structured` (cuSPARSELt);
# this chapter does not time it.
#
# ## 5. Quality and speed of every method
#
# Perplexity of SmolLM2 on held-out docstrings, each method applied to the whole model
# (`benchmarks/quant_quality.py`; calibrated methods see the calibration part only), and the GEMM speeds of the
# W8A8 kernels on the H200. Read from the JSON files in `benchmarks/results/`; rerun the scripts to add your own.
#
# Only runs in one setting compare (P10's: 32 x 512 held-out tokens, 128 x 512 calibration tokens), and each
# method is shown relative to the fp32 model *of the same run*: the CPU and the H200 read the docstrings of
# different Python versions, so their absolute perplexities differ (fp32 18.18 against 17.13) while the relative
# ones agree within about a point. Of several runs of a method the H200's newest wins. Not in these
# files: FP8 with DeepSeek-style 32 x 32 block scales and GPTQ rounding, +0.83% (`benchmarks/bench_fp8_block.py`).
#
# The labels: `gptq+` is GPTQ with act-order, static groups and a searched grid range, `asym` its calibration
# aimed at the unquantized layer's output; `awq+` searches AWQ's scales on whole-block outputs and clips,
# `awq+gptq` rounds AWQ-scaled weights with GPTQ (`noduo`: scales from activations only, `noclip`: no clipping);
# `at load` rounds while loading (`LLM(quantization="rtn")`), `+ lm_head` the tied head too.
# bits/weight counts what the scored checkpoint holds, so two rows differ from chapter 7's memory table: `gguf
# q4_k` is mostly Q5_0 here (SmolLM2's 576-wide rows do not fill Q4_K's 256-weight super-blocks, so the writer
# falls back, as llama.cpp does), and `nf4` keeps each 64-weight block's absmax in fp32 in the checkpoint (4.50;
# it is double-quantized when loaded, chapter 7's 4.127).

# %%
P10 = ([32, 512], [128, 512], 4096)  # held-out tokens, calibration tokens, AWQ's search tokens
latest = {}  # method -> ((on a GPU, date), perplexity relative to fp32, bits per weight, device, day)
for path in sorted(glob.glob(f"{repo_root()}/benchmarks/results/quant_quality*.json")):
    run = json.load(open(path))
    rows = {r["label"]: r for r in run["runs"]}
    if (run["held_out_tokens"], run.get("calibration_tokens"), run.get("awq_search_tokens")) != P10 or "fp32" not in rows:
        continue  # another setting: its perplexities do not compare with these
    device = run["device"].split(" (")[0]
    for label, r in rows.items():
        rank = (device != "cpu", run["date"])
        if label != "fp32" and (label not in latest or rank > latest[label][0]):
            latest[label] = (rank, r["perplexity"] / rows["fp32"]["perplexity"] - 1, r["bits_per_weight"], device,
                             run["date"][:10])
print(f"{'method':32s} {'bits/weight':>11s} {'vs fp32':>9s}   measured on")
for label, (_, rel, bits, device, day) in sorted(latest.items(), key=lambda kv: (-kv[1][2], kv[1][1])):
    print(f"{label:32s} {bits:11.2f} {100 * rel:+8.1f}%   {device}, {day}")
for path in sorted(glob.glob(f"{repo_root()}/benchmarks/results/quant_gemm*.json")):
    run = json.load(open(path))
    print(f"W8A8 GEMMs on {run['device']}:")
    for r in run["w8a8"]:
        print(f"  M={r['M']:5d} N={r['N']:5d} K={r['K']:5d}: fp8 {r['fp8_us']:7.1f} us ({r['fp8_tflops']:7.1f} TFLOP/s), "
              f"torch._scaled_mm {r['scaled_mm_us']:7.1f} us, int8 {r['int8_us']:7.1f} us")

# %% [markdown]
# ## What to take away
#
# * Round-to-nearest ignores the data; GPTQ and AWQ use a few thousand tokens of it to cut the *output* error,
#   most where it hurts most: at 3 bits.
# * GPTQ corrects with the inverse Hessian, column by column; AWQ rescales salient channels and rounds once.
#   Both produce the same grid as RTN, so the same kernel serves them.
# * A 4-bit GEMM is fast only if it unpacks in registers and keeps the GPU busy at M = 1 (split-K, CUDA graphs).
# * 2:4 sparsity is the pattern hardware can use; one-shot it costs more quality than 4 bits do.
#
# In the engine: `minillm quantize --method gptq|awq --out DIR` quantizes the whole model (in Python,
# `use_overrides` makes it run your functions, as above), and `LLM(DIR)` serves the result through `int4_gemm`
# on a GPU.
