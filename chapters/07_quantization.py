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
# # Chapter 7 — Quantization: number formats, groups, FP8, SmoothQuant and GGUF blocks
#
# Chapter 1 showed that a decode step at batch 1 reads every weight once: its time is the model's size in bytes
# divided by the memory bandwidth. Store each weight in 4 bits instead of 16 and the step reads 4x fewer bytes.
# This chapter is about what that costs in accuracy, and how the field keeps the cost small:
#
# 1. the bytes: what each format takes for an 8B model and for SmolLM2;
# 2. the grids: int8 and int4 (evenly spaced), fp8 e4m3 and e5m2 (evenly spaced *in log scale*), NF4 (spaced by
#    the normal distribution's quantiles);
# 3. round-to-nearest with one scale per row or per group of 32-128 weights (exercises `ch07.quantize_per_group`
#    and `ch07.dequantize_per_group`);
# 4. FP8 with a scale, and what happens to values beyond it (exercise `ch07.fp8_scale`);
# 5. activations' outlier channels, and SmoothQuant's way of moving them into the weights
#    (exercise `ch07.smoothquant_scale`);
# 6. the GGUF blocks SmolLM2 ships in: Q4_1, and the two-level Q4_K (exercises `ch07.dequant_q4_1`,
#    `ch07.dequant_q4_k`); NF4 on the same weights.
#
# Write the exercises in `exercises/ch07_quantization.py`, then `minillm grade ch07`. The engine calls the same
# functions (`minillm.quant.rtn.quantize`, `fp8_linear`, the GGUF loader...), so your versions run inside it.
# Everything here runs on CPU in fp32 on the real SmolLM2 weights and activations of its first four layers.

# %%
import matplotlib.pyplot as plt
import torch

from minillm.bench.estimate import PRESETS
from minillm.course.impl import load_function
from minillm.course.overrides import use_overrides
from minillm.loader import GGUFFile, default_model_path
from minillm.loader.dequant import GGML_TYPES
from minillm.quant.gguf_quants import quantize_q4_k
from minillm.quant.layer_inputs import first_layers, linear_inputs
from minillm.quant.nf4 import NF4_LEVELS, dequantize_nf4, quantize_nf4
from minillm.quant.smoothquant import int8_linear
from minillm.quant.rtn import pack_int4, quantize

quantize_per_group = load_function("ch07.quantize_per_group")
dequantize_per_group = load_function("ch07.dequantize_per_group")
scaled_fp8_quant = load_function("ch07.fp8_scale")
smoothquant_scale = load_function("ch07.smoothquant_scale")
dequantize_q4_1 = load_function("ch07.dequant_q4_1")
dequantize_q4_k = load_function("ch07.dequant_q4_k")
quantized_weight_bytes = load_function("ch07.quantized_weight_bytes")
torch.manual_seed(0)


