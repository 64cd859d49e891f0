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
# the **roofline model**, and the other budget that decides what you can serve: **memory**. Then it opens the
# model: the two layers every Llama block runs (RMSNorm, RoPE) and the filters that pick the next token.
#
# Your exercises, in `exercises/ch01_basics.py` (then run `minillm grade ch01`): `arithmetic_intensity`,
# `rms_norm`, `rope` (`apply_rotary`), `top_k_filter`, `top_p_filter`, the penalties `apply_penalties`, and two
# interview questions with a numeric answer at the end (`batch1_decode_tokens_per_s`, `critical_batch_size`).
#
# Whose code runs: your `exercises/` by default. A function you have not attempted yet falls back to the reference,
# with a one-line banner naming it (`ch01.rms_norm: not attempted yet, using the reference`), so every cell runs.
# To choose, start Jupyter with `MINILLM_IMPL=solutions` (the reference everywhere), `MINILLM_IMPL=exercises` (the
# default) or `MINILLM_IMPL=PATH` (any folder laid out like `exercises/`), e.g. `MINILLM_IMPL=solutions make lab`.

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
# the first step of each shape pays one-time costs (layout timing, kernel builds): paid here, not in the timings
print(f"warm-up: {harness.warm_up(llm):.1f} s")

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
# We measure this machine (a 1024³ matmul and a 64 MiB copy, a second or so), and put it beside the H200 we
# benchmark on, as measured there (shared/GPU.md): 4.24 TB/s copy, 670-720 TFLOP/s bf16 GEMM (we take 700),
# 1285 TFLOP/s fp8 GEMM. (The datasheet says 989 TFLOP/s dense bf16 for the H100 and the H200 alike: a peak
# no real GEMM reaches. We always use the measured figure.)

# %%
here = roofline.measure_machine()
print(f"{here.name}: {here.flops / 1e9:.1f} GFLOP/s, {here.bandwidth / 1e9:.1f} GB/s, "
      f"ridge at {here.ridge_point:.1f} FLOPs/byte")

# %%
# NBVAL_CHECK_OUTPUT
for peak in (roofline.H200_BF16, roofline.H200_FP8):
    print(f"{peak.name}: ridge point {peak.ridge_point:.0f} FLOPs/byte; "
          f"at I = 1 it reaches {100 * peak.attainable(1.0) / peak.flops:.2f}% of its peak")

# %% [markdown]
# The H200 needs about 165 FLOPs per byte to be busy in bf16. Decode at batch 1 offers about 1: at most 0.6% of
# the GPU's arithmetic can be used. Now time the model's largest matmul, the LM head, at a decode size (m = 1) and a
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
# bf16 solid, fp8 dashed: both roofs share the H200's memory slope (same bandwidth), only the flat roof differs
roofline.plot_roofline([here, roofline.H200_BF16, roofline.H200_FP8], guides, measured, ax=ax)
plt.show()

# %% [markdown]
# Read the plot from left to right: decode at batch 1 sits far down the memory slope, batching slides it up the
# slope (chapter 6: continuous batching), prefill sits under the flat roof. Quantized weights (chapters 7 and 8)
# halve or quarter the bytes, which moves decode to the right: the same bandwidth now carries more FLOPs.

# %%
if torch.cuda.is_available():
    gpu = roofline.measure_machine(size=8192, num_bytes=1 << 30, device="cuda", dtype=torch.bfloat16)
    print(f"{gpu.name}: {gpu.flops / 1e12:.0f} TFLOP/s bf16, {gpu.bandwidth / 1e12:.2f} TB/s, "
          f"ridge {gpu.ridge_point:.0f} FLOPs/byte")
else:
    print("on the H200 this cell would measure an 8192^3 bf16 matmul (~700 TFLOP/s) and a 1 GiB copy "
          "(~4.2 TB/s), putting the ridge point near 165 FLOPs/byte")

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
# ## 5. Inside a block: RMSNorm
#
# Now open the model. Each of SmolLM2's 30 blocks normalises its input twice (before attention, before the MLP)
# with **RMSNorm**: every token's hidden vector is divided by its root mean square and multiplied by a learned
# per-channel weight,
#
# $$ y = \frac{x}{\sqrt{\tfrac{1}{d}\sum_i x_i^2 + \varepsilon}} \odot w .$$
#
# Unlike LayerNorm it does not subtract the mean (one reduction instead of two, and it works as well). Two
# details matter: the sum of squares runs over the **last** dimension (the hidden size, one row per token), and it
# is computed in fp32 even when `x` is bf16 (576 squares summed in bf16 lose most of their bits). `eps` keeps a
# row of zeros from dividing by zero. **Exercise `ch01.rms_norm`**: below, rows of very different scales come
# out with RMS exactly 1 (weight = 1), and an all-zero row stays zero.

