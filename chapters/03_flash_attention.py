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
# # Chapter 3 — FlashAttention: attention without the score matrix
#
# Attention is `softmax(Q Kᵀ · scale + mask) V`. Written the obvious way it builds the whole score matrix
# `S = Q Kᵀ`, one number per (query, key) pair, writes it to memory, reads it back for the softmax, writes the
# probabilities, and reads them again for `P V`. FlashAttention (Dao et al., 2022; FlashAttention-2, 2023)
# computes the same result **tile by tile, in registers**, so `S` never reaches memory. This chapter builds it
# in six steps:
#
# 1. naive attention, and what its score matrix costs;
# 2. the **online softmax**: a softmax computed one block of scores at a time (exercise `ch03.online_softmax_update`);
# 3. **tiling** and **causal block skipping**: which key tiles a query tile must visit, and which need a mask
#    (exercise `ch03.causal_block_range`);
# 4. three **Triton puzzles** that climb to the kernel: masked tiles, a row softmax, a tiled matmul (exercises
#    `ch03.outer_add_kernel`, `ch03.softmax_kernel`, `ch03.matmul_kernel`);
# 5. the **Triton kernel**: its inner loop is yours to write (exercise `ch03.flash_attention_kernel`);
# 6. interview questions, one of them a number you compute (exercise `ch03.attention_hbm_bytes`).
#
# Write them in `exercises/ch03_flash_attention.py`, then run `minillm grade ch03`. On this CPU the kernel runs
# through Triton's interpreter, so sizes stay tiny; the GPU cell at the end says what an H100 does.

# %%
import math

import matplotlib.pyplot as plt
import torch

from minillm.course.impl import load_chapter_module, load_function
from minillm.kernels import flash_attention as fa

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels run natively on a GPU, interpreted here
TOL = 5e-3 if device == "cuda" else 1e-4  # fp32 on a GPU goes through TF32 tensor cores (~1e-3 relative error)
online_softmax_update = load_function("ch03.online_softmax_update")
causal_block_range = load_function("ch03.causal_block_range")
# the kernel exercise is a @triton.jit helper; its chapter module also holds the launcher that runs it
ch03 = load_chapter_module("ch03.flash_attention_kernel")  # your kernel module, or the reference's until you start


def naive_attention(q, k, v, causal=True):
    """q [Sq, D], k, v [Sk, D]: the textbook formula, bottom-right causal mask, fp64 for a clean reference."""
    s = (q.double() @ k.double().T) / math.sqrt(q.shape[-1])
    if causal:
        sq, sk = s.shape
        s = s.masked_fill(torch.arange(sk)[None, :] > torch.arange(sq)[:, None] + (sk - sq), float("-inf"))
    return (torch.softmax(s, dim=-1) @ v.double()).float()

# %% [markdown]
# ## 1. What the score matrix costs
#
# `S` has `seqlen_q × seqlen_k` entries per head. For a 16k-token prefill of a 32-head model in bf16 that is
# 32 · 16384² · 2 bytes = 17 GB per layer: more than the model's weights, written and read several times, for
# a result (`O`, 32 · 16384 · 128 · 2 bytes = 134 MB) 128 times smaller. Attention done this way is
# memory-bound and its memory grows with the square of the context.

# %%
# NBVAL_CHECK_OUTPUT
heads, head_dim, bf16 = 32, 128, 2
print(f"{'seq':>6}{'S = QK^T per layer':>22}{'O per layer':>14}")
for seq in (1024, 4096, 16384):
    print(f"{seq:>6}{heads * seq * seq * bf16 / 1e9:>19.2f} GB{heads * seq * head_dim * bf16 / 1e6:>11.1f} MB")

# %% [markdown]
# ## 2. The online softmax
#
# A softmax needs the row's maximum `m` (subtracted so that `exp` cannot overflow) and the row's sum
# `l = Σ exp(s − m)`: both depend on the *whole* row. The trick is to keep a running `m`, a running `l` and a
# running output accumulator `acc = Σ exp(s − m) v`, and to fix them up when a new block raises the maximum:
# every earlier term was computed against the old maximum, so it is too big by exactly `exp(m_old − m_new)`.
# Multiplying `l` and `acc` by that one factor `α` makes them what they would have been had `m_new` been known
# from the start. After the last block, `out = acc / l`.
#
# **Exercise `ch03.online_softmax_update`**: one step of this, for M rows and one block of N scores. Below, one
# row of 12 scores goes through it 4 at a time; the scores rise, so the maximum changes twice.

