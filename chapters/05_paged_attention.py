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
# # Chapter 5 — Paged KV cache: blocks, block tables, slot mapping
#
# Chapter 2's contiguous cache reserves `max_model_len` slots for every sequence before it has produced a single
# token, because it cannot know how long the sequence will grow. Most of that reservation is never written.
# **PagedAttention** (Kwon et al., SOSP 2023) borrows the operating system's answer to the same problem, virtual
# memory:
#
# * the KV cache is a pool of fixed-size **blocks** of `block_size` token slots (pages);
# * each sequence has a **block table**: its logical block `j` (tokens `j·bs … (j+1)·bs − 1`) lives in physical
#   block `block_table[j]`, anywhere in the pool (a page table);
# * a sequence takes a block only when a token first lands in it, and gives all of them back when it finishes;
# * blocks carry a **reference count**, so two sequences can share one (parallel sampling, a common prefix).
#
# The attention kernel never sees "a sequence's cache" as one tensor: for every token it computes a **slot**
# (`physical block × block_size + offset`) to write its K/V, and it gathers K/V through the block table to read.
#
# Your exercises, in `exercises/ch05_paged_kv.py` (then `minillm grade ch05`):
# `blocks_to_append` (how many blocks to take), `slot_mapping` (position → slot), `free_blocks`
# (drop references on finish) and `hash_block` (a block's name for sharing, used by chapter 6's prefix cache);
# the engine calls all four, so your versions run inside it. At the end, an interview question whose answer is
# a number: `num_kv_blocks_needed`.

# %%
import os

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle

from minillm import LLM, SamplingParams
from minillm.course.impl import load_function
from minillm.course.overrides import use_overrides
from minillm.engine.block_manager import BlockManager
from minillm.engine.kv_waste import kv_memory_waste
from minillm.engine.sequence import Sequence

blocks_to_append = load_function("ch05.blocks_to_append")
slot_mapping = load_function("ch05.slot_mapping")
free_blocks = load_function("ch05.free_blocks")
hash_block = load_function("ch05.hash_block")

# %% [markdown]
# ## 1. What the contiguous cache wastes
#
# Eight chat turns of realistic lengths in a 2048-token window. The contiguous cache reserves the window for each;
# the paged cache (16-token blocks) wastes only the unfilled tail of each sequence's last block.

# %%
# NBVAL_CHECK_OUTPUT
lengths = [87, 412, 23, 1290, 160, 64, 515, 33]
for layout, key in (("contiguous", "contiguous"), ("paged, block 16", "paged")):
    w = kv_memory_waste(lengths, block_size=16, max_model_len=2048)
    print(f"{layout:16s}: {w[key + '_slots']:6d} slots reserved for {w['tokens']} tokens, "
          f"waste {100 * w[key + '_waste_fraction']:5.1f}%")

# %% [markdown]
# ## 2. How many blocks must a sequence take?
#
# A sequence holding `num_blocks_held` blocks, with `num_tokens_now` tokens, is about to compute
# `num_new_tokens` more. It must hold `ceil((now + new) / block_size)` blocks afterwards. That one formula serves
# a new prompt (`now = 0`), a chunk of a long prompt, and a decode step. **Exercise `ch05.blocks_to_append`.**

# %%
# NBVAL_CHECK_OUTPUT
cases = [("new prompt of 33 tokens", 0, 33, 0), ("decode: token 16 of a block", 15, 1, 1),
         ("decode: token 17, crosses a boundary", 16, 1, 1), ("chunk of a prompt allocated whole", 16, 16, 3)]
for what, now, new, held in cases:
    print(f"{what:38s} now={now:2d} new={new:2d} held={held}: take {blocks_to_append(now, new, held, 16)}")

# %% [markdown]
# ## 3. Block tables, step by step
#
# The real `BlockManager` (the engine's), on a toy pool of 8 blocks of 4 slots, through a fixed story:
# `A` (6 tokens) and `B` (9 tokens) arrive, `A` decodes 3 tokens (crossing a block boundary), `B` finishes,
# `C` (10 tokens) arrives, and `D` forks from `A` (parallel sampling: it shares A's blocks).

