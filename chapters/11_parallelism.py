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
# # Chapter 11 — Parallelism: tensor, pipeline, expert parallel and disaggregation
#
# A model too big (or too slow) for one GPU is split over several. There are four ways to cut it, and each one
# decides **who holds what** and therefore **what must travel** between the GPUs at every step:
#
# * **tensor parallel (TP)**: every matmul is split; each rank holds a slice of every layer. Two all-reduces per
#   layer (exercises `ch11.split_linear`, `ch11.allreduce_placement`);
# * **pipeline parallel (PP)**: the layers are split; each rank holds a run of whole layers. Activations cross each
#   stage boundary; the step is cut into micro-batches to keep the stages busy (`ch11.pipeline_schedule`);
# * **expert parallel (EP)**: a mixture-of-experts layer's experts are split; tokens travel to their experts and
#   back by all-to-all (`ch11.moe_route`, the router that decides where they go);
# * **prefill/decode disaggregation (PD)**: the *work* is split: prompts on one worker, decoding on another; each
#   request's KV cache travels once (`ch11.pack_kv_blocks`, `ch11.unpack_kv_blocks`).
#
# What each costs on the wire is the last exercise: the bytes of a ring all-reduce (`ch11.ring_allreduce_bytes`).
#
# Write the exercises in `exercises/ch11_parallelism.py`, then `minillm grade ch11`. The engine calls each through
# `dispatch` (the layers' weight loaders, the MoE block, the pipeline runner, the KV transfer), so yours run inside
# it. The byte counts below were **measured** on CPU processes talking over gloo
# (`benchmarks/bench_parallel_traffic.py`) and checked against the formulas of this chapter.

# %%
import json
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from minillm.config import ModelConfig
from minillm.course.impl import load_function
from minillm.course.overrides import use_overrides
from minillm.engine.worker import RandomWeights
from minillm.parallel.kv_transfer import kv_transfer_bytes, pack_kv_blocks, unpack_kv_blocks
from minillm.parallel.state import ParallelState, init_parallel_state

split_linear = load_function("ch11.split_linear")
allreduce_placement = load_function("ch11.allreduce_placement")
route_topk = load_function("ch11.moe_route")
gather_kv_blocks = load_function("ch11.pack_kv_blocks")
scatter_kv_blocks = load_function("ch11.unpack_kv_blocks")
micro_batch_bounds = load_function("ch11.pipeline_schedule")
ring_allreduce_bytes = load_function("ch11.ring_allreduce_bytes")
torch.manual_seed(0)
RANK_COLORS = ["C0", "C1", "C2", "C3"]

# %% [markdown]
# ## 1. Who holds what
#
# Two ranks, a 4-layer model (an MoE model for EP). Each colour is one rank's memory.

# %%
fig, axes = plt.subplots(1, 4, figsize=(13, 3.2), layout="constrained")
for ax, title in zip(axes, ["TP: a slice of every layer", "PP: whole layers", "EP: whole experts",
                            "PD: whole model, different work"]):
    ax.set_xlim(0, 4), ax.set_ylim(0, 4.6), ax.axis("off"), ax.set_title(title, fontsize=9)
