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
# # Chapter 6 — Continuous batching: admission, preemption, prefix caching, chunked prefill
#
# Chapter 2 batched requests *statically*: take a batch, run it until its longest request ends, then take the
# next. Every slot whose request finished early idles until then, and a new request waits for the whole batch.
# **Continuous batching** (Orca, OSDI 2022: *iteration-level scheduling*) re-forms the batch at every step: a
# finished request leaves at once and a waiting one takes its place. With chapter 5's paged pool, the scheduler
# decides each step, from block counts alone:
#
# * which **running** sequences get room for their next tokens, and whom to **preempt** when the pool is full
#   (by **swap** to CPU memory or by **recompute**);
# * which **waiting** requests to **admit**, keeping a small **watermark** of free blocks;
# * which prompt blocks are already in the **prefix cache**, and how to cut long prompts into **chunks**.
#
# Your exercises, in `exercises/ch06_scheduling.py` (then `minillm grade ch06`): `admit_or_preempt` (the
# scheduler's decision) and `swap_out_mapping` (where a swapped block goes), which the scheduler calls,
# `resolve_deferred_ids` (async scheduling's gather, section 6), and the interview question `batching_steps` at the
# end. Section 4 runs chapter 5's `hash_block` in the prefix cache.

# %%
import time

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Patch

from minillm import LLM, SamplingParams
from minillm.bench.workload import synthetic_prompts
from minillm.course.impl import load_function
from minillm.course.overrides import use_overrides
from minillm.engine.block_manager import BlockManager
from minillm.engine.sequence import Sequence

admit_or_preempt = load_function("ch06.admit_or_preempt")
swap_out_mapping = load_function("ch06.swap_out_mapping")
resolve_deferred_ids = load_function("ch06.resolve_deferred_ids")
hash_block = load_function("ch05.hash_block")

# %% [markdown]
# ## 1. Static vs continuous, from real runs
#
# Eight requests, 12-token prompts, 4 to 24 output tokens each, at most 4 sequences at a time, on the bundled
# model. We step each engine by hand and record which requests took part in every step.

# %%
OUTPUT_LENS = [24, 4, 10, 18, 6, 22, 8, 14]


def run_and_record(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> tuple[list[dict], float]:
    """Step the engine until all requests finish; per step, {request_id: output tokens so far}."""
    engine = llm.llm_engine
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    steps, t0 = [], time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if outputs:
            steps.append({o.request_id: len(o.outputs[0].token_ids) for o in outputs})
    return steps, time.perf_counter() - t0


static_llm = LLM(seed=0, max_model_len=128, max_num_seqs=4, scheduling="static")
prompts = synthetic_prompts(static_llm.tokenizer, 8, 12)
static_steps, static_s = run_and_record(static_llm, prompts, OUTPUT_LENS)
cont_llm = LLM(seed=0, max_model_len=128, max_num_seqs=4, scheduling="continuous", num_kv_blocks=64)
cont_steps, cont_s = run_and_record(cont_llm, prompts, OUTPUT_LENS)
print(f"static: {static_s:.1f} s, continuous: {cont_s:.1f} s")


# %%
WAITING, PREFILL, DECODE = "0.88", "0.2", "C0"


def gantt(ax, steps: list[dict], title: str) -> None:
    """One row per request: waiting (light grey), prefill (dark), decode (blue), from the recorded steps."""
    names = sorted({r for s in steps for r in s}, key=lambda r: int(r[1:]))
    for row, r in enumerate(names):
        seen = [i for i, s in enumerate(steps) if r in s]
        ax.barh(row, seen[0], left=0, color=WAITING)
        for i in seen:
            first = steps[i][r] == 1 and (i == seen[0] or steps[i - 1].get(r, 0) == 0)
            ax.barh(row, 1, left=i, color=PREFILL if first else DECODE, edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(names)), [f"{r} ({n} tok)" for r, n in zip(names, OUTPUT_LENS)])
    ax.set_xlabel("engine step")
    ax.set_title(title, fontsize=10)


# shared axes: one step has the same width in both panels, and r0 is on top in both (invert the shared y once)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharex=True, sharey=True, layout="constrained")
gantt(axes[0], static_steps, f"static batching: {len(static_steps)} steps")
gantt(axes[1], cont_steps, f"continuous batching: {len(cont_steps)} steps")
axes[0].invert_yaxis()
axes[1].legend(handles=[Patch(color=WAITING, label="waiting"), Patch(color=PREFILL, label="prefill"),
                        Patch(color=DECODE, label="decode")], loc="lower right", fontsize=8)
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
def first_step(steps: list[dict]) -> list[int]:
    return [next(i for i, s in enumerate(steps) if f"r{k}" in s) for k in range(len(OUTPUT_LENS))]