# %%
scores = torch.tensor([[0.5, 1.0, -0.5, 0.0, 2.5, 1.5, 3.0, 0.0, 1.0, 4.0, -1.0, 2.0]])
values = torch.arange(12.0)[:, None]  # value j is j: the output is the expected index under the softmax
m, l, acc = torch.full((1,), float("-inf")), torch.zeros(1), torch.zeros(1, 1)
history = []
for start in range(0, 12, 4):
    m_old = m
    m, l, acc = online_softmax_update(m, l, acc, scores[:, start:start + 4], values[start:start + 4])
    alpha = torch.exp(m_old - m) if start else torch.zeros(1)
    history.append((start, float(m), float(l), float(acc[0, 0]), float(alpha)))
    print(f"block {start:2d}..{start + 3:2d}: m = {float(m):.2f}, alpha = {float(alpha):.4f}, "
          f"l = {float(l):.4f}, acc = {float(acc[0, 0]):.4f}, acc / l = {float(acc[0, 0] / l):.4f}")

# %%
# NBVAL_CHECK_OUTPUT
full = torch.softmax(scores, dim=-1) @ values
print(f"online: {float(acc[0, 0] / l):.5f}   one softmax over the row: {float(full[0, 0]):.5f}")
print(f"equal to 1e-6: {abs(float(acc[0, 0] / l) - float(full[0, 0])) < 1e-6}")

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), layout="constrained")
colors = ["C0", "C1", "C2"]
for b, (start, m_b, l_b, acc_b, _) in enumerate(history):
    axes[0].bar(range(start, start + 4), scores[0, start:start + 4], color=colors[b], label=f"block {b}")
    axes[0].hlines(m_b, 0, start + 3.5, colors=colors[b], linestyles="--")
axes[0].set_title("scores, and the running max after each block")
axes[0].set_xlabel("key")
axes[0].legend(fontsize=8)
axes[1].plot([h[2] for h in history], "o-", label="running l")
axes[1].plot([h[4] for h in history], "s--", label="alpha = exp(m_old - m_new)")
axes[1].set_xticks(range(3))
axes[1].set_xlabel("after block")
axes[1].set_title("the sum, rescaled when the max moves")
axes[1].legend(fontsize=8)
axes[2].plot([h[3] / h[2] for h in history], "o-", label="acc / l so far")
axes[2].axhline(float(full[0, 0]), color="k", ls=":", label="full softmax")
axes[2].set_xticks(range(3))
axes[2].set_xlabel("after block")
axes[2].set_title("the output converges to the exact one")
axes[2].legend(fontsize=8)
plt.show()

# %% [markdown]
# The intermediate `acc / l` is the exact attention output *over the keys seen so far*: stopping early is
# attention over a prefix. That is also why two partial results over disjoint keys can be merged exactly
# (chapter 4's split-KV).
#
# ## 3. Tiles, and which of them a causal mask lets us skip
#
# The kernel gives each program a tile of `BLOCK_M` queries and walks the keys `BLOCK_N` at a time. With a
# causal mask, query `i` sees only keys up to its own position, so whole key tiles above the diagonal are
# skipped (half the work of a prefill), tiles wholly below it need no mask, and only the tiles the diagonal cuts
# through pay for one. With a cached prefix (a chunked prefill, a prefix-cache hit) the queries are the *last*
# `q_len` of `k_len` tokens: the diagonal is aligned to the bottom-right corner.
#
# **Exercise `ch03.causal_block_range`**: for one query tile, return `(full_end, hi)`: keys `[0, full_end)`
# unmasked, `[full_end, hi)` masked, the rest skipped. The pictures below are drawn from your function.

# %%
def tile_map(q_len, k_len, block_m, block_n, causal=True):
    """A [q tiles, k tiles] grid: 2 = visited without a mask, 1 = visited with a mask, 0 = skipped."""
    grid = torch.zeros(math.ceil(q_len / block_m), math.ceil(k_len / block_n), dtype=torch.int64)
    for i, m_start in enumerate(range(0, q_len, block_m)):
        full_end, hi = causal_block_range(m_start, block_m, q_len, k_len, block_n, causal)
        for j, n_start in enumerate(range(0, k_len, block_n)):
            grid[i, j] = 2 if n_start + block_n <= full_end else (1 if n_start < hi else 0)
    return grid