# %%
rms_norm = load_function("ch01.rms_norm")
g = torch.Generator().manual_seed(1)
rows = torch.randn(5, 576, generator=g) * torch.tensor([[0.01], [0.5], [1.0], [8.0], [0.0]]) + 0.3
rows[4] = 0.0
normed = rms_norm(rows, torch.ones(576), 1e-5)

# %%
# NBVAL_CHECK_OUTPUT
rms = lambda t: t.pow(2).mean(-1).sqrt()  # noqa: E731
print("RMS before:", [f"{v:.3f}" for v in rms(rows).tolist()])
print("RMS after :", [f"{v:.3f}" for v in rms(normed).tolist()])
print("mean after (not removed):", [f"{v:.2f}" for v in normed.mean(-1).tolist()])

# %%
fig, ax = plt.subplots(figsize=(7, 2.8), layout="constrained")
ax.bar([i - 0.2 for i in range(5)], rms(rows), width=0.4, label="RMS of the row before")
ax.bar([i + 0.2 for i in range(5)], rms(normed), width=0.4, label="after your rms_norm")
ax.set_yscale("symlog", linthresh=0.01)
ax.set_xticks(range(5), ["x0.01", "x0.5", "x1", "x8", "zeros"])
ax.set_xlabel("row (scale of its values)")
ax.set_title("RMSNorm: every token's vector leaves with RMS 1, whatever came in")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 6. Inside attention: rotary position embeddings (RoPE)
#
# Attention compares a query with keys by a dot product, which knows nothing of order. RoPE writes the position
# into `q` and `k` by **rotating** them: channel pairs `(x_i, x_{i+D/2})` of the token at position `p` turn by the
# angle `p·θ_i`, with frequencies `θ_i = base^{-2i/D}` (SmolLM2: base 10⁵, D = 64). A rotation keeps lengths, and
# the dot product of a query rotated by `m·θ` with a key rotated by `n·θ` depends only on `m − n`: attention sees
# **relative** positions, whatever the absolute ones. Note the pairing: Llama-family weights pair channel `i`
# with `i + D/2` ("rotate half"), not `2i` with `2i + 1`. **Exercise `ch01.rope`** (`apply_rotary`): below, one
# query and one key placed at every position 0..47, compared by your function's output.

# %%
from minillm.layers.rotary import rope_inv_freq

apply_rotary = load_function("ch01.rope")
positions = torch.arange(48)
angles = positions[:, None].float() * rope_inv_freq(64, 1e5)[None, :]  # [48, 32]
cos, sin = angles.cos(), angles.sin()
q_vec, k_vec = torch.randn(64, generator=g), torch.randn(64, generator=g)
q_rot = apply_rotary(q_vec.expand(48, 1, 64).clone(), cos, sin)[:, 0]  # the same query at 48 positions
k_rot = apply_rotary(k_vec.expand(48, 1, 64).clone(), cos, sin)[:, 0]
scores = q_rot @ k_rot.T  # scores[m, n]: query at position m, key at position n

