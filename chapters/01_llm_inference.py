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
# # Chapter 1 — What LLM inference costs, and why
#
# An LLM answers in two phases:
#
# 1. **Prefill**: the whole prompt goes through the model in one forward pass. Every layer multiplies a matrix of
#    *all* prompt tokens by its weights, and the keys and values of every token are stored in the **KV cache**.
#    The pass ends with the first output token. Its duration is most of the **TTFT** (time to first token).
# 2. **Decode**: one token at a time. Each step feeds the newest token, reads the KV cache for context, and
#    produces the next token. The gap between tokens is the **TPOT** (time per output token).
#
# Both phases do the same arithmetic per token, yet a decoded token costs far more than a prefilled one. This
# chapter measures that on the bundled model (SmolLM2-135M-Instruct, on this machine's CPU), explains it with
# the **roofline model**, and ends with the other budget that decides what you can serve: **memory**.
#
# Your exercise: `arithmetic_intensity` in `exercises/ch01_basics.py` (then run `minillm grade ch01`).

# %%
import time

import matplotlib.pyplot as plt
import torch

from minillm import LLM, SamplingParams
from minillm.bench import estimate, harness, roofline
from minillm.bench.workload import synthetic_prompts

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
t0 = time.perf_counter()
# max_model_len: chapter 2's contiguous KV cache reserves this many token slots per sequence; we need few.
llm = LLM(seed=0, max_model_len=512)
print(f"loaded SmolLM2-135M-Instruct on {llm.device} ({llm.dtype}) in {time.perf_counter() - t0:.1f} s")

# %%
out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
               SamplingParams(temperature=0, max_tokens=16))[0]
print(out.outputs[0].text)
print(f"prompt {len(out.prompt_token_ids)} tokens, answer {len(out.outputs[0].token_ids)} tokens, "
      f"TTFT {1e3 * out.metrics.ttft:.0f} ms, TPOT {1e3 * (out.metrics.tpot or 0):.0f} ms")

# %% [markdown]
# ## 1. Prefill vs decode, measured
#
# We time prefill for prompts of growing length (one request, one output token: its TTFT is the prefill), then
# decode: 8 tokens for one sequence, and 8 tokens for 4 sequences decoded together. The prompts are windows of
# real English text cut to an exact number of tokens.