for layer in range(4):
    y = 3.6 - layer
    for rank in range(2):  # TP: each layer's matrices split in two halves
        axes[0].add_patch(Rectangle((0.3 + 1.7 * rank, y), 1.6, 0.8, color=RANK_COLORS[rank], alpha=0.8))
        axes[0].text(1.1 + 1.7 * rank, y + 0.35, f"layer {layer}, half {rank}", ha="center", fontsize=7,
                     color="white")
    axes[1].add_patch(Rectangle((0.3, y), 3.4, 0.8, color=RANK_COLORS[layer // 2], alpha=0.8))  # PP
    axes[1].text(2, y + 0.35, f"layer {layer} (stage {layer // 2})", ha="center", fontsize=7, color="white")
    axes[2].add_patch(Rectangle((0.3, y + 0.45), 3.4, 0.35, color="0.6"))  # EP: attention replicated
    for e in range(4):  # ... experts 0-1 on rank 0, 2-3 on rank 1
        axes[2].add_patch(Rectangle((0.3 + 0.87 * e, y), 0.8, 0.4, color=RANK_COLORS[e // 2], alpha=0.8))
    for rank in range(2):  # PD: each worker holds the whole model
        axes[3].add_patch(Rectangle((0.2 + 2 * rank, y), 1.6, 0.8, color=RANK_COLORS[rank], alpha=0.8))
axes[2].text(2, 4.45, "grey: attention on both ranks", ha="center", fontsize=7)
axes[3].annotate("", xy=(2.2, 2), xytext=(1.8, 2), arrowprops=dict(arrowstyle="->", lw=2))
axes[3].text(2, 4.45, "prefill worker -> KV once -> decode worker", ha="center", fontsize=7)
plt.show()

# %% [markdown]
# ## 2. Tensor parallel: which slice, and where the all-reduce goes
#
# A linear layer y = x W^T + b, W of shape [out, in], can be split two ways (Megatron-LM, 2019):
#
# * **column-parallel**: rank r keeps rows r·out/tp … of W (the outputs it computes *completely*) and the same
#   slice of b. No communication: the ranks' outputs side by side are y.
# * **row-parallel**: rank r keeps columns r·in/tp … of W. It multiplies only *its slice* of x and gets a *partial
#   sum* of every output; an **all-reduce** adds the partials. The bias must be added once: vLLM adds it on rank 0,
#   to its partial, before the sum.
#
# **Exercise `ch11.split_linear`**: return (weight shard, bias shard) for a rank.

# %%
# NBVAL_CHECK_OUTPUT
W, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0, 6.0])
for style in ("column", "row"):
    for rank in range(2):
        w_r, b_r = split_linear(W, b, rank, 2, style)
        print(f"{style:6s} rank {rank}: W shard {w_r.tolist()}, bias shard {None if b_r is None else b_r.tolist()}")

# %% [markdown]
# The trick that makes a whole MLP cost one all-reduce: the column-parallel layer's output slice is *exactly* the
# input slice the row-parallel layer wants, and SiLU·mul in between is elementwise, so it stays local. Three ranks,
# an MLP of SmolLM2's width (576 -> 1536 -> 576), the ranks simulated one after the other:

# %%
# NBVAL_CHECK_OUTPUT
hidden, inter, tp = 576, 1536, 3
gate, up = torch.randn(inter, hidden) / 24, torch.randn(inter, hidden) / 24
down_w, down_b = torch.randn(hidden, inter) / 40, torch.randn(hidden)
x = torch.randn(5, hidden)
full = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down_w.T + down_b
partials = []
for rank in range(tp):
    g_r, _ = split_linear(gate, None, rank, tp, "column")
    u_r, _ = split_linear(up, None, rank, tp, "column")
    d_r, db_r = split_linear(down_w, down_b, rank, tp, "row")
    h_r = torch.nn.functional.silu(x @ g_r.T) * (x @ u_r.T)  # [5, 512]: rank-local, no communication
    partials.append(h_r @ d_r.T + (0 if db_r is None else db_r))
all_reduced = sum(partials)  # what the all-reduce computes, in place, on every rank
print(f"each rank holds {sum(t.numel() for t in (g_r, u_r, d_r)):,} of {3 * hidden * inter:,} MLP weights")
print(f"sum of {tp} partials == full MLP: {torch.allclose(all_reduced, full, atol=1e-4)}")

# %% [markdown]
# **Exercise `ch11.allreduce_placement`**: given the parallel styles of one sub-block's linears, say after which
# one the all-reduce goes. The engine asks it once per sub-block while it builds the model
# (`minillm.parallel.tensor.plan_all_reduces`), and each layer's forward all-reduces where the plan says. Below,
# a tiny Llama built as TP rank 0 of 2 *with your functions plugged in*: the loaders cut with your `split_linear`,
# the forward reduces where your plan says.

# %%
# NBVAL_CHECK_OUTPUT
print("Megatron MLP, tp 2   :", allreduce_placement(["column", "row"], 2))
print("same at tp 1         :", allreduce_placement(["column", "row"], 1))
TINY = ModelConfig(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
init_parallel_state(ParallelState(tp_size=2, tp_rank=0))
try:
    with use_overrides({"ch11.split_linear": split_linear, "ch11.allreduce_placement": allreduce_placement}):
        rank0 = RandomWeights(seed=3)(TINY, torch.device("cpu"), torch.float32)
finally:
    init_parallel_state(ParallelState())
layer0 = rank0.model.layers[0]
for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
    module = layer0.get_submodule(name)
    print(f"{name:18s} weight {tuple(module.weight.shape)}  all-reduce after it: {module.reduce_output}")
reduces = sum(m.reduce_output for m in rank0.modules() if hasattr(m, "reduce_output"))
print(f"all-reduces per forward: {reduces} in the layers + 1 after the vocab-parallel embedding "
      f"= 2 x {TINY.num_hidden_layers} + 1")

# %% [markdown]
# ## 3. The traffic, measured
#
# `benchmarks/bench_parallel_traffic.py` runs each scheme in 2 worker processes on this CPU (gloo), a prefill step
# of 24 tokens and a decode step of 4 sequences, and reads the byte counters the parallel code keeps
# (`minillm.parallel.state.comm_stats`: the payload a rank hands to each collective or send). Per step and rank:
#
# | scheme | what a rank sends per step | formula (fp32: 4 bytes) |
# |---|---|---|
# | TP | all-reduce after o_proj and down_proj in every layer, and after the embedding; TP rank 1's logits slice to rank 0 | (2L + 1)·T·h·4, and rows·⌈V/2⌉·4 |
# | PP | hidden and residual at the stage boundary | 2·T·h·4 from stage 0, nothing from the last stage |
# | EP | per MoE layer: its tokens' k rows out, its experts' rows back, the split counts, an all-gather | L·T_r·k·h·4 + R_r·h·4 + L·2·(E/2+1)·8 + L·⌈T/2⌉·h·4 |
# | PD | one message per request: its KV blocks | 2·L·⌈P/bs⌉·bs·kv_heads·head_dim·4 |

# %%
# NBVAL_CHECK_OUTPUT
traffic = json.loads((Path("..") / "benchmarks" / "results" / "parallel_traffic_cpu.json").read_text())
print(f"{traffic['device']}, {traffic['dtype']}; models {traffic['models']}")
for run in traffic["runs"]:
    for r in run["ranks"]:
        measured, analytic = sum(r["measured"].values()), sum(r["analytic"].values())
        print(f"{run['scheme']} {run['step']:8s} T={run['tokens']:3d} rank {r['rank']}: {measured:7,d} B measured, "
              f"{analytic:7,d} B analytic, {'equal' if r['measured'] == r['analytic'] else 'DIFFERENT'}")

# %%
fig, ax = plt.subplots(figsize=(10, 3.4), layout="constrained")
labels, values = [], []
for run in traffic["runs"]:
    for r in run["ranks"]:
        step = "per request" if run["scheme"] == "PD" else run["step"]
        labels.append(f"{run['scheme']} {step}\nrank {r['rank']}")
        values.append(r["measured"])
kinds = sorted({k for v in values for k in v})
bottom = [0] * len(values)
for i, kind in enumerate(kinds):
    heights = [v.get(kind, 0) / 1024 for v in values]
    ax.bar(range(len(values)), heights, bottom=bottom, label=kind, color=f"C{i}")
    bottom = [a + h for a, h in zip(bottom, heights)]
ax.set_xticks(range(len(labels)), labels, fontsize=7)
ax.set_ylabel("KiB sent in the step")
ax.set_title("Measured bytes per rank (the analytic counts are equal): tiny fp32 models, 2 ranks", fontsize=10)
ax.legend(fontsize=7, ncol=2)
plt.show()

# %% [markdown]
# TP sends the most, every layer, even for one decode token; PP sends one activation pair per boundary; EP's bytes
# depend on the routing (rank 1's experts received more rows in the prefill); PD pays once per request, nothing
# per decode step (the PD bars are the KV of all 5 requests). Who sends what is set by who holds what.
#
# ## 4. Pipeline parallel: micro-batches
#
# With one batch, stage 1 waits while stage 0 works, then stage 0 idles. Cutting the step into M micro-batches
# lets stage 0 start micro-batch 2 while stage 1 runs micro-batch 1 (GPipe's schedule); the idle fraction, the
# *bubble*, is (pp − 1) / (M + pp − 1). A prompt cannot be cut across micro-batches, so the cut balances *tokens*,
# not sequences. **Exercise `ch11.pipeline_schedule`**: the boundaries, as `split_step` asks for them.

# %%
# NBVAL_CHECK_OUTPUT
step_lens = [5, 17, 1, 3, 1, 1, 9, 2]
for m in (1, 2, 4):
    bounds = micro_batch_bounds(step_lens, m)
    tokens = [sum(step_lens[a:b]) for a, b in zip(bounds, bounds[1:])]
    print(f"M={m}: bounds {bounds}, tokens per micro-batch {tokens}")

# %%
pp, bounds = 4, micro_batch_bounds(step_lens, 4)
work = [sum(step_lens[a:b]) for a, b in zip(bounds, bounds[1:])]  # a stage's time ~ its micro-batch's tokens
finish = [[0.0] * len(work) for _ in range(pp)]
fig, ax = plt.subplots(figsize=(9, 2.4), layout="constrained")
for s in range(pp):
    for m, w in enumerate(work):  # a stage starts m when it is free and when the previous stage has sent m
        start = max(finish[s][m - 1] if m else 0.0, finish[s - 1][m] if s else 0.0)
        finish[s][m] = start + w
        ax.barh(s, w, left=start, color=RANK_COLORS[m], edgecolor="white")
        ax.text(start + w / 2, s, f"mb{m}", ha="center", va="center", fontsize=7, color="white")
ax.set_yticks(range(pp), [f"stage {s}" for s in range(pp)])
ax.invert_yaxis()
ax.set_xlabel("time (tokens of work)")
busy = pp * sum(work)
ax.set_title(f"4 stages, 4 micro-batches of {work} tokens: busy {busy / (pp * finish[-1][-1]):.0%} "
             f"(equal micro-batches: {4 / (4 + pp - 1):.0%})", fontsize=10)
plt.show()

# %% [markdown]
# The 17-token prompt cannot be cut, so micro-batch 0 carries 22 of the 39 tokens and every stage waits on it: the
# pipeline is only as balanced as the step's largest sequence allows.
#
# ## 5. Expert parallel: the router decides the traffic
#
# A Mixtral layer scores its E experts per token, keeps the top k and renormalises their weights. **Exercise
# `ch11.moe_route`**. Under EP each token's k rows go to the ranks owning those experts; what a rank *receives*
# depends on the router, so an unbalanced router makes one rank both the busiest and the most loaded link.

# %%
# NBVAL_CHECK_OUTPUT
weights, ids = route_topk(torch.tensor([[2.0, 0.0, 1.0]]), 2)
print("weights", [round(v, 4) for v in weights[0].tolist()], "experts", ids[0].tolist())
logits = torch.randn(256, 8) + torch.linspace(0, 1.5, 8)  # a router that prefers the last experts
_, ids = route_topk(logits, 2)
rows = torch.bincount(ids.flatten(), minlength=8)
print("rows per expert:", rows.tolist(), f" max/mean {rows.max().item() / rows.float().mean().item():.2f}")
print("rows to EP rank 0 (experts 0-3):", rows[:4].sum().item(), " to EP rank 1 (experts 4-7):", rows[4:].sum().item())

# %% [markdown]
# On one GPU the routing shapes the work too. The reference path loops over the experts (a gather and two matmuls
# each, after a host sync to learn how many rows each got); `kernels/fused_moe.py` instead sorts the T·k (token,
# expert) pairs by expert and pads each expert's run to whole blocks of BLOCK_M rows, so that one grouped GEMM per
# projection covers every expert, in launches whose shapes never depend on the routing: a decode step stays a CUDA
# graph. Quantized experts enter as they are stored (int8 or e4m3 codes with a scale per row, GPTQ's 4-bit words
# with a scale per group), each scale applied to its sums inside the kernel.

# %%
# NBVAL_CHECK_OUTPUT
from minillm.kernels.fused_moe import moe_align

ids = torch.tensor([[2, 0], [2, 1], [0, 2]])  # 3 tokens, each to 2 of 3 experts: pair 2t + j
sorted_pairs, block_expert, counts = moe_align(ids, num_experts=3, block_m=4)
print("rows per expert     ", counts.tolist())
print("pairs, expert-sorted", sorted_pairs.tolist(), " (6: padding)")
print("expert of each block", block_expert.tolist(), " (-1: unused)")

# %% [markdown]
# ## 6. Disaggregation: the KV cache travels once
#
# After the prefill worker computes a prompt, its KV blocks (scattered over the pool: block table [7, 2, 9]) are
# packed in logical order into one message, and the decode worker scatters them into *its* blocks.
# **Exercises `ch11.pack_kv_blocks` and `ch11.unpack_kv_blocks`**, here inside the engine's checked entry points.

# %%
# NBVAL_CHECK_OUTPUT
sender = torch.randn(2, 3, 10, 4, 2, 8)  # [K/V, layers, blocks, block_size, kv_heads, head_dim]
receiver = torch.zeros_like(sender)
with use_overrides({"ch11.pack_kv_blocks": gather_kv_blocks, "ch11.unpack_kv_blocks": scatter_kv_blocks}):
    message = pack_kv_blocks(sender, [7, 2, 9])
    unpack_kv_blocks(receiver, [0, 5, 3], message)
print("message shape", tuple(message.shape), "| receiver block 5 == sender block 2:",
      torch.equal(receiver[:, :, 5], sender[:, :, 2]), "| untouched blocks still zero:",
      bool((receiver[:, :, [1, 2, 4, 6, 7, 8, 9]] == 0).all()))
for name, layers, kv_heads in (("SmolLM2-135M", 30, 3), ("Llama-3-8B", 32, 8)):
    nbytes = kv_transfer_bytes(1000, 16, layers, kv_heads, 64 if kv_heads == 3 else 128, torch.bfloat16)
    print(f"{name}: a 1000-token prompt's KV in bf16 = {nbytes / 2**20:.1f} MiB, once per request")

# %% [markdown]
# ## 7. Interview question: tensor parallel or pipeline parallel?
#
# *"You have 8 GPUs and Llama-3-8B-shaped layers (hidden 4096, 32 layers, bf16). Tensor or pipeline parallel?"*
# Count the bytes per token. TP all-reduces [h] twice per layer; what a ring all-reduce makes each GPU send is
# **exercise `ch11.ring_allreduce_bytes`** (cut the tensor into one chunk per GPU, then count a reduce-scatter and
# an all-gather around the ring). PP sends hidden and residual, 2·h values, once per stage *boundary*, i.e. (pp − 1)
# times for the whole model. Assumptions, stated: NVLink 450 GB/s and PCIe 64 GB/s per GPU, one direction
# (NVLink 4's 900 GB/s counts both directions); a collective or send also costs a fixed α ≈ 5 µs of latency (order
# of magnitude of a small NCCL call); an H200 reads memory at 4.24 TB/s (measured copy) and multiplies bf16 at
# 700 TFLOP/s.

# %%
# NBVAL_CHECK_OUTPUT
H, L, BYTES, N = 4096, 32, 2, 8
NVLINK, PCIE, ALPHA = 450e9, 64e9, 5e-6  # assumptions: bytes/s per GPU and direction, seconds per collective
tp_per_token_layer = 2 * ring_allreduce_bytes(H * BYTES, N)  # two ring all-reduces of [h] per layer
pp_per_token_layer = 2 * H * BYTES * (N - 1) / L  # one (hidden, residual) pair per boundary, spread over layers
print(f"bytes a GPU sends per token per layer: TP={N} {tp_per_token_layer / 1024:.1f} KiB, "
      f"PP={N} {pp_per_token_layer / 1024:.2f} KiB ({tp_per_token_layer / pp_per_token_layer:.0f}x less)")
WEIGHTS, HBM, FLOPS = 8.03e9 * BYTES, 4.24e12, 700e12  # Llama-3-8B's bf16 weights; H200 copy and GEMM rates
for what, tokens in (("decode step, batch 64", 64), ("prefill, 4096 tokens", 4096)):
    for wire, bw in (("NVLink", NVLINK), ("PCIe", PCIE)):
        tp_s = L * (2 * ALPHA + tokens * tp_per_token_layer / bw)
        pp_s = (N - 1) * (ALPHA + tokens * 2 * H * BYTES / bw)
        print(f"{what:22s} {wire:6s}: communication TP {tp_s * 1e3:6.2f} ms per step, PP {pp_s * 1e3:5.2f} ms")
# one GPU's share of the work: decode reads the weights (memory-bound), prefill multiplies (compute-bound)
decode_1gpu, prefill_1gpu = WEIGHTS / HBM, 2 * 8.03e9 * 4096 / FLOPS
print(f"work of one step on 1 GPU: decode {decode_1gpu * 1e3:.2f} ms, prefill {prefill_1gpu * 1e3:.1f} ms; "
      f"TP {N} cuts it to {decode_1gpu / N * 1e3:.2f} / {prefill_1gpu / N * 1e3:.1f} ms per GPU, PP {N} does not "
      f"(a token still crosses all {L} layers, one stage after the other)")

# %% [markdown]
# The answer, with these numbers: PP moves 8x fewer bytes than TP, so across a slow link (PCIe, or between nodes)
# it wins: TP's 4096-token prefill would spend ~60 ms per step on PCIe, five times its own compute. But bytes are
# not latency. TP splits *every layer's* work over the 8 GPUs: a decode step reads 0.47 ms of weights per GPU
# instead of 3.8 ms, and over NVLink its all-reduces add ~0.45 ms (mostly the α of 64 small collectives). PP never
# shortens a token's path, it crosses every stage in turn; it raises *throughput*, and only while micro-batches
# keep all stages busy (at decode, with one token per sequence, the bubbles are large). So the field's rule:
# **TP within a node (NVLink), PP across nodes**, e.g. TP 8 x PP 2 for a model that needs 16 GPUs. EP is for MoE
# layers, whose experts are most of the memory; disaggregation is for latency targets: a decode step never waits
# for someone else's prefill.
#
# On a machine with 2 GPUs, `pytest -m gpu tests/test_parallel.py` runs TP and PP over NCCL and checks the tokens
# against one GPU, and `python benchmarks/bench_tp_decode.py --pp 2` times decode at batch 1 and 64 on the
# Llama-3-8B shape for one GPU, TP 2 and PP 2, with the all-reduce milliseconds of a step measured on the engine's
# own group: the estimate above, checked. This chapter's counts do not depend on the device, only on the dtype
# (bf16 halves them).

# %%
if torch.cuda.device_count() >= 2:
    print("2+ GPUs: run `pytest -m gpu tests/test_parallel.py tests/test_expert_parallel.py` for NCCL runs")
else:
    print(f"{torch.cuda.device_count()} GPU(s) here: the multi-GPU runs (NCCL) need 2; the CPU counts above are "
          "the same bytes in fp32")