cases = {"prefill: 128 queries, 128 keys": (128, 128), "chunk after a 96-token prefix: 32 queries, 128 keys": (32, 128)}
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
for ax, (title, (q_len, k_len)) in zip(axes, cases.items()):
    g = tile_map(q_len, k_len, 32, 16)
    ax.imshow(g, cmap=plt.matplotlib.colors.ListedColormap(["white", "#f4a261", "#2a9d8f"]), vmin=0, vmax=2,
              extent=(0, k_len, q_len, 0))
    ax.plot([k_len - q_len, k_len], [0, q_len], "k-", lw=1.5, label="diagonal (bottom-right aligned)")
    ax.set_xticks(range(0, k_len + 1, 16))
    ax.set_yticks(range(0, q_len + 1, 32))
    ax.grid(color="grey", lw=0.5)
    ax.set_xlabel("key position (tiles of BLOCK_N = 16)")
    ax.set_ylabel("query (tiles of BLOCK_M = 32)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
fig.suptitle("green: no mask, orange: masked, white: skipped")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
for title, (q_len, k_len) in cases.items():
    g = tile_map(q_len, k_len, 32, 16)
    print(f"{title}: {int((g == 2).sum())} unmasked + {int((g == 1).sum())} masked tiles visited, "
          f"{int((g == 0).sum())} of {g.numel()} skipped")

# %% [markdown]
# `minillm.kernels.flash_attention.flash_attention_reference` walks exactly these tiles in torch, calling your
# two functions (through `dispatch`): it is the kernel's algorithm without the kernel. It must agree with the
# naive formula, with or without a prefix.

# %%
# NBVAL_CHECK_OUTPUT
from minillm.course.overrides import use_overrides

with use_overrides({"ch03.online_softmax_update": online_softmax_update, "ch03.causal_block_range": causal_block_range}):
    for q_len, k_len, causal in [(77, 77, True), (19, 100, True), (50, 33, False)]:
        q, k, v = torch.randn(q_len, 40), torch.randn(k_len, 40), torch.randn(k_len, 40)
        out, lse = fa.flash_attention_reference(q, k, v, causal=causal, block_m=32, block_n=16)
        err = (out - naive_attention(q, k, v, causal)).abs().max()
        print(f"q {q_len:3d}, k {k_len:3d}, causal={causal!s:5}: max |tiled - naive| < 1e-5: {bool(err < 1e-5)}")

# %% [markdown]
# ## 4. Triton in three puzzles
#
# A Triton kernel is written for ONE program; the launch runs a grid of them. A program finds its tile from
# `tl.program_id(axis)`, builds vectors of offsets with `tl.arange(0, BLOCK)` (BLOCK a power of two, known at
# compile time), loads whole blocks with `tl.load(ptr + offsets, mask=..., other=...)`, computes on them in
# registers, and writes with `tl.store(ptr + offsets, value, mask=...)`. Since BLOCK rarely divides the tensor's
# size, the last tiles stick out past its edge: the **mask** turns those lanes off. The three kernels of
# `kernels/puzzles.py` are the steps to FlashAttention; each has a launcher beside it in your chapter module.
#
# **Puzzle 1, `ch03.outer_add_kernel`**: `OUT[i, j] = x[i] + y[j]` on a 2-D grid of `BLOCK_M × BLOCK_N` tiles, masks
# in both dimensions. The picture is measured, not drawn from the formula: your kernel runs on growing grids
# into a buffer of sentinels larger than the output, and each cell is coloured by the program that wrote it.
# A red cell outside the output would be a store that escaped its mask.

# %%
from matplotlib.patches import Rectangle

ch03_puzzles = load_chapter_module("ch03.outer_add_kernel")


def written_by(grid, rows, cols, block_m, block_n, pad=8):
    """Cells of a [rows + pad, cols + pad] sentinel buffer that your kernel writes when launched on `grid`."""
    buf = torch.full((rows + pad, cols + pad), float("nan"), device=device)
    x = torch.arange(rows, dtype=torch.float32, device=device)
    y = 100 * torch.arange(cols, dtype=torch.float32, device=device)
    ch03_puzzles.outer_add_kernel[grid](x, y, buf, rows, cols, buf.stride(0), buf.stride(1),
                                        BLOCK_M=block_m, BLOCK_N=block_n)
    return ~torch.isnan(buf.cpu())


rows, cols, bm, bn = 20, 27, 8, 16
tiles = (math.ceil(rows / bm), math.ceil(cols / bn))
owner = torch.full((rows + 8, cols + 8), -1)
for i in range(tiles[0]):
    for j in range(tiles[1]):  # program (i, j) wrote what grid (i+1, j+1) writes and grids (i, j+1), (i+1, j) don't
        mine = written_by((i + 1, j + 1), rows, cols, bm, bn)
        for smaller in ((i, j + 1), (i + 1, j)):
            if min(smaller) > 0:
                mine &= ~written_by(smaller, rows, cols, bm, bn)
        owner[mine & (owner < 0)] = i * tiles[1] + j
escaped = owner >= 0
escaped[:rows, :cols] = False
image = torch.ones(rows + 8, cols + 8, 3)
for p in range(tiles[0] * tiles[1]):
    image[owner == p] = torch.tensor(plt.get_cmap("Pastel1")(p)[:3], dtype=torch.float32)
image[escaped] = torch.tensor([1.0, 0.0, 0.0])
fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
ax.imshow(image, extent=(0, cols + 8, rows + 8, 0))
for i in range(tiles[0]):
    for j in range(tiles[1]):
        ax.add_patch(Rectangle((j * bn, i * bm), bn, bm, fill=False, ls="--", lw=1.2))
        inside = ((j * bn + min((j + 1) * bn, cols)) / 2, (i * bm + min((i + 1) * bm, rows)) / 2)  # its part of OUT
        ax.text(*inside, f"program ({i}, {j})", ha="center", va="center", fontsize=8)
ax.add_patch(Rectangle((0, 0), cols, rows, fill=False, lw=2.5, color="k"))
ax.set_title(f"OUT [{rows}, {cols}] (thick border), tiles {bm} x {bn} (dashed): colour = the program that wrote\n"
             "the cell; a tile's lanes past the border are masked off", fontsize=10)
ax.set_xlabel("column j")
ax.set_ylabel("row i")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
x, y = torch.randn(rows), torch.randn(cols)
print(f"{tiles[0]} x {tiles[1]} programs; every cell written: {bool((owner[:rows, :cols] >= 0).all())}; "
      f"writes outside OUT: {int(escaped.sum())}")
print("outer_add == x[:, None] + y[None, :]:",
      torch.equal(ch03_puzzles.outer_add(x.to(device), y.to(device), bm, bn).cpu(), x[:, None] + y[None, :]))

# %% [markdown]
# **Puzzle 2, `ch03.softmax_kernel`**: one program per row holds the whole row in one block, so the max and the
# sum are reductions in registers (`tl.max`, `tl.sum`) and the row is read once and written once. The masked
# lanes must not disturb either: load them as `-inf`, which never wins the max and adds `exp(-inf) = 0` to the
# sum (a `0.0` there would add `exp(0 - max)` per padded lane). Subtract the max before `tl.exp`: scores of a few
# hundred overflow fp32's exp. This is the softmax that section 2's online softmax splits into blocks.

# %%
row_scales = [1, 3, 10, 30, 100, 300]
scores_rows = torch.randn(6, 23, generator=torch.Generator().manual_seed(3)) * torch.tensor(row_scales)[:, None]
probs = ch03_puzzles.softmax(scores_rows.to(device)).cpu()
padded = torch.full((6, 32), float("nan"))
padded[:, :23] = probs
fig, ax = plt.subplots(figsize=(8, 2.8), layout="constrained")
ax.imshow(padded, cmap="viridis", aspect="auto", extent=(0, 32, 6, 0))
ax.add_patch(Rectangle((23, 0), 9, 6, hatch="//", fill=False, color="0.5"))
ax.text(27.5, 3, "masked lanes\n(BLOCK = 32)", ha="center", va="center", fontsize=8)
ax.set_yticks([r + 0.5 for r in range(6)], [f"program {r}: scores x{s}" for r, s in enumerate(row_scales)])
ax.set_xlabel("column (23 real, 9 padded)")
ax.set_title("your softmax, one program per row: larger scores, more peaked rows, never inf or nan", fontsize=10)
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print("rows sum to 1:", bool(torch.allclose(probs.sum(-1), torch.ones(6))),
      "| equals torch.softmax:", bool(torch.allclose(probs, torch.softmax(scores_rows, -1), atol=1e-6, rtol=1e-5)),
      "| any nan:", bool(probs.isnan().any()))

# %% [markdown]
# **Puzzle 3, `ch03.matmul_kernel`**: `C = A @ B` with one program per `BLOCK_M × BLOCK_N` tile of C. A program
# walks K in steps of `BLOCK_K`: it loads a tile of its **row panel** of A and a tile of its **column panel** of B,
# multiplies them with `tl.dot` (the tensor cores on a GPU) and accumulates in fp32. The last K step may stick out:
# mask it and load `0.0`, which adds nothing. On a GPU, `tl.dot` rounds fp32 operands to TF32 (10 bits of
# mantissa, ~1e-3 relative error) unless told `input_precision="ieee"`; `minillm grade` sets
# `TRITON_F32_DEFAULT=ieee`, so your kernel is graded in full fp32 on a GPU as under the interpreter.
# FlashAttention is this loop with the keys in place of K: a query tile (A's row panel) meets every key tile
# in turn, with section 2's online softmax between the two dots.
# The picture: the tiles that program (1, 1) reads, by K step, for `[40, 45] @ [45, 40]` in tiles of 16.

# %%
M, K, N, blk, pid = 40, 45, 40, 16, (1, 1)
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained", gridspec_kw={"width_ratios": [K, N, N]})
for ax, (name, h, w) in zip(axes, (("A", M, K), ("B", K, N), ("C", M, N))):
    for r in range(0, h, blk):
        for c in range(0, w, blk):
            ax.add_patch(Rectangle((c, r), blk, blk, fill=False, ls=":", color="0.6"))
    ax.add_patch(Rectangle((0, 0), w, h, fill=False, lw=2))
    ax.set_xlim(-2, math.ceil(w / blk) * blk + 2)
    ax.set_ylim(math.ceil(h / blk) * blk + 2, -2)
    ax.set_aspect("equal")
    ax.set_title(f"{name} [{h}, {w}]", fontsize=10)
for step, k0 in enumerate(range(0, K, blk)):
    shade = plt.get_cmap("Oranges")(0.3 + 0.25 * step)
    for ax, (x0, y0) in ((axes[0], (k0, pid[0] * blk)), (axes[1], (pid[1] * blk, k0))):
        ax.add_patch(Rectangle((x0, y0), blk, blk, color=shade, alpha=0.8))
        ax.text(x0 + blk / 2, y0 + blk / 2, f"k step {step}", ha="center", va="center", fontsize=8)
axes[0].axvline(K, color="C3", lw=1)
axes[1].axhline(K, color="C3", lw=1)
axes[2].add_patch(Rectangle((pid[1] * blk, pid[0] * blk), blk, blk, color="C0", alpha=0.7))
axes[2].text(pid[1] * blk + blk / 2, pid[0] * blk + blk / 2, "program\n(1, 1)", ha="center", va="center", fontsize=8)
fig.suptitle("program (1, 1) reads a row panel of A and a column panel of B, BLOCK_K at a time "
             "(red: K = 45 ends inside step 2, whose lanes past it are masked)", fontsize=10)
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
g3 = torch.Generator().manual_seed(4)
for m, k, n in [(1, 1, 1), (40, 45, 40), (17, 64, 30)]:
    a, b = torch.randn(m, k, generator=g3), torch.randn(k, n, generator=g3)
    print(f"[{m}, {k}] @ [{k}, {n}]: {math.ceil(m / 16) * math.ceil(n / 16)} programs x {math.ceil(k / 16)} k steps, "
          f"== a @ b: {bool(torch.allclose(ch03_puzzles.matmul(a.to(device), b.to(device)).cpu(), a @ b, atol=TOL, rtol=TOL))}")

# %% [markdown]
# ## 5. The Triton kernel
#
# `_flash_fwd_kernel` (in `kernels/flash_attention.py`) is one program per (query tile, head, sequence). It
# loads its `BLOCK_M × head_dim` query tile once, asks for `(full_end, hi)` (the same bounds as your
# `causal_block_range`, computed in registers), and calls the inner loop twice: once over the unmasked tiles
# with `MASKED=False` (no mask instruction at all: the fast path), once over the diagonal tiles with
# `MASKED=True`. Then it divides by `l` and writes `O` and the log-sum-exp.
#
# Two details of the real thing:
# * **base 2**: `exp(x) = exp2(x · log2 e)`. The kernel folds `log2 e` into the softmax scale, so each score
#   costs one fused multiply-add and one `exp2`, the instruction the hardware has;
# * **grouped-query attention**: query head `h` reads kv head `h // (H / KVH)`; K and V are never copied per
#   query head.
#
# **Exercise `ch03.flash_attention_kernel`**: write `attend_kv_range`, the inner loop: load a K tile (transposed)
# and a V tile, `S = tl.dot(q, Kᵀ)`, mask, update `m`, `l`, `acc` as in your online softmax, in base 2. The
# launcher `launch_flash_attention` beside it in your chapter module runs the whole kernel with your loop.

# %%
# NBVAL_CHECK_OUTPUT
for b, h, kvh, sq, sk, d, causal in [(1, 2, 1, 40, 40, 32, True), (2, 3, 3, 9, 45, 24, True), (1, 2, 2, 33, 20, 16, False)]:
    q, k, v = torch.randn(b, h, sq, d), torch.randn(b, kvh, sk, d), torch.randn(b, kvh, sk, d)
    out, lse = ch03.launch_flash_attention(q.to(device), k.to(device), v.to(device), causal, None, 16, 16)
    out = out.cpu()
    want = torch.stack([torch.stack([naive_attention(q[i, j], k[i, j // (h // kvh)], v[i, j // (h // kvh)], causal)
                                     for j in range(h)]) for i in range(b)])
    print(f"B={b} H={h} KVH={kvh} Sq={sq:2d} Sk={sk:2d} D={d} causal={causal!s:5}: "
          f"kernel == naive: {bool((out - want).abs().max() < TOL)}")

# %% [markdown]
# The engine calls the same kernel through `flash_attn_varlen`: the prompts of a batch are packed one after
# another (no padding) and `cu_seqlens` says where each begins, as in vLLM and FlashAttention's varlen API.

# %%
# NBVAL_CHECK_OUTPUT
lens_q, lens_k = [5, 17, 1], [5, 30, 12]  # the second and third sequences have a cached prefix
cu_q = torch.tensor([0, 5, 22, 23], dtype=torch.int32)
cu_k = torch.tensor([0, 5, 35, 47], dtype=torch.int32)
q, k, v = torch.randn(23, 4, 16), torch.randn(47, 2, 16), torch.randn(47, 2, 16)
out = fa.flash_attn_varlen(q.to(device), k.to(device), v.to(device), cu_q.to(device), cu_k.to(device),
                           max(lens_q), max(lens_k), causal=True).cpu()
worst = 0.0
for i in range(3):
    qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
    for hh in range(4):
        want = naive_attention(q[qs, hh], k[ks, hh // 2], v[ks, hh // 2])
        worst = max(worst, float((out[qs, hh] - want).abs().max()))
print(f"packed batch of 3 sequences, GQA 4:2: kernel == naive: {worst < TOL}")

# %% [markdown]
# ## 6. On the GPU
#
# The kernel's tile shapes are autotuned per (head_dim, causal, varlen) on an H100. Measured with
# `python benchmarks/bench_kernels.py` on 2026-11-25 (H100 SXM, triton 3.6), causal bf16 prefill, 32 heads of
# 128, 16k tokens per batch: **334 / 432 / 473 TFLOP/s at sequence length 1k / 4k / 16k**, that is 0.77 / 0.82 /
# 0.82 × torch's SDPA in the same run (benchmarks/RESULTS.md). SDPA reached 433-578 TFLOP/s there, more than
# FlashAttention-2 gets from an H100 (about 35% of its peak, says the FlashAttention-3 paper): on Hopper it ran a
# Hopper kernel. Not bad for ~100 lines of Python; the gap is that kernel's Hopper-only machinery (TMA async
# copies, wgmma, warp specialisation, as in FlashAttention-3).

# %%
if torch.cuda.is_available():
    from triton.testing import do_bench
    for seq in (1024, 4096):
        qg = torch.randn(16384 // seq, 32, seq, 128, device="cuda", dtype=torch.bfloat16)
        kg, vg = torch.randn_like(qg), torch.randn_like(qg)
        ms = do_bench(lambda: fa.flash_attention(qg, kg, vg, causal=True))
        ms_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True))
        flops = 4 * qg.shape[0] * 32 * seq * seq * 128 / 2
        print(f"seq {seq}: {flops / ms / 1e9:.0f} TFLOP/s, {ms_sdpa / ms:.2f}x SDPA")
else:
    print("no GPU here. On an H100 this cell times flash_attention against SDPA at seq 1k and 4k (causal, bf16,\n"
          "32 heads x 128, 16k tokens per batch); recorded: 334 and 432 TFLOP/s, 0.77x and 0.82x SDPA.")

# %% [markdown]
# ## 7. Interview questions
#
# 1. *Why is FlashAttention called IO-aware? Does it do fewer FLOPs?* <details><summary>answer</summary>It does
#    the same FLOPs (more, counting the rescaling); it moves fewer bytes between HBM and the chip: S and P never
#    leave on-chip memory, and its extra memory is O(N) instead of O(N²).</details>
# 2. *How can a softmax be computed one block at a time?* <details><summary>answer</summary>Keep a running max m,
#    sum l and accumulator; when a block raises the max, multiply l and acc by exp(m_old − m_new).</details>
# 3. *What does a causal mask save, and which tiles still need a mask?* <details><summary>answer</summary>Tiles
#    wholly above the diagonal are skipped (about half of a prefill); only the tiles the diagonal cuts need a mask.</details>
# 4. *Why does the kernel use exp2, and why return the log-sum-exp?* <details><summary>answer</summary>exp2 is the
#    hardware instruction (fold log2 e into the scale). The lse lets partial attentions over disjoint keys be merged
#    exactly (split-KV decode, chapter 4) and is what the backward pass needs.</details>
# 5. *What did FlashAttention-2 change?* <details><summary>answer</summary>Parallelism over the query length as
#    well as batch and heads, the query tile in the outer loop (K/V stream past it), fewer non-matmul FLOPs (one
#    division by l at the end).</details>
#
# A question whose answer is a number (exercise `ch03.attention_hbm_bytes`): *for one head of non-causal attention
# over 4096 and 16384 tokens, head_dim 128, bf16, how many bytes move to and from memory the naive way (three
# kernels: QKᵀ, softmax, PV) and with FlashAttention's tiles of 128 queries?*

# %%
# NBVAL_CHECK_OUTPUT
attention_hbm_bytes = load_function("ch03.attention_hbm_bytes")
for n in (4096, 16384):
    naive, flash = attention_hbm_bytes(n, 128, 2, 128, False), attention_hbm_bytes(n, 128, 2, 128, True)
    print(f"n = {n:5d}: naive {naive / 1e6:8.1f} MB, flash {flash / 1e6:7.1f} MB ({naive / flash:.2f}x fewer bytes), "
          f"extra memory naive {n * n * 2 / 1e6:6.1f} MB vs flash 0")
print(f"head_dim 64, n = 16384: {attention_hbm_bytes(16384, 64, 2, 128, False) / attention_hbm_bytes(16384, 64, 2, 128, True):.2f}x")

# %% [markdown]
# The bytes shrink by about `2·BLOCK_M / head_dim`: K and V are re-read once per query tile, so bigger query tiles
# (more on-chip memory) mean fewer bytes, the paper's IO bound Θ(N²d²/M) for on-chip memory M. Two things make the
# practical gain larger than that ratio: the naive version also stores S and P (quadratic *memory*, which caps the
# context), and the K/V re-reads of neighbouring programs mostly hit the GPU's L2 cache, not HBM.
#
# **What to remember**
# * attention's score matrix is quadratic in the context; FlashAttention never writes it: one query tile stays
#   in registers while key/value tiles stream past;
# * the online softmax makes that exact: keep a running max, sum and accumulator, and rescale the last two by
#   `exp(m_old − m_new)` whenever the max moves;
# * causal attention skips the tiles above the (bottom-right aligned) diagonal and masks only the few it cuts;
# * the log-sum-exp the kernel returns lets partial attentions be merged: chapter 4 uses it to split a long
#   decode across the whole GPU.