# %%
prefill_ms_per_token = {}
for n in (8, 32, 128):
    prompt = synthetic_prompts(llm.tokenizer, 1, n, seed=n)
    _, res = harness.run_workload(llm, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    prefill_ms_per_token[n] = 1e3 * res.requests[0].ttft / n
    print(f"prefill {n:4d} tokens: {1e3 * res.requests[0].ttft:7.1f} ms = {prefill_ms_per_token[n]:6.2f} ms/token")

decode_params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
_, one = harness.run_workload(llm, synthetic_prompts(llm.tokenizer, 1, 16), decode_params)
_, four = harness.run_workload(llm, synthetic_prompts(llm.tokenizer, 4, 16), decode_params)
tpot_1, tpot_4 = one.percentiles["tpot"]["mean"], four.percentiles["tpot"]["mean"]
print(f"decode, 1 sequence : TPOT {1e3 * tpot_1:6.1f} ms -> {one.output_throughput:6.1f} tok/s")
print(f"decode, 4 sequences: TPOT {1e3 * tpot_4:6.1f} ms -> {four.output_throughput:6.1f} tok/s")

# %%
fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
ax.plot(list(prefill_ms_per_token), list(prefill_ms_per_token.values()), "o-", label="prefill (per prompt token)")
ax.axhline(1e3 * tpot_1, color="C1", ls="--", label="decode, batch 1 (per token)")
ax.axhline(1e3 * tpot_4 / 4, color="C2", ls="--", label="decode, batch 4 (per token)")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("prompt tokens in one prefill pass")
ax.set_ylabel("ms per token")
ax.set_title(f"The same model, very different cost per token ({llm.device})")
ax.legend()
plt.show()

# %% [markdown]
# A prefilled token is cheap and gets cheaper as the prompt grows; a decoded token is expensive, unless several
# sequences decode together. (On a GPU a decode step costs about the same for 1 or 64 sequences; on this CPU each
# sequence's attention still adds its own share, so batching gains less.) Why? Count what each phase does to the **weights**, the bulk of the bytes.
#
# ## 2. Arithmetic intensity
#
# A linear layer computes `C[m, n] = A[m, k] @ B[k, n]`: A holds `m` tokens' activations, B is the weight.
# It does `2·m·n·k` FLOPs (a multiply and an add per term) and, at best, moves `mk + kn + mn` elements: read A and
# B once, write C once. The ratio, FLOPs per byte, is its **arithmetic intensity**:
#
# $$ I = \frac{2mnk}{b\,(mk + kn + mn)} $$
#
# with `b` bytes per element. When `m = 1` (decode) the weight `kn` dominates the bytes and `I ≈ 2/b`: about one
# FLOP per byte in bf16. In prefill `m` is the prompt length and every weight byte is reused `m` times.
#
# **Exercise `ch01.arithmetic_intensity`**: write it in `exercises/ch01_basics.py`. The next cell loads your
# version (or the solution, as `MINILLM_IMPL` says) through the course adapter.

# %%
from minillm.course.impl import load_function

arithmetic_intensity = load_function("ch01.arithmetic_intensity")

# %%
# NBVAL_CHECK_OUTPUT
shapes = {"SmolLM2 MLP up 576->1536, fp32": (1536, 576, 4), "Llama-3-8B MLP up 4096->14336, bf16": (14336, 4096, 2)}
for name, (n, k, b) in shapes.items():
    print(name)
    for m in (1, 8, 64, 512, 4096):
        print(f"  m = {m:5d} tokens: {arithmetic_intensity(m, n, k, b):8.2f} FLOPs/byte")

# %% [markdown]
# ## 3. The roofline
#
# A processor has two limits: peak FLOP/s `P` and memory bandwidth `B` bytes/s. A kernel of intensity `I`
# runs at most at `min(P, I·B)`. Below the **ridge point** `I* = P / B` it waits on memory; above it, on arithmetic.
# We measure this machine (a 1024³ matmul and a 64 MiB copy, a second or so), and put it beside the H100 we
# benchmark on: 3.0 TB/s copy, 722 TFLOP/s bf16 GEMM, 1254 TFLOP/s fp8 GEMM.

# %%
here = roofline.measure_machine()
print(f"{here.name}: {here.flops / 1e9:.1f} GFLOP/s, {here.bandwidth / 1e9:.1f} GB/s, "
      f"ridge at {here.ridge_point:.1f} FLOPs/byte")

# %%
# NBVAL_CHECK_OUTPUT
for peak in (roofline.H100_BF16, roofline.H100_FP8):
    print(f"{peak.name}: ridge point {peak.ridge_point:.0f} FLOPs/byte; "
          f"at I = 1 it reaches {100 * peak.attainable(1.0) / peak.flops:.2f}% of its peak")

# %% [markdown]
# The H100 needs about 240 FLOPs per byte to be busy. Decode at batch 1 offers about 1: at most 0.4% of the
# GPU's arithmetic can be used. Now time the model's largest matmul, the LM head, at a decode size (m = 1) and a
# prefill size (m = 256) on this machine, and place the results on the plot. (The copy figure is a quick estimate:
# on a CPU each written line is first read into the cache, so a copy moves more bytes than it counts, and a
# read-only kernel such as this one can land somewhat above the measured slope.)

# %%
# SmolLM2's LM head, W[576, 49152]: 113 MB in fp32, too big for any CPU cache, so its bytes come from DRAM.
measured = []
for m in (1, 256):
    seconds = roofline.time_matmul(m, 49152, 576, dtype=torch.float32, device=device, repeats=3)
    flops = 2 * m * 49152 * 576 / seconds
    measured.append((f"LM head, m={m}", arithmetic_intensity(m, 49152, 576, 4), flops))
    print(f"x[{m}, 576] @ W[576, 49152]: {1e3 * seconds:8.2f} ms, {flops / 1e9:6.2f} GFLOP/s")

guides = [("Llama-3-8B decode, bf16, m=1", arithmetic_intensity(1, 14336, 4096, 2)),
          ("Llama-3-8B decode, batch 64", arithmetic_intensity(64, 14336, 4096, 2)),
          ("Llama-3-8B prefill, 2048 tokens", arithmetic_intensity(2048, 14336, 4096, 2))]
_, ax = plt.subplots(figsize=(8, 5), layout="constrained")
roofline.plot_roofline([here, roofline.H100_BF16, roofline.H100_FP8], guides, measured, ax=ax)
plt.show()

# %% [markdown]
# Read the plot from left to right: decode at batch 1 sits far down the memory slope, batching slides it up the
# slope (chapter 2: continuous batching), prefill sits under the flat roof. Quantized weights (chapter 4) halve or
# quarter the bytes, which moves decode to the right: the same bandwidth now carries more FLOPs.

# %%
if torch.cuda.is_available():
    gpu = roofline.measure_machine(size=8192, num_bytes=1 << 30, device="cuda", dtype=torch.bfloat16)
    print(f"{gpu.name}: {gpu.flops / 1e12:.0f} TFLOP/s bf16, {gpu.bandwidth / 1e12:.2f} TB/s, "
          f"ridge {gpu.ridge_point:.0f} FLOPs/byte")
else:
    print("on an H100 this cell would measure an 8192^3 bf16 matmul (~700 TFLOP/s) and a 1 GiB copy (~3 TB/s), "
          "putting the ridge point near 240 FLOPs/byte")

# %% [markdown]
# ## 4. Memory: weights plus the KV cache
#
# Before speed comes fitting at all. Weights take `params × bytes per param`; the KV cache takes
# `2 × layers × kv_heads × head_dim × bytes × context × batch` (a key and a value per layer, head and token).
# The seed table for a 70B model (decimal GB), and the real Llama-2-70B's 68.98 B parameters beside it:

# %%
# NBVAL_CHECK_OUTPUT
print(estimate.format_seed_table())

# %%
# NBVAL_CHECK_OUTPUT
print(f"{'model':<14}{'weights bf16':>14}{'KV / token':>12}{'KV 8k x 16':>12}{'total':>10}")
for name in ("smollm2-135m", "llama-2-7b", "llama-3-8b", "llama-2-70b", "llama-3-70b"):
    e = estimate.estimate(name, "bf16", context=8192, batch=16)
    print(f"{name:<14}{e.weight_bytes / 1e9:>11.2f} GB{e.kv_bytes_per_token / 1024:>8.0f} KiB"
          f"{e.kv_cache_bytes / 1e9:>9.1f} GB{e.total_bytes / 1e9:>7.1f} GB")

# %% [markdown]
# Llama-2-7B keeps 32 KV heads; Llama-3-8B shares 8 among its 32 query heads (grouped-query attention), so its
# cache is 4× smaller per token. At 16 sequences of 8k tokens the cache outweighs Llama-2-7B's own weights. The
# same estimate from a terminal: `minillm estimate --model llama-2-70b --dtype fp16 --context 4096 --batch 8`.
#
# **What to remember**
# * prefill is compute-bound (TTFT), decode is memory-bound (TPOT); batching is how decode uses the arithmetic;
# * arithmetic intensity against the ridge point tells which limit a kernel hits;
# * the KV cache, not only the weights, decides how many sequences fit: chapters 2 to 5 manage it.