def rel_err(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact||: the one error measure of this chapter."""
    return float((approx - exact).norm() / exact.norm())


# %% [markdown]
# ## 1. The bytes
#
# Bits per weight include what the format stores *besides* the codes: a group's fp16 scale and 4-bit zero point
# cost (16 + 4) / 128 = 0.16 bit per weight at group 128; a GGUF Q4_1 block is 20 bytes for 32 weights (5 bits
# each: 4 for the code, 1 for the block's fp16 scale and minimum); Q4_K is 144 bytes for 256 (4.5 bits); NF4
# with double quantization 4.127. Parameter counts are counted from the shapes (chapter 1's estimator). The
# grouped integer rows come from **exercise `ch07.quantized_weight_bytes`** (the bytes of num_params weights in
# a format with group scales), the first number every "will it fit?" question needs.

# %%
# NBVAL_CHECK_OUTPUT
FORMATS = {  # bits per weight, everything included
    "fp32": 32, "bf16": 16, "fp8 / int8 per channel": 8, "GGUF Q8_0 (34 B / 32)": 34 * 8 / 32,
    "GGUF Q4_1 (20 B / 32)": 20 * 8 / 32, "GGUF Q4_K (144 B / 256)": 144 * 8 / 256,
    "int4 g128 (fp16 scale + 4-bit zero)": quantized_weight_bytes(1.0, 4, 128, 16, 4) * 8,  # bits of one weight
    "NF4 + double quant": 4 + 8 / 64 + 32 / (64 * 256), "int4 per channel": 4,
    "int3 g64": quantized_weight_bytes(1.0, 3, 64, 16, 4) * 8,
}
models = {name: PRESETS[name].counted_params for name in ("llama-3-8b", "smollm2-135m")}
print(f"{'format':38s} {'bits/w':>6s} {'Llama-3-8B':>11s} {'SmolLM2-135M':>13s}")
for fmt, bits in FORMATS.items():
    gb = [n * bits / 8 / 1e9 for n in models.values()]
    print(f"{fmt:38s} {bits:6.3f} {gb[0]:8.2f} GB {1e3 * gb[1]:9.1f} MB")
print("parameters:", {k: f"{v / 1e9:.3f}e9" for k, v in models.items()})
# the interview version: does Llama-3-70B fit on one H200 (141 GB), weights alone?
n70 = PRESETS["llama-3-70b"].counted_params
for name, nbytes in (("bf16", quantized_weight_bytes(n70, 16, 1, 0, 0)),
                     ("int4 g128", quantized_weight_bytes(n70, 4, 128, 16, 4))):
    print(f"Llama-3-70B in {name}: {nbytes / 1e9:.1f} GB = {nbytes / 141e9:.0%} of an H200's 141 GB, "
          f"{'no room left for a KV cache' if nbytes > 0.9 * 141e9 else 'the rest for the KV cache'}")

# %% [markdown]
# At batch 1 on an H200 (4.24 TB/s measured), 16 GB of bf16 weights take at least 3.8 ms per token; 4.2 GB of int4
# take 1.0 ms. That ratio is the whole point; the rest of the chapter is about not paying for it in quality.
#
# ## 2. Grids
#
# A format is a set of representable values. Integers are evenly spaced; floats are evenly spaced within each
# power of two, so their *relative* step is about constant; NF4's 16 levels sit at the normal distribution's
# quantiles, dense near 0 where most weights are.

# %%
# NBVAL_CHECK_OUTPUT
def float_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of an 8-bit float format, from its 256 bit patterns."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    return values[torch.isfinite(values) & (values >= 0)].unique()


grids = {"int8 (symmetric)": torch.arange(0, 128.0), "int4 (symmetric)": torch.arange(0, 8.0),
         "fp8 e4m3fn": float_grid(torch.float8_e4m3fn), "fp8 e5m2": float_grid(torch.float8_e5m2),
         "nf4": NF4_LEVELS[NF4_LEVELS >= 0]}
print(f"{'format':18s} {'levels>=0':>9s} {'largest':>9s} {'smallest>0':>11s} {'rel. step near max':>19s}")
for name, g in grids.items():
    print(f"{name:18s} {len(g):9d} {float(g.max()):9.4g} {float(g[g > 0].min()):11.4g} "
          f"{float((g[-1] - g[-2]) / g[-1]):19.4f}")

# %%
fig, ax = plt.subplots(figsize=(9, 2.4))
for k, (name, g) in enumerate(list(grids.items())[1:]):
    v = torch.cat([-g.flip(0), g]) / g.max()
    ax.scatter(v, torch.full_like(v, k), s=6)
ax.set_yticks(range(4), list(grids)[1:])
ax.set_xlabel("representable values, scaled to [-1, 1]")
ax.set_title("int4 is even, fp8 is log-spaced, NF4 follows the bell curve")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Round-to-nearest, per channel and per group
#
# The real weights: layer 3 of SmolLM2 (q/k/v stacked in one `qkv_proj` [960, 576], `down_proj` [576, 1536]), and
# the activations that flow into them on 8 x 128 tokens of Python docstrings (`minillm.quant.calibration`).
# `quantize_per_group` gives each run of `group_size` input columns of a row its own scale and zero point; one
# group per row ("per channel", `group_size = -1`) must stretch one grid over the row's largest weight.
#
# **Exercises `ch07.quantize_per_group` and `ch07.dequantize_per_group`.** The error that matters is the layer's
# output error on real inputs, `X Ŵᵀ` against `X Wᵀ`, not the weights' own.
#
# A caveat (DESIGN.md): SmolLM2's weights were dequantized from Q4_1, which is a 4-bit asymmetric grid with
# groups of 32 and a *float* minimum. Our grid stores an *integer* zero point (as GPTQ/AWQ checkpoints do), so
# group 32 does not reproduce it exactly, but it comes closer than the grids do elsewhere: compare methods at
# group 64 or 128, or at 3 bits.

# %%
model, tokenizer = first_layers(4)
inputs = linear_inputs(model, tokenizer, n_samples=8, seq_len=128)
layer = model.model.layers[3]
W = {"qkv_proj": layer.self_attn.qkv_proj.weight.detach().float(),
     "down_proj": layer.mlp.down_proj.weight.detach().float()}
print({k: tuple(w.shape) for k, w in W.items()}, {k: tuple(x.shape) for k, x in inputs.items()})


def rtn(w: torch.Tensor, bits: int, group: int, symmetric: bool = False) -> torch.Tensor:
    codes, scales, zeros = quantize_per_group(w, bits, group, symmetric)
    return dequantize_per_group(codes, scales, zeros, group)


# %%
# NBVAL_CHECK_OUTPUT
print(f"{'weight':10s} {'bits':>4s} {'group':>6s} {'weight err':>10s} {'output err':>10s}")
for name, w in W.items():
    x = inputs[name]
    for bits, group in [(4, -1), (4, 128), (4, 64), (4, 32), (3, 64)]:
        if group != -1 and w.shape[1] % group:
            continue
        w_hat = rtn(w, bits, group)
        print(f"{name:10s} {bits:4d} {group:6d} {rel_err(w_hat, w):10.4f} {rel_err(x @ w_hat.T, x @ w.T):10.4f}")

# %% [markdown]
# One outlier shows why groups exist: set a single weight of a row to 20x the row's largest. Per channel, the
# whole row's grid stretches to reach it; with groups of 64, only its own group coarsens.

# %%
# NBVAL_CHECK_OUTPUT
w = W["qkv_proj"][:64].clone()
w[7, 100] = 20 * w[7].abs().max()
for group in (-1, 64):
    w_hat = rtn(w, 4, group)
    others = torch.ones_like(w, dtype=torch.bool)
    others[7, 100] = False
    print(f"group {group:3d}: error of row 7 without the outlier {rel_err(w_hat[7][others[7]], w[7][others[7]]):.3f}, "
          f"of the other rows {rel_err(w_hat[:7], w[:7]):.3f}")

# %% [markdown]
# ## 4. FP8 and saturation
#
# FP8 needs a scale too: `x / scale` must fit the format's range (448 for e4m3fn, 57344 for e5m2).
# **Exercise `ch07.fp8_scale`** (vLLM calls it `scaled_fp8_quant`): given the range `amax` to map onto the largest
# finite value, return the fp8 values and the scale. Weights use their own max (per output channel); activations
# use the token's max at run time (dynamic), or a range measured once on calibration data (static), and then a new
# token can exceed it. e4m3fn has no infinity and e5m2 overflows to inf: values beyond the range must be
# **saturated** to the largest finite value, not cast.

# %%
# NBVAL_CHECK_OUTPUT
w = W["qkv_proj"]
for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
    w8, scale = scaled_fp8_quant(w, w.abs().amax(dim=1, keepdim=True), dtype)
    print(f"{str(dtype):22s} weights per channel: relative error {rel_err(w8.float() * scale, w):.4f}")

calib, held_out = inputs["down_proj"][:512], inputs["down_proj"][512:]
static_amax = calib.abs().amax()  # one static range for the activations, from calibration tokens
x8, scale = scaled_fp8_quant(held_out, static_amax.reshape(1, 1), torch.float8_e5m2)
beyond = int((held_out.abs() > static_amax).sum())
print(f"held-out activations beyond the calibrated range: {beyond}; after the cast: "
      f"{int(torch.isinf(x8.float()).sum())} inf, largest |x8| = {float(x8.float().abs().max()):g}")

# %% [markdown]
# ## 5. Activations have outlier channels: SmoothQuant
#
# For an int8 GEMM both operands must be int8. Weights quantize well (~1% error per channel at 8 bits);
# activations have a few channels much larger than the rest, in every token, so one scale per token wastes most
# of its 255 levels on them. SmoothQuant (Xiao et al. 2023) divides each input channel by a factor `s_j` and
# multiplies the weight's column by it: `X Wᵀ = (X / s)(W s)ᵀ`, exactly.
# **Exercise `ch07.smoothquant_scale`**: `s_j = max|X_j|^α / max|W_j|^(1-α)`, the max over every weight that reads X.

# %%
# NBVAL_CHECK_OUTPUT
x, w = inputs["qkv_proj"], W["qkv_proj"]
act_absmax = x.abs().amax(dim=0)
print(f"max|X_j| over channels: median {float(act_absmax.median()):.2f}, largest {float(act_absmax.max()):.2f}, "
      f"top-4 channels {act_absmax.topk(4).indices.tolist()}")


def w8a8_error(x: torch.Tensor, w: torch.Tensor) -> float:
    # the engine's quantizer, running your quantize_per_group: int8 weights per output channel
    with use_overrides({"ch07.quantize_per_group": quantize_per_group}):
        qw = quantize(w, bits=8, group_size=-1, symmetric=True)
    return rel_err(int8_linear(x, qw.codes, qw.scales[:, 0]), x @ w.T)


print(f"int8 W8A8 output error, plain          : {w8a8_error(x, w):.4f}")
for alpha in (0.5, 0.8):
    s = smoothquant_scale(act_absmax, [w], alpha)
    print(f"int8 W8A8 output error, smoothed a={alpha}: {w8a8_error(x / s, w * s):.4f} "
          f"(largest max|X_j / s_j| {float((act_absmax / s).max()):.2f})")

# %%
s = smoothquant_scale(act_absmax, [w], 0.5)
fig, ax = plt.subplots(1, 2, figsize=(10, 2.6), sharey=True)
ax[0].bar(range(576), act_absmax, width=1.0)
ax[0].set_title("max |X_j| per input channel")
ax[1].bar(range(576), act_absmax / s, width=1.0)
ax[1].set_title("after smoothing (alpha = 0.5)")
for a in ax:
    a.set_xlabel("channel j")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 6. GGUF blocks: Q4_1 and Q4_K
#
# The file SmolLM2 ships in stores 210 of its tensors as Q4_1: blocks of 32 weights, each 20 bytes, a fp16 scale `d`,
# a fp16 minimum `m` and 16 bytes of 4-bit codes, `w = q d + m`. Byte `j` holds element `j` in its low nibble and
# element `j + 16` in its high nibble. **Exercise `ch07.dequant_q4_1`**: the engine's loader calls your function
# for every Q4_1 tensor. Here, one tensor's raw bytes, decoded by you and by the loader.

# %%
# NBVAL_CHECK_OUTPUT
gguf = GGUFFile(default_model_path())
raw = gguf.raw_bytes("blk.3.attn_q.weight")
block = raw[:20]
print("block 0:", block.tolist())
print(f"d = {float(block[0:2].view(torch.float16)):.6f}, m = {float(block[2:4].view(torch.float16)):.6f}, "
      f"codes of elements 0, 16: {int(block[4] & 15)}, {int(block[4] >> 4)}")
mine = dequantize_q4_1(raw)
print(f"{raw.numel()} bytes -> {mine.numel()} weights ({raw.numel() * 8 / mine.numel():.1f} bits each); "
      f"max |yours - loader's| = {float((mine - gguf.load_tensor('blk.3.attn_q.weight').reshape(-1)).abs().max())}")

# %% [markdown]
# Q4_K (what a "Q4_K_M" download mostly holds) saves half a bit: super-blocks of 256 weights with fp16 `d` and
# `dmin`, and per sub-block of 32 a 6-bit scale and a 6-bit minimum, `w = d·sc·q − dmin·mn`, packed into 12 bytes
# (the top two bits of sub-blocks 4-7 hide in the spare bits of the first 8 bytes). **Exercise
# `ch07.dequant_q4_k`.** The quantizer is ours (`minillm.quant.gguf_quants`, a search over scales per sub-block);
# `down_proj`'s rows of 1536 weights are six super-blocks each.

# %%
# NBVAL_CHECK_OUTPUT
w = W["down_proj"][:128]  # 128 rows of 1536: 6 super-blocks each
q4k = quantize_q4_k(w)
w_q4k = dequantize_q4_k(q4k).reshape(w.shape)
print(f"Q4_K: {q4k.numel() * 8 / w.numel():.2f} bits per weight, weight error {rel_err(w_q4k, w):.4f}")
print(f"RTN int4 g32 (4.62 bits), for comparison: weight error {rel_err(rtn(w, 4, 32), w):.4f}")
fresh = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std()  # never on Q4_1's grid
print(f"a Gaussian weight of the same shape: Q4_K {rel_err(dequantize_q4_k(quantize_q4_k(fresh)).reshape(w.shape), fresh):.4f}, "
      f"RTN int4 g32 {rel_err(rtn(fresh, 4, 32), fresh):.4f}")

# %% [markdown]
# Q4_K looks 4.5 times better than round-to-nearest on SmolLM2: its sub-blocks of 32 with their own scale and
# minimum are Q4_1's blocks again, the grid these weights were stored on (section 3's caveat). On a weight that
# never was Q4_1, the two land close together: measure methods away from the grid a model was shipped in.

# %% [markdown]
# ## 7. NF4: levels where the weights are
#
# QLoRA's NormalFloat4 uses 16 levels at the quantiles of a normal distribution, scaled by each block of 64's
# largest |w|. Trained weights are roughly normal, so each level holds about the same share of them. On the same
# weights, against int4 with the same block size:

# %%
# NBVAL_CHECK_OUTPUT
for name, w in W.items():
    codes, absmax = quantize_nf4(w)
    w_nf4 = dequantize_nf4(pack_int4(codes), absmax)  # two codes per byte, as stored
    print(f"{name:10s} NF4 block 64: {rel_err(w_nf4, w):.4f}   int4 symmetric g64: {rel_err(rtn(w, 4, 64, True), w):.4f}"
          f"   int4 asymmetric g64: {rel_err(rtn(w, 4, 64), w):.4f}")

# %% [markdown]
# ## 8. Fewer bytes are faster only if a kernel reads them
#
# A decode step reads every weight once, so a 1-byte weight should take about half the time of a 2-byte one. In
# plain torch it takes *more*: `int8_rtn`'s reference dequantizes the whole matrix to bf16 on every call (read 1
# byte, write 2, read 2 again) before the matmul. The engine's GPU path runs kernels that read the codes
# themselves and decode them in registers: kernels/gemv.py with `weight_scale` (int8 and FP8 codes, one scale per
# row), kernels/nf4_gemv.py (NF4 levels gathered from the 16-entry table, each 64-weight block's sum scaled by
# its absmax once). Measured on an H100 (2026-12-05, `benchmarks/bench_weight_only_decode.py`, Llama-3-8B's
# gate_up, 28672 x 4096, one token; all rows of one run):
#
# | weights | microseconds | x bf16 |
# |---|---:|---:|
# | bf16, cuBLAS | 81.5 | 1.00 |
# | int8, dequantize then matmul (the reference) | 691.7 | 0.12 |
# | int8, the GEMV on the codes | 53.2 | 1.53 |
# | NF4, dequantize then matmul | 3,336 | 0.02 |
# | NF4, the kernel on the codes | 62.0 | 1.31 |
#
# The NF4 kernel's first version took 134 us here; it multiplied every weight by its block's absmax, after a
# reshape that spread the absmax over the bytes. The second scales each block's *sum* (one multiply per 64
# weights) and splits K where the rows alone leave SMs idle: less than half the time. With several tokens NF4 still loses (0.2x bf16 at 16 rows: every row costs a pass of products
# and sums over the decoded tile), and on SmolLM2 itself each matrix is a few microseconds whatever its bytes, so a
# quantized SmolLM2 is no faster than bf16: the savings are for models whose steps are bound by reading the
# weights (chapter 1's stack table, its FP8 row).

# %% [markdown]
# ## What to take away
#
# * Bits per weight include the scales: group 128 costs 0.16 bit, Q4_1's blocks of 32 a whole bit.
# * Per-group scales contain outliers; per-channel scales spread them over a row.
# * FP8's relative error is the same for small and large values; a static scale needs saturation.
# * Activation outliers sit in fixed channels, so a per-channel factor can move them into the weights, for free.
# * Quantization saves time only through a kernel that reads the codes; dequantizing first is slower than bf16.
#
# The engine runs these: `LLM(model, quantization="rtn")` quantizes every linear with your `quantize_per_group`
# (`overrides={"ch07.quantize_per_group": fn}` makes it yours), `quantization="fp8"` goes through your
# `scaled_fp8_quant` at load and at every forward, and loading SmolLM2 decodes its 210 Q4_1 tensors with your
# `dequantize_q4_1`. Perplexity on held-out text for each method (`benchmarks/quant_quality.py`) is in chapter 8,
# next to what the calibrated methods (GPTQ, AWQ) buy on top of round-to-nearest.
