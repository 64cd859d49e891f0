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
# # Chapter 2 — The KV cache: why cache, and what a contiguous cache wastes
#
# A decoder layer's attention lets token `t` read the **keys and values** of tokens `0 … t`. Those K/V depend only
# on the tokens up to their own position (the causal mask guarantees it), so once computed they never change.
# Generating without keeping them means recomputing every earlier token at every step; keeping them (the
# **KV cache**) means each decode step computes exactly one new token and reads the rest from memory.
#
# This chapter measures that trade on the bundled model, writes the mask that makes every phase (prefill,
# chunked prefill, decode) one attention call, and looks at the simplest cache layout, **contiguous**: one
# region of `max_model_len` slots per sequence, and how much of it is never used.
#
# Your exercises, in `exercises/ch02_kv_cache.py` (then `minillm grade ch02`): `causal_mask`, and the interview
# question `kv_cache_bytes` at the end.

# %%
import time

import matplotlib.pyplot as plt
import torch

from minillm import LLM, SamplingParams
from minillm.bench.workload import synthetic_prompts
from minillm.course.impl import load_function
from minillm.engine.kv_cache import kv_bytes_per_block
from minillm.engine.kv_waste import kv_memory_waste

causal_mask = load_function("ch02.causal_mask")
llm = LLM(seed=0, max_model_len=256, max_num_seqs=4, scheduling="static")  # static batching, contiguous cache
prompt = synthetic_prompts(llm.tokenizer, 1, 32)[0]
NEW_TOKENS = 8
REPEATS = 3  # timings on a shared CPU are noisy: interleave the two methods and keep the median of each

# %% [markdown]
# ## 1. Recompute or cache: measured
#
# *Without a cache*: to get token `i` we run the whole sequence so far (prompt + `i` generated tokens) through
# the model again, one full prefill per generated token. *With the cache*: one prefill of the prompt, then one
# token per step. Same greedy decoding, so the same tokens (up to floating-point ties). Each method runs
# `REPEATS` times, the two interleaved so that both see the same load on the machine, and we keep the median of
# every token's time: one slow run (another process waking up) then cannot flip the comparison.

# %%
greedy_one = SamplingParams(temperature=0, max_tokens=1)


def without_cache() -> tuple[list[float], list[int]]:
    """Every step is a prefill of everything so far; returns (ms per token, tokens)."""
    tokens, ms = list(prompt), []
    for _ in range(NEW_TOKENS):
        t0 = time.perf_counter()
        out = llm.generate([tokens], greedy_one)[0]
        ms.append(1e3 * (time.perf_counter() - t0))
        tokens.append(out.outputs[0].token_ids[0])
    return ms, tokens[len(prompt):]