# %%
def run_story(bm: BlockManager) -> dict[str, Sequence]:
    """The fixed sequence of operations of section 3; returns the live sequences by name."""
    def arrive(name: str, n: int) -> Sequence:
        seq = Sequence(name, list(range(100, 100 + n)), SamplingParams(max_tokens=8))
        bm.allocate(seq)
        seq.num_computed_tokens = seq.num_tokens  # as if its prefill had run
        return seq

    seqs = {"A": arrive("A", 6), "B": arrive("B", 9)}
    for t in range(3):  # three decode steps of A: room for the new token, then it is computed
        seqs["A"].append_token(7 + t)
        bm.append_slots(seqs["A"], 1)
        seqs["A"].num_computed_tokens += 1
    bm.free(seqs.pop("B"))
    seqs["C"] = arrive("C", 10)
    seqs["D"] = Sequence("D", list(seqs["A"].token_ids), SamplingParams(max_tokens=8))
    bm.fork(seqs["A"], seqs["D"])
    return seqs


bm = BlockManager(num_blocks=8, block_size=4, watermark=0.0)
seqs = run_story(bm)

# %%
# NBVAL_CHECK_OUTPUT
for name, seq in seqs.items():
    print(f"{name}: {seq.num_tokens:2d} tokens, block table {seq.block_table}")
print("ref counts :", bm.ref_counts)
print("free blocks:", list(bm.free_block_ids))

# %% [markdown]
# `C`'s table is not contiguous: it got the last never-used blocks, 6 and 7, and then block 4, which `B` gave
# back (tail first: 4, 3, 2). `A` and `D` point at the same three blocks, each with reference count 2.
# The picture: the physical pool on top (each block's 4 slots, coloured by owner, grey and striped when shared),
# the block tables below. Slots are computed with *your* `slot_mapping`.

# %%
COLORS = {"A": "C0", "B": "C1", "C": "C2", "D": "C3", "E": "C4", "F": "C5", "G": "C6", "H": "C7"}


def draw_paged_kv(bm: BlockManager, seqs: dict[str, Sequence], title: str = "", fig=None):
    """The pool (top) and every block table (bottom); slot colours from slot_mapping."""
    fig = fig or plt.figure(figsize=(9, 2.2 + 0.45 * len(seqs)))
    fig.clear()
    pool, tables = fig.subplots(2, 1, height_ratios=[1.2, 0.2 + 0.45 * max(1, len(seqs))])
    bs = bm.block_size
    for b in range(bm.num_blocks):
        pool.add_patch(Rectangle((b * (bs + 1), 0), bs, 1, fill=False, lw=1.2))
        pool.text(b * (bs + 1) + bs / 2, 1.15, f"{b}" + (f" (ref {bm.ref_counts[b]})" if bm.ref_counts[b] > 1 else ""),
                  ha="center", fontsize=8)
    for name, seq in seqs.items():
        for slot in slot_mapping(seq.block_table, 0, seq.num_tokens, bs):
            b, off = divmod(slot, bs)
            shared = bm.ref_counts[b] > 1
            colour = "0.6" if shared else COLORS.get(name, "grey")  # grey and striped: held by several tables
            pool.add_patch(Rectangle((b * (bs + 1) + off, 0), 1, 1, facecolor=colour, edgecolor="white",
                                     hatch="//" if shared else None))
    pool.set_xlim(-0.5, bm.num_blocks * (bs + 1))
    pool.set_ylim(-0.2, 1.5)
    pool.axis("off")
    pool.set_title(title or "physical KV pool (one rectangle per block, one cell per token slot)", fontsize=10)
    for row, (name, seq) in enumerate(seqs.items()):
        y = len(seqs) - row - 1
        tables.text(-0.3, y + 0.4, f"{name}", ha="right", va="center", fontsize=10, color=COLORS.get(name, "grey"))
        for j, b in enumerate(seq.block_table):
            tables.add_patch(Rectangle((j * 1.2, y), 1, 0.8, color=COLORS.get(name, "grey"), alpha=0.3))
            tables.text(j * 1.2 + 0.5, y + 0.4, str(b), ha="center", va="center", fontsize=9)
    tables.set_xlim(-1.5, 1.2 * max([len(s.block_table) for s in seqs.values()] + [4]) + 1)
    tables.set_ylim(-0.2, max(1, len(seqs)))
    tables.axis("off")
    tables.set_title("block tables: logical block j -> physical block", fontsize=10)
    return fig