# %%
# NBVAL_CHECK_OUTPUT
print(f"|q| kept by the rotation: {bool(torch.allclose(q_rot.norm(dim=-1), q_vec.norm().expand(48), rtol=1e-5))}")
for offset in (0, 3, 10):
    diag = torch.diagonal(scores, -offset)  # every (m, n) with m - n = offset
    print(f"m - n = {offset:2d}: score {float(diag[0]):8.4f} at all {diag.numel()} positions (to 1e-4): "
          f"{float(diag.max() - diag.min()) < 1e-4}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
im = axes[0].imshow(scores, cmap="RdBu_r")
axes[0].set_xlabel("key position n")
axes[0].set_ylabel("query position m")
axes[0].set_title("q(m) . k(n) with your apply_rotary: constant along diagonals", fontsize=10)
fig.colorbar(im, ax=axes[0], shrink=0.8)
m_idx, n_idx = torch.tril_indices(48, 48)  # every pair with the key at or before the query
axes[1].scatter(m_idx - n_idx, scores[m_idx, n_idx], s=4, label="all 1176 pairs (m, n), n <= m")
axes[1].set_xlabel("m - n (relative position)")
axes[1].set_ylabel("score")
axes[1].set_title("plotted against m - n, the pairs fall on one curve", fontsize=10)
axes[1].legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 7. Choosing the next token: top-k and top-p
#
# The model's last layer gives a **logit** per vocabulary entry. Greedy decoding takes the largest; sampling
# divides by a temperature, applies a softmax and draws. Drawing from the whole vocabulary lets the long tail of
# unlikely tokens through now and then, so two filters cut it first (they set the removed logits to `-inf`, so
# the softmax gives them probability 0):
#
# * **top-k** keeps the `k` largest logits of each row, whatever their probabilities;
# * **top-p** (nucleus sampling, Holtzman et al. 2019) keeps the smallest set of most likely tokens whose
#   probabilities add up to `p`: few tokens when the model is sure, many when it hesitates.
#
# **Exercises `ch01.top_k_filter` and `ch01.top_p_filter`**: each works on a batch, one `k` or `p` per row.
# Below, a confident and a hesitant distribution over 30 tokens through both filters.

# %%
top_k_filter = load_function("ch01.top_k_filter")
top_p_filter = load_function("ch01.top_p_filter")
logits = torch.stack([-0.45 * torch.arange(30.0), -0.08 * torch.arange(30.0)])  # sure, hesitant
kept_k = top_k_filter(logits.clone(), torch.tensor([8, 8]))
kept_p = top_p_filter(logits.clone(), torch.tensor([0.9, 0.9]))

# %%
# NBVAL_CHECK_OUTPUT
for row, what in enumerate(("confident", "hesitant")):
    print(f"{what:9s}: top-k 8 keeps {int(torch.isfinite(kept_k[row]).sum()):2d} tokens, "
          f"top-p 0.9 keeps {int(torch.isfinite(kept_p[row]).sum()):2d} tokens "
          f"(mass kept {float(torch.softmax(logits[row], -1)[torch.isfinite(kept_p[row])].sum()):.3f})")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3), sharey=True, layout="constrained")
for row, (ax, what) in enumerate(zip(axes, ("a confident model", "a hesitant model"))):
    probs = torch.softmax(logits[row], -1)
    ax.bar(range(30), probs, color="0.8", label="all tokens")
    ax.bar(range(30), torch.where(torch.isfinite(kept_p[row]), probs, 0), color="C0", label="kept by top-p 0.9")
    ax.axvline(7.5, color="C3", ls="--", label="top-k 8 cut")
    ax.set_title(what, fontsize=10)
    ax.set_xlabel("token (most likely first)")
axes[0].set_ylabel("probability")
axes[0].legend(fontsize=8)
plt.show()

# %% [markdown]
# Top-k keeps 8 tokens in both cases: more than the 6 that hold 90% of the confident model's mass, far fewer than
# the 22 the hesitant one needs. Top-p adapts. Engines apply both (and a temperature) per request: every request
# of a batch has its own `k` and `p`, hence the per-row tensors.
#
# Your four functions sit in the engine's path (through `dispatch`): run the model once with the reference and
# once with yours, same seed, sampling with temperature, top-k and top-p. The tokens must be identical.

# %%
from minillm.course.overrides import use_overrides

sampled = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, max_tokens=12, seed=7)
question = [{"role": "user", "content": "Name a colour."}]
reference = llm.chat(question, sampled)[0].outputs[0]
with use_overrides({"ch01.rms_norm": rms_norm, "ch01.rope": apply_rotary, "ch01.top_k_filter": top_k_filter,
                    "ch01.top_p_filter": top_p_filter}):
    yours = llm.chat(question, sampled)[0].outputs[0]
print(repr(yours.text))

# %%
# NBVAL_CHECK_OUTPUT
print("same tokens with your rms_norm, rope, top_k_filter, top_p_filter:", yours.token_ids == reference.token_ids)