for name, steps in (("static", static_steps), ("continuous", cont_steps)):
    batch = sum(len(s) for s in steps) / len(steps)
    print(f"{name:10s}: {len(steps)} steps, mean batch {batch:.2f}, first step of each request {first_step(steps)}")

# %% [markdown]
# Static batching runs 4 sequences only at the start of each batch; by the end the 24-token request decodes alone
# while four requests wait. Continuous batching keeps the batch full, and on a GPU, where a decode step costs
# about the same for 1 or 4 sequences, fewer steps is directly less time.
#
# ## 2. The decision: admit, wait, run or preempt
#
# Every step the scheduler walks three queues: **running** sequences first (each needs blocks for its next
# tokens: "run", or "preempt" the lowest-priority running sequence and ask again), then **swapped** ones, then
# **waiting** ones ("admit" or "wait": a newcomer never evicts work in progress). Admission leaves a watermark
# of free blocks so that the running sequences can still grow next step. **Exercise `ch06.admit_or_preempt`**.

# %%
# NBVAL_CHECK_OUTPUT
print("running, needs 2, 2 free            ->", admit_or_preempt(True, 2, 2, 1, 3, 4))
print("running, needs 1 (boundary), 0 free ->", admit_or_preempt(True, 1, 0, 1, 3, 4))
print("waiting, needs 2, 3 free, wm 1      ->", admit_or_preempt(False, 2, 3, 1, 3, 4))
print("waiting, needs 2, 2 free, wm 1      ->", admit_or_preempt(False, 2, 2, 1, 3, 4))
print("waiting, batch full (4 of 4)        ->", admit_or_preempt(False, 1, 50, 1, 4, 4))

# %% [markdown]
# ## 3. Preemption: recompute or swap
#
# With a pool too small for everyone (6 blocks of 16 tokens, four requests that each grow to 36 tokens), the
# scheduler must preempt. **Recompute** frees the victim's blocks and later prefills its prompt *and* generated
# tokens again; **swap** copies its blocks to CPU memory and back. Both must produce exactly the tokens of an
# unconstrained run (greedy decoding), which we check, with your two functions plugged into the scheduler.

# %%
tiny_prompts = synthetic_prompts(static_llm.tokenizer, 4, 16, seed=1)
tiny_params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
unconstrained = [o.outputs[0].token_ids for o in cont_llm.generate(tiny_prompts, tiny_params)]
runs = {}
for mode in ("recompute", "swap"):
    llm = LLM(seed=0, max_model_len=128, max_num_seqs=4, scheduling="continuous", num_kv_blocks=6,
              preemption_mode=mode, swap_space=64 << 20)
    with use_overrides({"ch06.admit_or_preempt": admit_or_preempt, "ch06.swap_out_mapping": swap_out_mapping}):
        tokens = [o.outputs[0].token_ids for o in llm.generate(tiny_prompts, tiny_params)]
    runs[mode] = (tokens, llm.llm_engine.scheduler)

# %%
# NBVAL_CHECK_OUTPUT
for mode, (tokens, sched) in runs.items():
    tl = sched.timeline
    print(f"{mode:9s}: same tokens as unconstrained: {tokens == unconstrained}; {len(tl)} steps, "
          f"{sched.num_preemptions} preemptions, {sum(len(r.swapped_out) for r in tl)} swap-outs, "
          f"{sum(r.num_batched_tokens for r in tl)} tokens computed")