def with_cache() -> tuple[list[float], list[int]]:
    """One prefill, then one token per step (streamed); returns (ms per token, tokens)."""
    ms, tokens, t0 = [], [], time.perf_counter()
    for delta in llm.generate_stream(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)):
        ms.append(1e3 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        tokens += delta.outputs[0].token_ids
    return ms[:NEW_TOKENS], tokens[:NEW_TOKENS]


runs = {"no cache": [], "with cache": []}
for _ in range(REPEATS):
    for name, fn in (("no cache", without_cache), ("with cache", with_cache)):
        runs[name].append(fn())
median_ms = {name: torch.tensor([ms for ms, _ in r]).median(dim=0).values for name, r in runs.items()}
recompute_ms, stream_ms = median_ms["no cache"], median_ms["with cache"]
no_cache_tokens, cached_tokens = runs["no cache"][0][1], runs["with cache"][0][1]
for name, ms in median_ms.items():
    print(f"{name:10s}: {float(ms.sum()):6.0f} ms for {NEW_TOKENS} tokens (median of {REPEATS} runs, per token)")
print("same tokens:", no_cache_tokens == cached_tokens)

# %% [markdown]
# Count the work instead of timing it: the tokens each approach pushes through the 30 layers.

# %%
# NBVAL_CHECK_OUTPUT
p, n = len(prompt), NEW_TOKENS
no_cache_work = sum(p + i for i in range(n))  # step i runs the prompt and the i tokens generated so far
cache_work = p + (n - 1)  # the prompt once, then each new token once (the last one is never fed back)
print(f"prompt {p} tokens, {n} new tokens")
print(f"tokens through the model without a cache: {no_cache_work}")
print(f"tokens through the model with a cache   : {cache_work}  ({no_cache_work / cache_work:.1f}x less)")
print(f"for a 2000-token prompt and 500 new tokens: {sum(2000 + i for i in range(500)) / (2000 + 499):.0f}x less")

# %%
fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
ax.plot(range(1, n + 1), recompute_ms, "o-", label="no cache: a prefill of everything so far")
ax.plot(range(1, n + 1), stream_ms, "s-", label="KV cache: prefill once, then one token per step")
ax.set_xlabel("generated token")
ax.set_ylabel(f"ms for this token (median of {REPEATS})")
ax.set_ylim(bottom=0)
ax.set_title("The cost of not caching keys and values (this machine)")
ax.legend()
plt.show()

# %% [markdown]
# Without a cache each token costs a prefill, growing with the sequence (over n tokens the weight matmuls' work
# grows quadratically and attention's cubically); with it, the first token pays the prefill and every other one
# costs a single-token step. The price is memory, and it is the subject of the rest of this chapter and of
# chapter 5.
#
# ## 2. One mask for prefill, chunks and decode
#
# With a cache, a step's queries are the **last** `q_len` of the `kv_len` tokens whose K/V are available: a
# prefill has `q_len = kv_len`, a decode step `q_len = 1`, a prompt chunk (or a prefix-cache hit) something in
# between. Query `i` sits at position `kv_len − q_len + i` and may see keys up to there: the mask is aligned to
# the **bottom right**. **Exercise `ch02.causal_mask`**.

# %%
# NBVAL_CHECK_OUTPUT
for q_len, kv_len, what in ((4, 4, "prefill"), (3, 7, "chunk: 3 new tokens after 4 cached"), (1, 5, "decode")):
    print(f"{what} (q_len={q_len}, kv_len={kv_len}):")
    print("\n".join("  " + " ".join("x" if v else "." for v in row) for row in causal_mask(q_len, kv_len).tolist()))

# %% [markdown]
# Some models cap how far back a token looks: Mistral 7B v0.1 attends through a **sliding window** of 4,096 keys
# (Qwen2 in its upper layers when `use_sliding_window` is set). Query `i` at position `pos` sees keys
# `pos − window + 1 .. pos`: the causal mask with its far corner cut off, so attention's cost per token stops
# growing with the context. A decode step need not even pass the keys before its window (`first_key` drops them
# from the columns). **Exercise `ch02.sliding_window_mask`** (the engine's torch path calls it for such layers).

# %%
# NBVAL_CHECK_OUTPUT
sliding_window_mask = load_function("ch02.sliding_window_mask")
for q_len, kv_len, window, first in ((6, 6, 3, 0), (2, 9, 3, 5)):
    print(f"q_len={q_len}, kv_len={kv_len}, window={window}, first_key={first}:")
    mask = sliding_window_mask(q_len, kv_len, window, first)
    print("\n".join("  " + " ".join("x" if v else "." for v in row) for row in mask.tolist()))

# %% [markdown]
# ## 3. The contiguous cache
#
# How big is one token's K/V? Two tensors (K and V) per layer, each `num_kv_heads × head_dim` numbers. The simplest
# layout gives every batch slot one region of `max_model_len` slots, reserved when a request is admitted, because
# nobody knows in advance how long a sequence will get. That is what this `LLM` (static batching) allocated:

# %%
# NBVAL_CHECK_OUTPUT
cfg = llm.llm_engine.model_config
per_token = kv_bytes_per_block(cfg, 1, torch.float32)
cache = llm.llm_engine.runner.kv_cache
print(f"K/V per token: 2 x {cfg.num_hidden_layers} layers x {cfg.num_key_value_heads} heads x {cfg.head_dim} "
      f"x 4 bytes = {per_token / 1024:.0f} KiB")
print(f"contiguous cache: {cache.num_blocks} slots x {cache.block_size} tokens = {cache.nbytes / 2**20:.1f} MiB")

# %% [markdown]
# Now a batch of chat requests of realistic lengths (prompt + answer), in the 2048-token window a CPU `LLM` uses
# by default and in the model's full 8192-token context:

# %%
# NBVAL_CHECK_OUTPUT
lengths = [87, 412, 23, 1290, 160, 64, 515, 33]
for window in (2048, 8192):
    w = kv_memory_waste(lengths, block_size=16, max_model_len=window)
    print(f"window {window}: reserved {w['contiguous_slots']:6d} slots for {w['tokens']} tokens -> "
          f"{100 * w['contiguous_waste_fraction']:.1f}% wasted ({w['contiguous_waste'] * per_token / 2**20:.0f} MiB)")

# %%
fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
ax.bar(range(len(lengths)), [2048] * len(lengths), color="0.85", label="reserved, never written")
ax.bar(range(len(lengths)), lengths, color="C0", label="used by the sequence")
ax.set_xlabel("sequence")
ax.set_ylabel("token slots")
ax.set_title("A contiguous KV cache, max_model_len = 2048")
ax.legend()
plt.show()

# %% [markdown]
# Most of the cache holds nothing, and the memory it wastes is memory that could have held more sequences, that is,
# a larger batch (chapter 1: batching is how decode uses the GPU). Worse, a request whose length we do not know
# cannot be admitted unless a whole `max_model_len` region is free. Chapter 5 fixes this with **paging**: blocks of
# 16 tokens handed out as a sequence grows; chapter 6 uses the freed memory to batch continuously.
#
# ## 4. Interview questions
#
# 1. *Why cache K and V, but not Q?* <details><summary>answer</summary>A past token's query is used once, at its own
#    step; its key and value are read by every later token. With the cache a decode step computes one q, k, v.</details>
# 2. *What does a KV cache do to the cost of generating n tokens?* <details><summary>answer</summary>Without it,
#    step i reprocesses all p + i tokens: the weight matmuls' total work grows quadratically in n and attention's
#    (all pairs of p + i tokens, at every step) cubically. With it, each step processes one token and
#    attention reads the i cached keys: linear compute per step, but memory that grows with the context.</details>
# 3. *How do MQA and GQA change the KV cache?* <details><summary>answer</summary>The cache scales with the KV heads,
#    not the query heads: Llama-3-8B (8 KV heads for 32 query heads) keeps 4x less than with MHA.</details>
# 4. *Why does one bottom-right aligned causal mask serve prefill, chunked prefill and decode?*
#    <details><summary>answer</summary>The queries are always the last q_len of the kv_len tokens: query i sits at
#    position kv_len - q_len + i and sees every key up to there.</details>
# 5. *What does a contiguous KV cache waste, and what fixes it?* <details><summary>answer</summary>Each sequence
#    reserves max_model_len slots; real sequences use a fraction. Paging (chapter 5) allocates 16-token blocks on
#    demand: the waste falls to less than a block per sequence.</details>
#
# A question whose answer is a number (exercise `ch02.kv_cache_bytes`): *how large is the KV cache of Llama-3-8B
# (32 layers, 8 KV heads, head_dim 128) in bf16 for one token, and for 16 sequences of 8k tokens? How many 8k-token
# sequences fit on one H200 (141 GB) beside the 16.06 GB of bf16 weights (ignore activations)?* And check your
# function on the model of this notebook against the size of the cache it allocated.

# %%
# NBVAL_CHECK_OUTPUT
kv_cache_bytes = load_function("ch02.kv_cache_bytes")
one = kv_cache_bytes(32, 8, 128, 2, 1)
print(f"Llama-3-8B bf16: {one / 1024:.0f} KiB per token, {kv_cache_bytes(32, 8, 128, 2, 16 * 8192) / 1e9:.1f} GB "
      f"for 16 x 8k tokens")
print(f"8k-token sequences that fit beside the weights on an H200: {int((141e9 - 16.06e9) // (8192 * one))}")
smollm = kv_cache_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4, cache.num_blocks * cache.block_size)
print(f"SmolLM2 fp32, {cache.num_blocks * cache.block_size} slots: {smollm / 2**20:.1f} MiB "
      f"(the cache allocated above: {cache.nbytes / 2**20:.1f} MiB)")

# %% [markdown]
# **What to remember**
# * K/V of past tokens never change, so caching them turns quadratic recomputation into one token of work per step;
# * one bottom-right aligned causal mask covers prefill, chunked prefill and decode;
# * a contiguous cache reserves `max_model_len` per sequence and wastes most of it on real length distributions.