# %% [markdown]
# Before any of this, a request may change the logits themselves (**logits processors**, vLLM's and OpenAI's
# names): `repetition_penalty` r divides the positive logits of every token already in the prompt or the output
# by r (and multiplies the negative ones), `frequency_penalty` subtracts a constant per earlier occurrence in the
# output, `presence_penalty` once per token the output holds, `logit_bias` adds a constant to chosen token ids, and
# `min_tokens` bans end-of-sequence until that many tokens are out. They act before the argmax, so they change
# greedy decoding too; `min_p` (keep tokens at least `min_p` times as likely as the best) filters after the
# temperature. A small model asked to repeat itself, greedy, without and with penalties:

# %%
repeat = [{"role": "user", "content": "Write the word 'cat' ten times."}]
for name, extra in (("no penalty", {}), ("repetition_penalty=1.3", dict(repetition_penalty=1.3)),
                    ("frequency_penalty=1.0", dict(frequency_penalty=1.0))):
    text = llm.chat(repeat, SamplingParams(temperature=0, max_tokens=24, **extra))[0].outputs[0].text
    print(f"{name:24s} {text!r}")

# %% [markdown]
# The repetition penalty counts the prompt too, so "cat" (asked for) is penalized from the first token and a
# 135M-parameter model swerves into invented words; the frequency penalty counts only what was generated, and the
# answer stops after a few repeats. Penalties are blunt tools: vLLM leaves them off by default, as minillm does.
#
# **Exercise `ch01.apply_penalties`**: the three penalties on a batch of rows, each with its own history (padded
# with -1) and its own three numbers. The engine calls your function before every penalized sample; the same
# greedy answer with yours plugged in means it counts what the reference counts.

# %%
apply_penalties = load_function("ch01.apply_penalties")
penalized = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.2, frequency_penalty=0.5,
                           presence_penalty=0.3)
reference = llm.chat(repeat, penalized)[0].outputs[0]
with use_overrides({"ch01.apply_penalties": apply_penalties}):
    yours = llm.chat(repeat, penalized)[0].outputs[0]

# %%
# NBVAL_CHECK_OUTPUT
print("same tokens with your apply_penalties:", yours.token_ids == reference.token_ids)

# %% [markdown]
# ## 8. The course in one table
#
# Every later chapter removes one cost from the way this model generates text. `minillm bench stack` measures them
# stacked, on one workload and the same weights: each row keeps everything the rows above it switched on and adds
# one technique (the chapter that builds it is in the second column). Below, a small version on this machine:
# 4 requests sharing a 32-token system prompt, answers of 3 to 12 tokens, batches of 2. TTFT counts from the
# moment all requests arrive, so it includes the wait behind earlier requests. Rows that need a GPU say so; run
# `minillm bench stack` in a terminal (or on a GPU) for the full-size table.

# %%
from minillm.bench.plots import plot_stack
from minillm.bench.stack import format_stack, run_stack

rows = run_stack(num_prompts=4, batch=2, prefix_len=32, suffix_len=8, output_len=12, verbose=False)
print(format_stack(rows))
fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
plot_stack(rows, ax)
plt.show()

# %% [markdown]
# Read it from the top. Without a cache every token is a prefill of everything so far (chapter 2); with it, each
# token is one step. Batching makes one step serve several sequences: the weights are read once per step, not
# once per sequence (section 2's arithmetic intensity). Continuous batching stops waiting for a batch's longest
# answer, and the prefix cache stops recomputing the shared system prompt (chapters 5 and 6). On a GPU the next
# rows remove what the arithmetic does not need: kernel launches (CUDA graphs), Python between steps (async
# scheduling) and weight bytes (FP8). Speculative decoding (chapter 9) is the row that can go *down*: it spends
# idle compute to save steps, and a CPU, or a batch that already uses the compute, has none to spare.
# On a GPU the same command fills every row; benchmarks/RESULTS.md records the tables we measured. Here is the
# H200's (2026-12-05, bf16, the full-size defaults: 32 requests, a 256-token shared prefix, outputs 37 to 128):
#
# | row | tok/s | x above |
# |---|---:|---:|
# | no KV cache | 30 | - |
# | + KV cache | 21 | 0.69x |
# | + static batching | 96 | 4.55x |
# | + paged KV, continuous batching | 123 | 1.29x |
# | + prefix caching | 228 | 1.85x |
# | + Triton kernels | 112 | 0.49x |
# | + CUDA graphs | 3,922 | 35.1x |
# | + async scheduling | 5,954 | 1.52x |
#
# Until CUDA graphs every row is bound by the CPU launching kernels one at a time: a 135M-parameter model leaves
# the GPU idle between launches, so a row that launches more kernels per step loses (a decode step launches more
# than a prefill; Triton's launches from Python cost more than torch's). One graph replay per step is worth 35x.
# The FP8 row of that run measured a bug: the engine's FP8 layers were emulated in fp32 on the GPU. On their
# kernels (an H100, the same table: 6,262 tok/s after async scheduling) FP8 reached 5,559, 0.89x: on a model this
# small a layer's matmul is a few microseconds whatever its bytes, and the bf16 layers fuse RMSNorm and SwiGLU
# into their decode kernels while the FP8 ones still launch them; FP8 pays on 8B-class models (chapter 7).