print("the work without preemption: 4 x (16 prompt + 19 generated) = 140 tokens (the last token is never fed back)")

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), layout="constrained", gridspec_kw={"width_ratios": [1, 1, 1.1]})
for ax, (mode, (_, sched)) in zip(axes, runs.items()):
    tl = sched.timeline
    x = [r.step for r in tl]
    ax.stackplot(x, [r.num_running for r in tl], [r.num_swapped for r in tl], [r.num_waiting for r in tl],
                 labels=["running", "swapped", "waiting"], colors=["C2", "C1", "0.8"], step="post")
    for r in tl:
        if r.preempted:
            ax.axvline(r.step, color="C3", lw=0.8, ls=":")
    ax.set_title(f"preemption by {mode} (dotted: a preemption)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_xlim(0, max(len(s.timeline) for _, s in runs.values()))
axes[0].set_ylabel("sequences")
axes[0].legend(loc="upper right", fontsize=8)
for mode, (_, sched) in runs.items():  # the price of each: tokens pushed through the model, step by step
    done = 0
    cumulative = [done := done + r.num_batched_tokens for r in sched.timeline]
    axes[2].step([r.step for r in sched.timeline], cumulative, where="post", label=f"{mode}: {cumulative[-1]} tokens")
axes[2].axhline(140, color="k", ls=":", lw=1, label="no preemption: 140 tokens")
axes[2].set_xlabel("step")
axes[2].set_ylabel("tokens computed so far")
axes[2].set_title("what preemption cost: recompute prefills again", fontsize=10)
axes[2].legend(fontsize=8, loc="lower right")
plt.show()

# %% [markdown]
# **When does each win?** Recompute pays a prefill of the victim's tokens (compute, done in one efficient batched
# pass); swap pays moving its KV across PCIe twice (out and back) and needs CPU space. Per token, for Llama-3-8B in
# bf16 (128 KiB of KV per token) on an H200, assuming about 25 GB/s of effective PCIe for small blocks and a prefill
# at 60% of the ~700 TFLOP/s bf16 GEMM rate measured there (shared/GPU.md; the datasheet's dense bf16 peak, 989
# TFLOP/s, is not what a GEMM reaches):

# %%
# NBVAL_CHECK_OUTPUT
kv_bytes_per_token = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads, head_dim 128, bf16
swap_us = 2 * kv_bytes_per_token / 25e9 * 1e6  # out and back in
recompute_us = 2 * 8.0e9 / (0.6 * 700e12) * 1e6  # 2 FLOPs per parameter per token
print(f"swap      : {swap_us:5.1f} us per token (bandwidth-bound, independent of the model's size)")
print(f"recompute : {recompute_us:5.1f} us per token (compute-bound, and attention adds more for long contexts)")

# %% [markdown]
# Per token, swap looks cheaper here. Yet vLLM recomputes by default: swap needs pinned CPU memory, its copies of
# small blocks rarely reach peak PCIe bandwidth, and a recomputed prefill rides along in a step that runs anyway
# (with the prefix cache, often mostly as cache hits). Swap wins for long sequences (attention's prefill cost grows with the
# square of the length, the copy only linearly), for large models with few KV heads per parameter, and when the
# prefix cache cannot give the victim its blocks back. How the host pool is laid out decides whose work a copy is:
# minillm first kept it in the device's layout ([2, layers, blocks, ...]), so a block's bytes were 2 x layers
# scattered pieces that the CPU gathered into a staging buffer (a memcpy by one core), and the prefix cache's CPU tier,
# which copies evicted prefixes the same way, was only level with recomputing 2k-token prefixes of an 8B on an
# H100. Kept block-major ([blocks, 2, layers, ...], pinned), each block is one run of bytes that the GPU's copy
# engine moves by itself: 1.91x faster than recomputing (benchmarks/RESULTS.md, `engine/host_transfers.py`).
# **Exercise `ch06.swap_out_mapping`** pairs each device
# block of the victim with a free CPU block, in table order, so that swapping in rebuilds the same table:

# %%
# NBVAL_CHECK_OUTPUT
print(swap_out_mapping([7, 2, 9], [0, 3, 4, 5]))

# %% [markdown]
# ## 4. Prefix caching
#
# Requests often share a beginning (a system prompt, a few-shot preamble). A full block's K/V depend on every token
# before it, so a block is named by a **chain hash**: `h_j = hash_block(h_{j-1}, tokens of block j)` (your chapter 5
# exercise). A new request walks its prompt block by block and reuses cached blocks while the chain matches.
# The chains of four prompts (a one-block system prompt, then a question) form a tree:

# %%
BS = 16
tok = static_llm.tokenizer
system_a = tok.encode("You are a helpful assistant. Answer briefly and precisely. " * 4)[:BS]  # one block each
system_b = tok.encode("You are a pirate. Answer like a pirate would, with gusto. " * 4)[:BS]
questions = [tok.encode(q * 3)[:20] for q in ("What is the capital of France? Say it in one word. ",
                                              "Name three prime numbers bigger than ten, with commas. ",
                                              "How many legs does a spider have? Answer with a digit. ")]
shared_prompts = [system_a + questions[0], system_a + questions[1], system_b + questions[2], system_a + questions[0]]


def chain(tokens: list[int]) -> list[int]:
    """Chain hashes of the full blocks of `tokens`, with your hash_block."""
    hashes, parent = [], None
    for j in range(len(tokens) // BS):
        parent = hash_block(parent, tuple(tokens[j * BS:(j + 1) * BS]))
        hashes.append(parent)
    return hashes


chains = [chain(p) for p in shared_prompts]
leaves = list(dict.fromkeys(tuple(c) for c in chains))  # distinct chains, in order: one row each
users = {h: [i for i, c in enumerate(chains) if h in c] for c in chains for h in c}
row = {h: sum(r for r, leaf in enumerate(leaves) if h in leaf) / sum(h in leaf for leaf in leaves) for h in users}
fig, ax = plt.subplots(figsize=(8, 1.1 + 0.75 * len(leaves)), layout="constrained")
for leaf in leaves:
    ax.plot(range(len(leaf)), [row[h] for h in leaf], color="0.6", zorder=0)
for h, who in users.items():
    depth = next(c.index(h) for c in chains if h in c)
    ax.scatter(depth, row[h], s=900, color="C1" if len(who) > 1 else "C0", zorder=1)
    ax.annotate(f"{h & 0xFFFF:04x}", (depth, row[h]), ha="center", va="center", fontsize=7, color="white")
    left = depth == 0  # edges leave block-0 nodes to the right and reach block-1 nodes from the left
    ax.annotate("req " + ",".join(map(str, who)), (depth, row[h]), xytext=(-20 if left else 20, 0),
                textcoords="offset points", ha="right" if left else "left", va="center", fontsize=8)
ax.set_xticks(range(2), ["block 0 (system prompt)", "block 1 (question)"])
ax.set_xlim(-0.8, 1.8)
ax.set_yticks([])
ax.set_ylim(len(leaves) - 0.5, -0.5)
ax.set_title("prefix hash tree (orange: shared by several requests; label: last 16 bits of the hash)", fontsize=10)
plt.show()

# %% [markdown]
# Now the real engine with `enable_prefix_caching=True`, the four prompts one after another: request 1 finds
# request 0's system-prompt block, request 3 (a repeat of request 0) finds both of its full blocks, request 2 (the
# pirate) finds nothing. A partly filled last block is never cached: it may still be written.

# %%
pc_llm = LLM(seed=0, max_model_len=128, scheduling="continuous", num_kv_blocks=32, enable_prefix_caching=True)
with use_overrides({"ch05.hash_block": hash_block}):
    cached = [pc_llm.generate([p], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
              for p in shared_prompts]
pc_bm = pc_llm.llm_engine.scheduler.block_manager

# %%
# NBVAL_CHECK_OUTPUT
for i, p in enumerate(shared_prompts):
    print(f"request {i}: {len(p)} prompt tokens, chain {len(chains[i])} full blocks")
print(f"prefix cache: {pc_bm.prefix_cache_hits} of {pc_bm.prefix_cache_queries} prompt tokens served from cache "
      f"({100 * pc_bm.prefix_cache.hit_rate:.1f}%)")

# %% [markdown]
# A cache shared by every user leaks: a request that comes back fast tells its sender that someone sent the same
# prefix before (a timing side channel). vLLM's answer is `cache_salt`: the salt becomes the first block's parent
# hash, so only requests with the same salt can share blocks. Request 0 again, under two tenants' salts:

# %%
# NBVAL_CHECK_OUTPUT
for salt in ("tenant-a", "tenant-b", "tenant-a"):
    out = pc_llm.generate({"prompt_token_ids": shared_prompts[0], "cache_salt": salt},
                          SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    print(f"cache_salt={salt!r}: {out.num_cached_tokens} prompt tokens from the cache")

# %% [markdown]
# ## 5. Chunked prefill
#
# A long prompt prefilled whole makes one step long, and every decoding sequence waits for it (a TPOT spike).
# With `enable_chunked_prefill` the scheduler fills each step's token budget (`max_num_batched_tokens`, here 32)
# with the decodes first and then a chunk of the prompt (Sarathi-Serve): three short requests decode while a
# 100-token prompt arrives.

# %%
chunk_llm = LLM(seed=0, max_model_len=256, scheduling="continuous", num_kv_blocks=64,
                enable_chunked_prefill=True, max_num_batched_tokens=32)
engine = chunk_llm.llm_engine
for i, p in enumerate(synthetic_prompts(tok, 3, 8, seed=2)):
    engine.add_request(f"short{i}", p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
engine.step()  # the three short prompts prefill together
engine.add_request("long", synthetic_prompts(tok, 1, 100, seed=3)[0],
                   SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
while engine.has_unfinished_requests():
    engine.step()
timeline = engine.scheduler.timeline

# %%
# NBVAL_CHECK_OUTPUT
for r in timeline[:8]:
    parts = ", ".join(f"{'prefill' if sid in r.prefill_ids else 'decode'} {n}" for sid, n in r.scheduled)
    print(f"step {r.step}: {r.num_batched_tokens:2d} tokens = {parts}")

# %%
fig, ax = plt.subplots(figsize=(8, 2.8), layout="constrained")
for r in timeline:
    pre = sum(n for sid, n in r.scheduled if sid in r.prefill_ids)
    ax.bar(r.step, r.num_batched_tokens - pre, color="C0")
    ax.bar(r.step, pre, bottom=r.num_batched_tokens - pre, color="C1")
ax.axhline(32, color="0.4", ls="--", lw=0.8)
ax.set_xlabel("step")
ax.set_ylabel("tokens in the step")
ax.legend(handles=[Patch(color="C0", label="decode"), Patch(color="C1", label="prefill (chunk)"),
                   plt.Line2D([], [], color="0.4", ls="--", label="budget")], fontsize=8)

# %% [markdown]
# Chunks keep the decodes flowing, but a long prompt at the head of the queue still takes each step's whole
# budget until it is done, and the prompts that arrived just after it wait (head-of-line blocking at admission).
# vLLM's `long_prefill_token_threshold` caps any one sequence's chunk: the long prompt computes that many tokens a
# step and the prompts behind it take the rest of the budget. Steps until each request's first token, a 100-token
# prompt and three 8-token ones arriving together:

# %%
# NBVAL_CHECK_OUTPUT
def first_token_steps(threshold: int) -> dict[str, int]:
    engine = chunk_llm.share_model(num_kv_blocks=64, enable_chunked_prefill=True, max_num_batched_tokens=32,
                                   long_prefill_token_threshold=threshold).llm_engine
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine.add_request("long", synthetic_prompts(tok, 1, 100, seed=3)[0], params)
    for i, p in enumerate(synthetic_prompts(tok, 3, 8, seed=2)):
        engine.add_request(f"short{i}", p, params)
    first, step = {}, 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            if out.outputs[0].token_ids:
                first.setdefault(out.request_id, step)
    return first


for threshold in (0, 8):
    print(f"long_prefill_token_threshold={threshold}: {first_token_steps(threshold)}")
plt.show()

# %% [markdown]
# ## 6. Async scheduling: the host one step ahead
#
# Every step so far was *synchronous*: the host schedules, launches the forward, waits for the sampled tokens,
# runs the output loop, and only then schedules the next step. On a GPU the device idles through the host's part:
# for a small model that is most of the step. **Async scheduling** (vLLM's `async_scheduling`, SGLang's overlap
# scheduler; on by default on CUDA here) schedules and launches step N+1 *before* reading step N's tokens. The
# host knows everything about step N+1 except those tokens, so it writes a placeholder `-(r + 1)` for "row r of
# step N's samples", and a small gather on the device swaps the real tokens in just before the forward. That
# gather is **exercise `ch06.resolve_deferred_ids`**: in place, and without the host reading a single value (a
# `.tolist()`, `.item()` or `if` on an element there would wait for step N and undo the overlap; the grader traps
# them). On the H200, SmolLM2's decode went from 1,051 to 1,255 tokens/s at batch 1 and from 19,068 to 31,076 at
# batch 32 (benchmarks/RESULTS.md, sixteenth and seventeenth sessions). The price: `step()` returns each step's
# outputs one call later.

# %%
# NBVAL_CHECK_OUTPUT
ids = torch.tensor([5, -1, 7, -3, 0])  # two placeholders: rows 0 and 2 of the previous step's tokens
resolve_deferred_ids(ids, torch.tensor([40, 41, 42]))
print(ids.tolist())

# %%
# NBVAL_CHECK_OUTPUT
def run_steps(llm, prompts):
    engine, first = llm.llm_engine, None
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    done, calls = {}, 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        calls += 1
        first = len(outs) if first is None else first
        done.update((o.request_id, o.outputs[0].token_ids) for o in outs if o.finished)
    return [done[str(i)] for i in range(len(prompts))], first, calls


prompts = synthetic_prompts(tok, 3, 10, seed=4)
with use_overrides({"ch06.resolve_deferred_ids": resolve_deferred_ids}):  # your gather, inside the engine
    sync_tokens, sync_first, sync_calls = run_steps(LLM(seed=0, max_model_len=128), prompts)
    async_tokens, async_first, async_calls = run_steps(LLM(seed=0, max_model_len=128, async_scheduling=True),
                                                       prompts)
print(f"synchronous: outputs from the first step() {sync_first}, step() calls {sync_calls}")
print(f"async:       outputs from the first step() {async_first}, step() calls {async_calls}")
print("same tokens:", async_tokens == sync_tokens)

# %% [markdown]
# ## 7. Interview questions
#
# 1. *Static vs continuous batching?* <details><summary>answer</summary>Static runs a batch until its longest
#    request ends; continuous (iteration-level, Orca) re-forms the batch every step, so a finished request's slot
#    is refilled at once. Throughput rises with the spread of output lengths. Measured on an H100 (Llama-3-8B
#    shape, 256 requests, outputs 8..512, the same 6 GiB of K/V): static 3,285 output tok/s; continuous with the
#    same 64 slots 1.93x; continuous with paged blocks deciding how many run (all 256 at first) 3.29x. The
#    paged pool is half of the gain: a sequence holds blocks for its length, not max_model_len.</details>
# 2. *What limits the batch size of a serving engine?* <details><summary>answer</summary>KV-cache memory (blocks),
#    max_num_seqs, and the per-step token budget max_num_batched_tokens (latency).</details>
# 3. *Preemption by recompute or by swap?* <details><summary>answer</summary>Recompute frees the blocks and
#    prefills again (compute, no CPU memory; vLLM's default); swap copies KV to CPU and back (PCIe both ways).
#    Swap wins for long sequences and when the link is fast next to the GPU's compute: moving a sequence's KV both
#    ways then costs less than prefilling it again.</details>
# 4. *What is the admission watermark for?* <details><summary>answer</summary>Keeping a few free blocks so the
#    running sequences can grow next step without an immediate preemption (thrashing).</details>
# 5. *What does chunked prefill fix?* <details><summary>answer</summary>A long prompt prefilled whole stalls every
#    decoding sequence for a step (a TPOT spike, head-of-line blocking); chunks fill each step's token budget
#    after the decodes. Capping one sequence's chunk (`long_prefill_token_threshold`) also stops a long prompt from
#    holding back the short prompts queued behind it.</details>
# 6. *When does prefix caching help, and what can it never cache?* <details><summary>answer</summary>Shared
#    beginnings (system prompts, few-shot examples, multi-turn chats); never a partly filled block.</details>
#
# A question whose answer is a number (exercise `ch06.batching_steps`): *the eight requests of section 1 (outputs
# of 24, 4, 10, 18, 6, 22, 8 and 14 tokens, at most 4 at a time): how many decode steps do static and continuous
# batching need, counting one token per running request per step? What share of the batch's slots does each
# use?* Compare with the engine's step counts measured in section 1.

# %%
# NBVAL_CHECK_OUTPUT
batching_steps = load_function("ch06.batching_steps")
for continuous, measured in ((False, static_steps), (True, cont_steps)):
    steps = batching_steps(OUTPUT_LENS, 4, continuous)
    print(f"{'continuous' if continuous else 'static':10s}: {steps} steps, slots used "
          f"{100 * sum(OUTPUT_LENS) / (4 * steps):.0f}% (the engine above: {len(measured)} steps)")

# %% [markdown]
# **What to remember**
# * continuous batching re-forms the batch every step: no slot idles waiting for the longest request;
# * running sequences grow down to the last block; newcomers are admitted only above a watermark and never evict;
# * a full pool preempts the lowest-priority sequence, by recompute (no CPU memory, pays compute) or swap
#   (pays PCIe both ways); either way the tokens are exactly those of an unconstrained run;
# * prefix caching names blocks by chain hashes and shares them; chunked prefill spreads long prompts over steps.