draw_paged_kv(bm, seqs)
plt.show()

# %% [markdown]
# ## 4. Slot mapping
#
# Token position `p` of a sequence lives at slot `block_table[p // bs] * bs + p % bs` of the flat pool.
# **Exercise `ch05.slot_mapping`**: the slots of positions `start … end − 1`. Watch the jump at each block boundary.

# %%
# NBVAL_CHECK_OUTPUT
for name in ("A", "C"):
    seq = seqs[name]
    print(f"{name}: table {seq.block_table} -> slots {slot_mapping(seq.block_table, 0, seq.num_tokens, 4)}")

# %% [markdown]
# That is all a paged attention kernel needs. The write side scatters each new token's K/V to its slot; the read
# side gathers a sequence's K/V through the same slots. Here with a real tensor, the layout of
# `minillm/forward_context.py` (`[num_blocks, block_size, kv_heads, head_dim]`), for sequence `A`:

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
k_cache = torch.zeros(bm.num_blocks, bm.block_size, 3, 64)  # one layer's keys: 3 KV heads, head_dim 64
k_of_a = torch.randn(seqs["A"].num_tokens, 3, 64)  # the keys A's tokens would produce
slots = torch.tensor(slot_mapping(seqs["A"].block_table, 0, seqs["A"].num_tokens, bm.block_size))
k_cache.view(-1, 3, 64)[slots] = k_of_a  # write: scatter to the slots
gathered = k_cache.view(-1, 3, 64)[slots]  # read: gather through the block table
print("read back equals written:", torch.equal(gathered, k_of_a))
print("blocks touched:", sorted(set((slots // bm.block_size).tolist())))

# %% [markdown]
# ## 5. Freeing, with shared blocks
#
# When a sequence finishes, each block of its table loses one reference; only blocks nobody else holds become free.
# The walk goes from the table's **last** block to its first: when the prefix cache (chapter 6) later has to
# evict, it takes the end of a prefix before its beginning. **Exercise `ch05.free_blocks`** works on plain lists:

# %%
# NBVAL_CHECK_OUTPUT
ref_counts = list(bm.ref_counts)
print("D finishes, table", seqs["D"].block_table, "-> freed", free_blocks(seqs["D"].block_table, ref_counts))
print("A finishes, table", seqs["A"].block_table, "-> freed", free_blocks(seqs["A"].block_table, ref_counts))
print("ref counts now:", ref_counts)

# %% [markdown]
# ## 6. Naming a block by what it holds: `hash_block`
#
# Reference counts let sequences share blocks they know they share (a fork). To share blocks between requests
# that merely *start alike* (the same system prompt), the engine needs a name for a block's content. A block's
# K/V depend on its own tokens **and on every token before it** (attention mixed them in), so the name of block
# `j` must cover the whole prefix. A **chain hash** does that cheaply:
# `h_0 = hash_block(None, tokens of block 0)`, `h_j = hash_block(h_{j−1}, tokens of block j)`. Only full blocks
# get a name: a partly filled block will still be written. **Exercise `ch05.hash_block`** (use `hash((parent,
# tuple(tokens)))` with parent 0 for the first block: the tokens may come as a list). Below: three prompts of 4-token blocks; equal colours are equal
# names. Prompts 0 and 1 share their first two blocks; prompt 2 has prompt 0's block 2 tokens, after a different
# beginning: a different name, since its keys and values differ.

# %%
def chain(tokens: list[int], block_size: int = 4) -> list[int]:
    """Chain hashes of the full blocks of `tokens`, with your hash_block."""
    names, parent = [], None
    for j in range(len(tokens) // block_size):
        parent = hash_block(parent, tuple(tokens[j * block_size:(j + 1) * block_size]))
        names.append(parent)
    return names


base = list(range(100, 112))
story = {"prompt 0": base + [7, 7], "prompt 1": base[:8] + [5, 6, 7, 8, 9, 9],
         "prompt 2": [1, 2, 3, 4, 9, 9, 9, 9] + base[8:12]}
chains = {name: chain(toks) for name, toks in story.items()}
distinct = list(dict.fromkeys(h for c in chains.values() for h in c))
fig, ax = plt.subplots(figsize=(7, 1.9), layout="constrained")
for row, (name, c) in enumerate(chains.items()):
    for j, h in enumerate(c):
        ax.add_patch(Rectangle((j * 1.1, -row), 1, 0.8, color=plt.get_cmap("tab10")(distinct.index(h))))
        ax.text(j * 1.1 + 0.5, -row + 0.4, f"{h & 0xFFFF:04x}", ha="center", va="center", fontsize=8, color="white")
    ax.text(-0.15, -row + 0.4, name, ha="right", va="center", fontsize=9)
ax.set_xlim(-1.5, 3.4)
ax.set_ylim(-2.3, 1.0)
ax.axis("off")
ax.set_title("chain hashes of the full blocks (last 16 bits); the same colour is the same block", fontsize=10)
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print("prompts 0 and 1 share blocks 0, 1:", chains["prompt 0"][:2] == chains["prompt 1"][:2],
      "| differ at block 2:", chains["prompt 0"][2] != chains["prompt 1"][2])
print("prompt 2's block 2 holds prompt 0's block 2 tokens, after another prefix; same name:",
      chains["prompt 2"][2] == chains["prompt 0"][2])
print("block 0 of prompt 0 == hash((0, its tokens)):", chains["prompt 0"][0] == hash((0, tuple(base[:4]))))

# %% [markdown]
# ## 7. Your functions inside the engine
#
# The block manager calls `blocks_to_append` and `free_blocks` through the course dispatcher (and the prefix
# cache calls `hash_block`: chapter 6 runs it). Run the real engine
# (continuous batching, 16-token blocks, a pool of only 12 blocks so that blocks are reused all the time) once
# with the reference and once with your functions: the generated tokens must be identical.

# %%
llm = LLM(seed=0, max_model_len=256, scheduling="continuous", num_kv_blocks=12, block_size=16)
prompts = ["The capital of France is", "List three colours:", "def fibonacci(n):", "Once upon a time"]
params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
with use_overrides({"ch05.blocks_to_append": blocks_to_append, "ch05.free_blocks": free_blocks}):
    yours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
bm_engine = llm.llm_engine.scheduler.block_manager

# %%
# NBVAL_CHECK_OUTPUT
print("same tokens with your functions:", yours == reference)
print(f"after the run: {bm_engine.num_used_blocks} blocks in use, {bm_engine.num_free_blocks} free")

# %%
print("first answer:", repr(llm.tokenizer.decode(reference[0])))

# %% [markdown]
# ## 8. Explore
#
# Run this notebook in Jupyter to get buttons that drive a block manager: add a request, decode one token for
# every sequence, finish the oldest one, and watch the tables and the pool. (Under the test runner the explorer
# is built and exercised but not displayed; the picture after a fixed set of clicks is drawn instead.)

# %%
def build_explorer(num_blocks: int = 12, block_size: int = 4):
    """(widget, click, state) of a block-manager explorer; click(action) replays a button press."""
    import ipywidgets as widgets

    state = {"bm": BlockManager(num_blocks, block_size, watermark=0.0), "seqs": {}, "next": 0, "log": ""}
    out = widgets.Output()
    status = widgets.HTML()

    def redraw() -> None:
        bm_, seqs_ = state["bm"], state["seqs"]
        status.value = (f"<b>{bm_.num_free_blocks}</b> of {bm_.num_blocks} blocks free &nbsp; {state['log']}")
        with out:
            out.clear_output(wait=True)
            draw_paged_kv(bm_, seqs_, fig=plt.figure(figsize=(9, 2.2 + 0.45 * max(1, len(seqs_)))))
            plt.show()

    def click(action: str) -> None:
        bm_, seqs_ = state["bm"], state["seqs"]
        if action == "add":
            name = "ABCDEFGH"[state["next"] % 8]
            seq = Sequence(name, list(range(3 + 2 * state["next"] % 7)), SamplingParams(max_tokens=64))
            if name in seqs_ or not bm_.can_allocate(seq):
                state["log"] = f"cannot add {name}: not enough free blocks (or {name} still running)"
            else:
                bm_.allocate(seq)
                seq.num_computed_tokens = seq.num_tokens
                seqs_[name], state["next"] = seq, state["next"] + 1
                state["log"] = f"{name} arrived with {seq.num_tokens} tokens"
        elif action == "decode":
            grown = []
            for name, seq in seqs_.items():
                if bm_.can_append(seq, 1):
                    seq.append_token(0)
                    bm_.append_slots(seq, 1)
                    seq.num_computed_tokens += 1
                    grown.append(name)
            state["log"] = f"decoded one token for {', '.join(grown) or 'nobody (pool full)'}"
        elif action == "finish" and seqs_:
            name = next(iter(seqs_))
            bm_.free(seqs_.pop(name))
            state["log"] = f"{name} finished; its blocks are free"
        redraw()

    buttons = []
    for label, action in (("add request", "add"), ("decode step", "decode"), ("finish oldest", "finish")):
        button = widgets.Button(description=label)
        button.on_click(lambda _, a=action: click(a))
        buttons.append(button)
    return widgets.VBox([widgets.HBox(buttons), status, out]), click, state


def interactive() -> bool:
    """True in a Jupyter front end (jupyter_server names the kernel's session; VS Code sets VSCODE_PID); False
    under nbval / nbclient, which set neither. MINILLM_WIDGETS=0 or 1 forces the choice."""
    forced = os.environ.get("MINILLM_WIDGETS")
    if forced in ("0", "1"):
        return forced == "1"
    return any(k in os.environ for k in ("JPY_SESSION_NAME", "VSCODE_PID"))


# %%
explorer, click, state = build_explorer()
if interactive():
    display(explorer)  # noqa: F821 (IPython's display)
else:  # replay a fixed set of clicks, then draw where the explorer stands
    for action in ("add", "add", "add", "decode", "decode", "decode", "finish", "add"):
        click(action)
    plt.close("all")
    draw_paged_kv(state["bm"], state["seqs"], title="the explorer after: add x3, decode x3, finish, add")
    plt.show()

# %%
# NBVAL_CHECK_OUTPUT
if not interactive():
    print(state["log"])
    for name, seq in state["seqs"].items():
        print(f"{name}: {seq.num_tokens:2d} tokens, block table {seq.block_table}")

# %% [markdown]
# ## 9. Interview questions
#
# 1. *What problem does PagedAttention solve?* <details><summary>answer</summary>Memory fragmentation of the KV
#    cache: a contiguous cache reserves max_model_len per sequence (internal waste) and needs one large free region
#    (external fragmentation). Blocks taken on demand waste less than one block per sequence, and any free block
#    will do.</details>
# 2. *How does the kernel find a token's K/V?* <details><summary>answer</summary>Through the block table:
#    slot = block_table[p // block_size] * block_size + p % block_size.</details>
# 3. *How do you choose the block size?* <details><summary>answer</summary>Small blocks waste less and share
#    prefixes at a finer grain; large blocks mean shorter tables and longer contiguous reads in the kernel.
#    vLLM uses 16.</details>
# 4. *How do parallel sampling or beam search share memory?* <details><summary>answer</summary>Forked sequences
#    point at the same blocks with reference counts > 1; a write into a shared block copies it first
#    (copy-on-write).</details>
# 5. *Why a chain hash for prefix caching, not a hash of the block's own tokens?* <details><summary>answer</summary>
#    A block's K/V depend on every earlier token; the same tokens after another prefix have different K/V.</details>
#
# A question whose answer is a number (exercise `ch05.num_kv_blocks_needed`): *64 requests share a 1000-token
# system prompt and add 200 tokens each. With 16-token blocks, how many blocks do they take without sharing, and
# with the prompt's full blocks stored once? And for this chapter's eight chat turns, how many blocks against how
# many contiguous slots?*

# %%
# NBVAL_CHECK_OUTPUT
num_kv_blocks_needed = load_function("ch05.num_kv_blocks_needed")
alone = num_kv_blocks_needed([1200] * 64, 16)
shared = num_kv_blocks_needed([1200] * 64, 16, shared_prefix_len=1000)
print(f"64 x (1000 shared + 200 own) tokens: {alone} blocks alone, {shared} with sharing "
      f"({100 * (1 - shared / alone):.0f}% fewer)")
print(f"the eight chat turns: {num_kv_blocks_needed(lengths, 16)} blocks = {16 * num_kv_blocks_needed(lengths, 16)} "
      f"slots, against {8 * 2048} contiguous slots")

# %% [markdown]
# 6. *Mistral 7B v0.1 attends through a 4,096-token sliding window. What changes in a paged engine?*
#    <details><summary>answer</summary>Query p sees keys p − W + 1 .. p only, so the kernels start their key loop at
#    the first query's window (a decode reads W keys, not the whole context: its cost stops growing) and mask the
#    window's lower edge; and blocks wholly before every layer's window go back to the pool as the sequence grows
#    (vLLM's sliding-window manager, minillm's `engine/block_window.py`), so a sequence holds about W tokens of K/V,
#    not its whole context, and a prompt takes its blocks one chunk at a time. Not where a full-attention layer sits
#    beside the sliding ones (Qwen2's lower layers): it still reads every key.</details>
#
# The band of visible keys for six tokens and a window of 3 (rows: queries, columns: keys), the mask the paged
# kernels are tested against (`kernels/sliding_window.py`):

# %%
# NBVAL_CHECK_OUTPUT
from minillm.kernels.sliding_window import sliding_window_mask

for row in sliding_window_mask(6, 6, window=3).int().tolist():
    print(" ".join("x" if seen else "." for seen in row))

# %% [markdown]
# And the blocks: a `BlockManager(sliding_window=W)` (the engine's, when every layer slides) gives back the blocks
# wholly before the next query's window; their table entries become -1, the value tables are padded with, which no
# kernel reads. One sequence decoding, window 6, blocks of 4: it never holds more than 3 blocks.

# %%
# NBVAL_CHECK_OUTPUT
windowed = BlockManager(num_blocks=16, block_size=4, sliding_window=6)
seq = Sequence("w", [1, 2, 3], SamplingParams())
windowed.allocate(seq)
for token in range(20):  # each step: give back what slid out, room for the new token, compute it, sample the next
    windowed.release_out_of_window(seq)
    windowed.append_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    seq.token_ids.append(token)
    if token % 5 == 4:
        print(f"{seq.num_computed_tokens:2d} tokens computed: table {seq.block_table}, "
              f"{windowed.num_used_blocks} blocks held")
windowed.free(seq)

# %% [markdown]
# The engine does the same whenever every layer of its model slides. The bundled SmolLM2 attends fully, but vLLM's
# `hf_overrides` can change its config before it is built: with a 32-token window in every layer, a request of
# 144 tokens runs on a pool of 6 blocks (96 slots) and holds at most 3 of them; without the window the request
# fills the pool at 97 tokens and is ended with an error (finish_reason "error": it can never fit, so it does not
# wait forever). (With a window it is another model, and its text changes: this shows the memory, not the quality.)

# %%
# NBVAL_CHECK_OUTPUT
text = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable " \
       "metal type with a screw press."
for overrides in ({}, {"sliding_window": 32}):
    small = LLM(seed=0, max_model_len=256, num_kv_blocks=6, block_size=16, enable_chunked_prefill=True,
                max_num_batched_tokens=32, hf_overrides=overrides)
    out = small.generate([text], SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))[0]
    timeline = small.llm_engine.scheduler.timeline
    held = 6 - min(r.num_free_blocks for r in timeline) if timeline else 0
    print(f"hf_overrides={overrides}: {len(out.prompt_token_ids)} + {len(out.outputs[0].token_ids)} tokens, "
          f"finish_reason {out.outputs[0].finish_reason!r}, at most {held} of 6 blocks held")

# %% [markdown]
# **What to remember**
# * the pool is split into blocks; a block table maps a sequence's logical blocks to physical ones, in any order;
# * a token's slot is `block_table[p // bs] * bs + p % bs`: the only address arithmetic paged attention adds;
# * blocks are taken when a token first lands in them and given back (tail first) when nobody references them,
#   so the waste is at most `block_size − 1` slots per sequence instead of the unused part of `max_model_len`.
#
# Chapter 6 uses this pool to batch continuously: admit, grow, preempt, swap and share prefixes, every step.