# %% [markdown]
# ## 9. Interview questions
#
# Classic questions on this chapter's material; try them before opening the answers.
#
# 1. *Why is decode memory-bound and prefill compute-bound?* <details><summary>answer</summary>Per weight byte read,
#    a decode step does ~1 FLOP per sequence in the batch (m = 1 per sequence); prefill does one per prompt token.
#    The ridge point of a GPU is ~165 FLOPs/byte (H200, bf16): decode sits far below it, prefill above.</details>
# 2. *What are TTFT and TPOT, and which phase sets each?* <details><summary>answer</summary>Time to first token:
#    queueing + the prompt's prefill. Time per output token: one decode step (plus whatever else shares the step:
#    other requests' prefill chunks).</details>
# 3. *Why does batching help decode but hardly help prefill?* <details><summary>answer</summary>Batching raises m,
#    the reuse of each weight byte. Prefill already reuses it hundreds of times and sits under the flat roof.</details>
# 4. *RMSNorm vs LayerNorm?* <details><summary>answer</summary>No mean subtraction and no bias: one reduction.
#    Compute the mean of squares in fp32.</details>
# 5. *Why does RoPE give relative positions?* <details><summary>answer</summary>Rotating q by mθ and k by nθ makes
#    q·k depend on (m − n)θ only: the rotations compose.</details>
# 6. *Top-k vs top-p?* <details><summary>answer</summary>top-k keeps a fixed count; top-p a fixed probability mass,
#    so the number kept adapts to the model's confidence.</details>
#
# Two questions whose answer is a number you compute with your own code (graded as exercises
# `ch01.batch1_decode_tokens_per_s` and `ch01.critical_batch_size`, in `exercises/ch01_basics.py`):
#
# 7. *What is the most tokens per second one H200 (4.24 TB/s) can decode at batch 1 for Llama-3-8B (8.03 B
#    parameters) in bf16? In int4?*
# 8. *From which batch size is the decode step's weight matmul compute-bound on an H200, in bf16 (700 TFLOP/s) and
#    in fp8 (1285 TFLOP/s, 1 byte per weight)?*

# %%
# NBVAL_CHECK_OUTPUT
batch1_decode_tokens_per_s = load_function("ch01.batch1_decode_tokens_per_s")
critical_batch_size = load_function("ch01.critical_batch_size")
for dtype, nbytes in (("bf16", 2), ("int4", 0.5)):
    print(f"7. Llama-3-8B {dtype} on an H200: at most {batch1_decode_tokens_per_s(8.03e9, nbytes, 4.24e12):6.1f} tokens/s")
for peak in (roofline.H200_BF16, roofline.H200_FP8):
    nbytes = 2 if "bf16" in peak.name else 1
    print(f"8. {peak.name}: compute-bound from batch {critical_batch_size(peak.flops, peak.bandwidth, nbytes)}")

# %% [markdown]
# For scale: on the H200, gpt-fast decodes that model at 186 tokens/s and minillm with CUDA graphs at 195
# (shared/GPU.md): 70-75% of the weight-read ceiling of question 7. The fp8 answer to question 8 is *smaller*
# than the bf16 one: fp8 halves the bytes per weight (intensity doubles) but less than doubles the flat roof.
#
# **What to remember**
# * prefill is compute-bound (TTFT), decode is memory-bound (TPOT); batching is how decode uses the arithmetic;
# * arithmetic intensity against the ridge point tells which limit a kernel hits;
# * the KV cache, not only the weights, decides how many sequences fit: chapters 2 to 6 manage it;
# * a Llama block is RMSNorm, attention with RoPE, RMSNorm, MLP; sampling filters the logits (top-k, top-p) and draws.
