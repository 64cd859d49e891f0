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
# # Chapter 9 — Speculative decoding: more tokens per step, exactly the same distribution
#
# Chapter 1 showed that a decode step at batch 1 reads every weight to do about 2 FLOPs per weight: the GPU waits
# on memory and its tensor cores idle. **Speculative decoding** spends that idle compute. Something cheap proposes
# `k` draft tokens; the target model scores all of them in *one* forward pass (k + 1 query rows cost about what one
# costs, while the step is memory-bound); a verification rule keeps a prefix of the drafts plus one token of the
# target's own. The rule (Leviathan et al. 2023; Chen et al. 2023) is **lossless**: the output is distributed
# exactly as the target's own sampling, whatever the drafts were. Drafts only decide the speed.
#
# Your exercises, in `exercises/ch09_speculative.py` (then `minillm grade ch09`): the expected tokens per step
# `expected_tokens_per_step`, the accept test `accept_reject`, the `residual_distribution` to sample after a
# rejection, greedy verification with its bonus token `greedy_accept`, prompt lookup `propose_prompt_lookup`, and
# for token trees `tree_attention_mask` and `medusa_candidates`. The engine calls the verification and drafting
# ones, so your versions verify real drafts below.

# %%
import html
import json

import matplotlib.pyplot as plt
import torch
from IPython.display import HTML, display

from minillm import LLM, SamplingParams
from minillm.bench import roofline
from minillm.course.impl import load_function
from minillm.course.overrides import use_overrides
from minillm.course.registry import repo_root
from minillm.speculative.rejection import rejection_sample
from minillm.speculative.tree import TokenTree, dense_tree_paths, sparse_tree_paths, verify_tree_greedy

accept_reject = load_function("ch09.accept_reject")
residual_distribution = load_function("ch09.residual_distribution")
greedy_accept = load_function("ch09.greedy_verify")
propose_prompt_lookup = load_function("ch09.ngram_lookup")
tree_attention_mask = load_function("ch09.tree_attention_mask")
medusa_candidates = load_function("ch09.medusa_candidates")
critical_batch_size = load_function("ch01.critical_batch_size")  # chapter 1's roofline, yours
expected_tokens_per_step = load_function("ch09.expected_tokens_per_step")

# %% [markdown]
# ## 1. Why the extra tokens are (almost) free
#
# A weight matmul of `m` token rows through a `k x n` weight does `2mkn` FLOPs on about `2kn` bytes (bf16): its
# intensity grows with `m`. The H200 needs about 165 FLOPs per byte (its ridge point) before the tensor cores, not
# the memory, set the pace. A verify step of one sequence with `k = 4` drafts has `m = 5` rows instead of 1:

# %%
# NBVAL_CHECK_OUTPUT
H200 = roofline.H200_BF16
print(f"{H200.name}: ridge point {H200.ridge_point:.0f} FLOPs/byte")
for m in (1, 5, 64, 320):
    print(f"Llama-3-8B FFN up-projection (4096 x 14336), {m:3d} rows: "
          f"intensity {roofline.intensity(m, 14336, 4096, 2):6.1f} FLOPs/byte")
crit = critical_batch_size(H200.flops, H200.bandwidth, 2)
print(f"rows per step before the weights stop being the bottleneck: {crit} (chapter 1's critical batch size)")

# %% [markdown]
# A step then costs about `max(weight bytes / bandwidth, FLOPs / peak)`. For Llama-3-8B in bf16 the memory term is
# 3.8 ms; the FLOPs of 5 rows take 0.1 ms. Verifying 4 drafts costs what decoding one token costs, as long as the
# batch times `(k + 1)` stays under the critical batch: the first reason speculation stops paying is a batch that
# already keeps the tensor cores busy. With per-draft acceptance rate `a`, how many tokens does a step emit on
# average? A draft counts only if all before it were accepted, and the target always adds one token of its own:
# that is **exercise `ch09.expected_tokens_per_step`**, the interview question behind every speculative speedup.

# %%
# NBVAL_CHECK_OUTPUT
params, weight_bytes = 8.03e9, 8.03e9 * 2


def step_seconds(rows: int) -> float:
    """Roofline time of one forward over `rows` token rows of Llama-3-8B (weights only; KV reads ignored)."""
    return max(weight_bytes / H200.bandwidth, 2 * params * rows / H200.flops)


k = 4
for batch in (1, 8, 32, 64, 128):
    cost = step_seconds(batch * (k + 1)) / step_seconds(batch)
    tokens = expected_tokens_per_step(0.6, k)
    print(f"batch {batch:3d}: a verify step costs {cost:4.2f} decode steps; at a = 0.6 it emits "
          f"{tokens:.2f} tokens per sequence -> speedup <= {tokens / cost:.2f}x")

# %% [markdown]
# ## 2. The rule, and its proof as an experiment
#
# Let `p` be the target's distribution at a position and `q` the draft's, and `x ~ q` the draft token.
#
# * **accept** `x` with probability `min(1, p(x)/q(x))` (exercise `ch09.accept_reject`; given a uniform `u`,
#   accept when `u < p(x)/q(x)`, and stop the chain at the first rejection);
# * on rejection, sample from the **residual** `max(0, p − q)`, renormalised (exercise `ch09.residual_distribution`);
# * if all `k` drafts are accepted, sample one **bonus** token from the target after the last one.
#
# Why it is exact: with `β = Σ min(p, q)` the acceptance probability, `P(emit y) = q(y)·min(1, p(y)/q(y)) +
# (1 − β)·max(0, p(y) − q(y))/(1 − β) = min(p(y), q(y)) + max(0, p(y) − q(y)) = p(y)`. Instead of trusting the
# algebra, run it: 200,000 independent one-draft steps on an 8-token vocabulary, through the engine's verifier
# (`rejection_sample`) with your two functions plugged in.

# %%
V, N = 8, 200_000
g = torch.Generator().manual_seed(0)
p = torch.softmax(torch.randn(V, generator=g) * 1.5, dim=-1)  # the target's law at this position
q = torch.softmax(torch.randn(V, generator=g) * 1.5, dim=-1)  # the draft's: a different law
drafts = torch.multinomial(q, N, replacement=True, generator=g).unsqueeze(1)  # x ~ q, one draft per step
target, draft = p.expand(N, 2, V).contiguous(), q.expand(N, 1, V).contiguous()


def emitted_frequencies(overrides: dict) -> tuple[torch.Tensor, float]:
    """Frequencies of the first emitted token over the N steps, and the fraction of drafts accepted."""
    with use_overrides(overrides):
        out = rejection_sample(target, draft, drafts, default_generator=torch.Generator().manual_seed(1))
    return torch.bincount(out.token_ids[:, 0], minlength=V) / N, out.num_accepted.float().mean().item()


def skip_residual(p, q):  # a plausible wrong answer: after a rejection, just sample the target again
    return p


yours, accepted = emitted_frequencies({"ch09.accept_reject": accept_reject,
                                       "ch09.residual_distribution": residual_distribution})
wrong, _ = emitted_frequencies({"ch09.accept_reject": accept_reject, "ch09.residual_distribution": skip_residual})

# %%
# NBVAL_CHECK_OUTPUT
print("p (target)      :", [round(x, 3) for x in p.tolist()])
print("q (draft)       :", [round(x, 3) for x in q.tolist()])
print("emitted (yours) :", [round(x, 3) for x in yours.tolist()])
print("skip residual   :", [round(x, 3) for x in wrong.tolist()])
beta = torch.minimum(p, q).sum().item()
print(f"acceptance rate {accepted:.3f} (theory: sum min(p, q) = {beta:.3f})")
noise = 4 * (p * (1 - p) / N).sqrt().max().item()  # four standard deviations of a frequency estimate
print(f"max |emitted - p|: yours {(yours - p).abs().max().item():.3f}, "
      f"skip residual {(wrong - p).abs().max().item():.3f} (sampling noise allows ~{noise:.3f})")

# %%
fig, ax = plt.subplots(figsize=(9, 2.8), layout="constrained")
width = 0.2
for i, (label, values, color) in enumerate([("p: target", p, "0.3"), ("emitted (your rule)", yours, "C2"),
                                            ("without the residual", wrong, "C3"), ("q: draft", q, "C0")]):
    ax.bar(torch.arange(V) + (i - 1.5) * width, values, width, label=label, color=color)
ax.set_xlabel("token")
ax.set_ylabel("probability")
ax.set_title("speculative sampling emits p, whatever q is; skipping the residual emits something else", fontsize=10)
ax.legend(fontsize=8, ncol=4)
plt.show()

# %% [markdown]
# The residual is where the target has more mass than the draft: after a rejection the token must come from what
# acceptance under-paid. Your two functions on the docstrings' examples:

# %%
# NBVAL_CHECK_OUTPUT
t = torch.tensor
print(accept_reject(t([[0.5, 0.9, 0.2]]), t([[1.0, 0.6, 0.1]]), t([[0.4, 0.7, 0.0]]), t([2])).tolist())
print(residual_distribution(t([[0.5, 0.3, 0.2]]), t([[0.2, 0.6, 0.2]])).tolist())

# %% [markdown]
# ## 3. Greedy verification and the bonus token
#
# At temperature 0, `p` is one-hot at the target's argmax: a draft is accepted exactly when it *is* the argmax,
# and the residual after a mismatch is the argmax again. No probabilities needed, only the target's token at every
# scored position (exercise `ch09.greedy_verify`). The same rule is exact at any temperature for deterministic
# drafts (n-grams), fed the target's *sampled* token at each position: that is how the engine verifies them.
# Every step emits between 1 and k + 1 tokens: all accepted means the target's next token comes for free.

# %%
# NBVAL_CHECK_OUTPUT
target_tokens = t([[5, 7, 2, 9]] * 3)
print(greedy_accept(target_tokens, t([[5, 7, 3], [5, 7, 2], [4, 7, 2]]), t([3, 3, 3])).tolist())

# %% [markdown]
# ## 4. Drafts without a model: prompt lookup and lookahead
#
# Often the continuation is already written down: a summary quotes its document, code repeats identifiers.
# **Prompt lookup** (Saxena 2023) takes the last `n` tokens, finds their most recent earlier occurrence, and proposes
# what followed (exercise `ch09.ngram_lookup`; longest `n` first). **Lookahead** (Fu et al. 2024) also keeps a pool of
# n-grams the model itself produced in Jacobi iterations over guessed future tokens.

# %%
# NBVAL_CHECK_OUTPUT
print(propose_prompt_lookup([1, 2, 3, 4, 1, 2], 3, 3, 1),
      propose_prompt_lookup([9, 1, 2, 3, 8, 2, 3, 1, 2, 3], 3, 3, 1),
      propose_prompt_lookup([1, 2, 3], 4, 3, 1))

# %% [markdown]
# Now the bundled model (SmolLM2-135M, fp32 on this CPU), asked to repeat a paragraph, which is prompt lookup's
# best case, and to continue a piece of Python. Your `propose_prompt_lookup` replaces the engine's n-gram index, and
# your `greedy_accept` verifies. At temperature 0 every variant must reproduce plain decoding token for token.

# %%
llm = LLM(seed=0, max_model_len=256)
tok = llm.tokenizer
doc = ("The block manager hands out fixed-size blocks of the KV cache. A block table maps a sequence's logical "
       "blocks to physical ones, and a finished sequence returns its blocks to the free list.")
code = "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n    return"
PROMPTS = {"repeat": tok.encode(f"Repeat this text exactly.\nText: {doc}\nRepeat: "), "code": tok.encode(code)}
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
OURS = {"ch09.ngram_lookup": propose_prompt_lookup, "ch09.greedy_verify": greedy_accept}
plain = {name: llm.generate([prompt], GREEDY)[0].outputs[0].token_ids for name, prompt in PROMPTS.items()}


def run(spec: dict, prompts: tuple[str, ...] = ("repeat", "code")) -> dict:
    """Each prompt through an engine with speculative config `spec` (sharing the loaded weights)."""
    spec_llm = llm.share_model(speculative_config=spec)
    with use_overrides(OURS):
        outs = {name: spec_llm.generate([PROMPTS[name]], GREEDY)[0] for name in prompts}
    return {name: (o.outputs[0].token_ids, o.metrics.spec_decode) for name, o in outs.items()}


VARIANTS = {"ngram": {"method": "ngram", "num_speculative_tokens": 4},
            "lookahead": {"method": "lookahead", "num_speculative_tokens": 4}}
results = {name: run(spec) for name, spec in VARIANTS.items()}

# %%
# NBVAL_CHECK_OUTPUT
def report(results: dict) -> None:
    for method, per_prompt in results.items():
        for name, (tokens, m) in per_prompt.items():
            print(f"{method:16s} {name:6s}: same tokens as plain: {tokens == plain[name]}; "
                  f"{m.num_verify_steps:2d} verify steps, {m.num_accepted_tokens:2d} of {m.num_draft_tokens:2d} drafts "
                  f"accepted, {m.mean_acceptance_length:.2f} tokens per verify step")


report(results)

# %% [markdown]
# ### Watching acceptance
#
# Step the engine by hand and record, for each verify step, what was drafted and kept (a thin wrapper around your
# `greedy_accept`), here prompt lookup on the paragraph to repeat. Green: accepted drafts; orange: the target's
# correction after a rejection (the rejected drafts follow, struck out); blue: the bonus token after a fully
# accepted step; grey: a step without drafts. A bar separates the steps.

# %%
def record_steps(spec_llm: LLM, prompt: list[int], params: SamplingParams) -> list[dict]:
    """One request, one engine step at a time: what each step emitted, and for verify steps the drafts."""
    verified = []

    def recording_greedy_accept(target_token_ids, draft_token_ids, num_draft_tokens):
        out = greedy_accept(target_token_ids, draft_token_ids, num_draft_tokens)
        verified.append(draft_token_ids[0, :int(num_draft_tokens[0])].tolist())
        return out

    engine, steps, seen = spec_llm.llm_engine, [], 0
    engine.add_request("viz", prompt, params)
    with use_overrides({**OURS, "ch09.greedy_verify": recording_greedy_accept}):
        while engine.has_unfinished_requests():
            calls = len(verified)
            tokens = [o.outputs[0].token_ids for o in engine.step()]
            if tokens and len(tokens[0]) > seen:
                new, seen = tokens[0][seen:], len(tokens[0])
                steps.append({"emitted": new, "drafts": verified[-1] if len(verified) > calls else []})
    return steps


def show_steps(steps: list[dict]) -> None:
    colors = {"accepted": "#b7ebb0", "correction": "#ffd29e", "bonus": "#b9d7ff", "plain": "#e4e4e4"}

    def span(token: int, kind: str, extra: str = "") -> str:
        text = html.escape(tok.decode([token])).replace("\n", "&#8629;") or "&#9251;"
        return f'<span style="background:{colors.get(kind, "none")};{extra}padding:1px 2px;margin:1px">{text}</span>'

    parts = []
    for s in steps:
        drafts, emitted = s["drafts"], s["emitted"]
        n = len(emitted) - 1 if drafts else 0  # accepted drafts: all but the target's one token
        parts += [span(x, "accepted") for x in emitted[:n]]
        kind = "plain" if not drafts else ("bonus" if n == len(drafts) else "correction")
        parts.append(span(emitted[n], kind))
        parts += [span(x, "rejected", "color:#c0392b;text-decoration:line-through;font-size:80%;")
                  for x in drafts[n:]]
        parts.append('<span style="color:#999">|</span>')
    display(HTML('<div style="font-family:monospace;line-height:2">' + "".join(parts) + "</div>"))


viz_steps = record_steps(llm.share_model(speculative_config=VARIANTS["ngram"]), PROMPTS["repeat"], GREEDY)
show_steps(viz_steps)

# %%
# NBVAL_CHECK_OUTPUT
verify = [s for s in viz_steps if s["drafts"]]
print(f"{len(viz_steps)} steps for {sum(len(s['emitted']) for s in viz_steps)} tokens: {len(verify)} verify steps "
      f"({sum(len(s['emitted']) == len(s['drafts']) + 1 for s in verify)} fully accepted), "
      f"{len(viz_steps) - len(verify)} without drafts")

# %% [markdown]
# ## 5. A draft model, or the target's own first layers
#
# A **draft model** is a smaller model with the same tokenizer; **self-speculative** decoding drafts with part of
# the target's own layers and its LM head, sharing the weights (LayerSkip: the first layers, an early exit; Draft &
# Verify: a searched subset, skipping middle layers). Both cost a forward pass per
# drafted token, so the draft must be much cheaper than the target *and* agree with it often. Here both use the
# target's first 24 of 30 layers, untrained as a draft: a cost of 0.8 target steps per drafted token. (The draft
# model is a copy of those layers with its own KV cache: it drafts the same tokens until it is trained.)

# %%
DRAFTS = {"self_speculative": {"method": "self_speculative", "num_speculative_tokens": 3, "draft_num_layers": 24},
          "draft_model": {"method": "draft_model", "num_speculative_tokens": 3, "draft_num_layers": 24}}
draft_results = {name: run(spec, ("code",)) for name, spec in DRAFTS.items()}

# %%
# NBVAL_CHECK_OUTPUT
report(draft_results)

# %% [markdown]
# Lossless, but at 0.8 target steps per drafted token, `k = 3` drafts cost 2.4 steps before the verify step even
# starts: about 1.4 tokens (above) for 3.4 steps of work. A draft must be *distilled* (trained to imitate the target) and be
# an order of magnitude cheaper; that is what Medusa, EAGLE and MTP heads are.
#
# Cheap alone is not enough either. `{"method": "draft_model"}` without a layer count loads the draft shipped for
# SmolLM2: **one** layer, distilled on the target's own answers on an H200 (`minillm train-heads --kind draft
# --draft-layers 1`). It costs 1/30 of the target's layers, yet its first draft is accepted only 8.9% of the time
# (mean accepted length 1.10) and it runs at 0.39-0.44x of plain decoding there: one layer over the target's
# embedding cannot follow thirty. The heads of section 7 are as small but read the target's own hidden state.
#
# ## 6. Token trees: several guesses per position (Medusa, EAGLE)
#
# A chain is all-or-nothing after its first miss. **Medusa** heads predict the tokens 1, 2, 3, ... positions ahead
# from the target's last hidden state, each as a top-k list, and the first choice is often wrong when the second is
# right. A **token tree** scores several alternatives in one forward: node `i` holds one guess, its position is
# `seq_len + depth`, and it may attend only to its own root path (exercise `ch09.tree_attention_mask`). Medusa's
# sparse tree keeps the paths most likely to be accepted, from per-head accuracies measured on calibration data;
# the ones below are illustrative, of the size the Medusa paper reports for its first heads.

# %%
HEAD_ACCURACY = [[0.60, 0.15, 0.08], [0.45, 0.15, 0.08], [0.35, 0.12, 0.06], [0.30, 0.10, 0.05]]  # [head][rank]
tree = TokenTree.from_paths(sparse_tree_paths(HEAD_ACCURACY, 15))
mask = tree_attention_mask(tree.parents)
labels = ["root"] + ["".join(map(str, path)) for path in sorted(sparse_tree_paths(HEAD_ACCURACY, 15),
                                                                  key=lambda p: (len(p), p))]
fig, ax = plt.subplots(figsize=(5.2, 4.6), layout="constrained")
ax.imshow(mask, cmap="Greens")
ax.set_xticks(range(tree.num_nodes), labels, rotation=90, fontsize=7)
ax.set_yticks(range(tree.num_nodes), labels, fontsize=7)
ax.set_title("tree attention mask (row: query node, labelled by its ranks)", fontsize=9)
plt.show()

# %% [markdown]
# Each node's token comes from one head's top-k: head `depth − 1`, rank `ranks[i]` (exercise
# `ch09.medusa_candidates`). With made-up head guesses for one sequence, and a pretend target that continues every
# token `t` with `(7t + 3) mod 50` (so 11 -> 30 -> 13 -> 44 -> 11), greedy tree verification takes the deepest path
# the target agrees with: head 0's *second* guess, then the first guesses of heads 1 and 2, and a bonus token.

# %%
# NBVAL_CHECK_OUTPUT
root = t([11])
head_topk = t([[[5, 30, 4], [13, 18, 2], [44, 29, 7], [1, 3, 6]]])  # [batch, head, rank]
candidates = medusa_candidates(root, head_topk, tree.depths, tree.ranks)
print("tree tokens:", candidates.tolist()[0])
result = verify_tree_greedy(tree, candidates, (7 * candidates + 3) % 50)
print("emitted:", result.to_lists()[0], "via nodes", [n for n in result.accepted_nodes.tolist()[0] if n >= 0])

# %% [markdown]
# What the tree buys, under the same accuracies (a node is accepted with the product of its path's accuracies,
# and the expected accept length is the sum over nodes): a 15-node tree against chains of top-1 guesses.

# %%
# NBVAL_CHECK_OUTPUT
def expected_accepted(paths) -> float:
    total = 0.0
    for path in paths:
        prob = 1.0
        for depth, rank in enumerate(path):
            prob *= HEAD_ACCURACY[depth][rank]
        total += prob
    return total


for name, paths in [("chain of 4 top-1 guesses", [(0,) * d for d in range(1, 5)]),
                    ("sparse tree, 15 nodes", sparse_tree_paths(HEAD_ACCURACY, 15)),
                    ("dense tree (3, 2, 1), 15 nodes", dense_tree_paths((3, 2, 1)))]:
    print(f"{name:31s}: {1 + expected_accepted(paths):.3f} tokens per step")

# %% [markdown]
# ## 7. Trained heads: Medusa, EAGLE, MTP
#
# **EAGLE** drafts at the feature level (one decoder layer over the target's hidden state and the next token's
# embedding); **MTP** (DeepSeek-V3) chains small modules, each one transformer block. They need trained weights:
# this cell uses them when this installation has them, and otherwise says what is missing.

# %%
from minillm.speculative import config as spec_config  # noqa: E402

for method in ("medusa", "eagle", "mtp"):
    if method not in spec_config.METHODS:
        print(f"{method}: not in this build yet ({spec_config.NOT_AVAILABLE.get(method, 'unknown')})")
        continue
    try:
        head_results = {method: run({"method": method, "num_speculative_tokens": 3}, ("code",))}
    except (ValueError, FileNotFoundError) as e:
        print(f"{method}: {e}")
        continue
    report(head_results)

# %% [markdown]
# ### A draft vocabulary: the LM head is most of a draft step
#
# EAGLE's own weights are one decoder layer; every draft step also multiplies by the target's LM head, 49,152 rows of
# 576. On a CPU, where a step costs about what it reads, that makes one draft step about a quarter of a whole target
# step. Yet the target's answers use few of its tokens: `"draft_vocab_size": V` drafts over the V tokens it said most
# often in train-heads' data (FR-Spec, Zhao et al. 2025; EAGLE-3 drafts over 32k of Llama 3's 128k). A draft can
# no longer be a rare token, but each costs V / 49,152 of the LM head; verification still scores every token, so
# the output is the same.

# %%
VOCAB_VARIANTS = {"eagle": {"method": "eagle", "num_speculative_tokens": 4},
                  "eagle, V=4096": {"method": "eagle", "num_speculative_tokens": 4, "draft_vocab_size": 4096}}
try:
    vocab_results = {name: run(spec, ("code",)) for name, spec in VOCAB_VARIANTS.items()}
    report(vocab_results)
except (ValueError, FileNotFoundError) as e:  # no shipped heads or token counts in this installation
    print(e)
config = llm.llm_engine.model_config
h, q, kv = config.hidden_size, config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
layer = 2 * h * q + 2 * h * kv + 3 * h * config.intermediate_size  # q, o; k, v; gate, up, down
for name, rows in (("whole vocabulary", config.vocab_size), ("V = 4096", 4096)):
    print(f"{name:16s}: {(layer + rows * h) / 1e6:4.1f} M weights read per draft step (one layer and the LM head's "
          f"rows), {(config.num_hidden_layers * layer + config.vocab_size * h) / 1e6:.0f} M per target step")

# %% [markdown]
# Measured on this course's 2-core CPU (benchmarks/RESULTS.md, twelfth session; nine prompts x 64 tokens, k = 5):
# EAGLE accepts the same 1.67 tokens per verify step with the whole vocabulary and with V = 4,096, and goes from
# 0.58x to 0.86x the speed of plain decoding; Medusa from 0.77x to 1.04x. What is left is the verify step: six rows
# through the target cost a CPU about two plain steps, where a GPU barely notices them (section 1).

# %% [markdown]
# ## 8. The batch-size trade-off, measured on an H200
#
# `benchmarks/bench_speculative.py` ran the methods on the H200 (SmolLM2 in bf16, CUDA graphs, k = 5, nine chat,
# code and summary prompts, 128 greedy tokens each) at batch 1, 8 and 32; we read its JSON instead of recomputing
# it. eagle_tree/32 and eagle_tree/63 are EAGLE-2 trees of 32 and 63 nodes (the paper's size is about 60).
#
# One lesson came before these numbers. CUDA graphs are captured for verify steps of exactly 1 + k rows. Until the
# engine was fixed, a request's last steps drafted fewer than k tokens (max_tokens left no room for more), missed
# the graphs, and ran eagerly at about 20 ms instead of 2: n-gram measured 0.39x; the same engine with every verify
# step in its graph gives the 1.3x below. On a small model a step is bound by launches and host work, so a step
# outside its graph costs more than everything speculation can save (benchmarks/RESULTS.md, "Ninth session").

# %%
RESULTS = [repo_root() / "benchmarks" / "results" / "speculative_p7_trees_s9_h200.json"]
bench = json.loads(RESULTS[0].read_text())
rows = bench["results"]
methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "plain"))
batches = sorted({r["batch"] for r in rows})
table = {(r["method"], r["batch"]): r for r in rows}

# %%
# NBVAL_CHECK_OUTPUT
print(f"{RESULTS[0].name}: {bench['device_name']}, k = {bench['k']}, {bench['max_tokens']} tokens per request")
print(f"{'method':22s} " + " ".join(f"{'batch ' + str(b):>16s}" for b in batches))
for method in ["plain"] + methods:
    cells = []
    for b in batches:
        r = table[(method, b)]
        cells.append(f"{r['tokens_per_s']:7.0f} tok/s {r['speedup']:4.2f}x" if method == "plain" else
                     f"{r['speedup']:5.2f}x, len {r['mean_acceptance_length']:.2f}")
    print(f"{method:22s} " + " ".join(f"{c:>16s}" for c in cells))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), layout="constrained")
for method in methods:
    axes[0].plot(batches, [table[(method, b)]["speedup"] for b in batches], marker="o", label=method)
    by_position = table[(method, 1)]["acceptance_by_position"]
    axes[1].plot(range(1, len(by_position) + 1), by_position, marker="o", label=method)
axes[0].axhline(1.0, color="k", lw=0.8, ls=":")
axes[0].set_xscale("log", base=2)
axes[0].set_xticks(batches, [str(b) for b in batches])
axes[0].set_xlabel("batch size")
axes[0].set_ylabel("speedup over plain decoding")
axes[0].set_title("H200: speculation pays only at batch 1", fontsize=10)
axes[1].set_xlabel("draft position")
axes[1].set_ylabel("acceptance rate")
axes[1].set_title("batch 1: a draft counts only if all before it did", fontsize=10)
axes[0].legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 9. Interview questions
#
# 1. *Why can speculative decoding not change the output distribution?* <details><summary>answer</summary>Accept
#    with min(1, p/q), else resample from norm(max(0, p − q)): P(emit y) = min(p, q) + max(0, p − q) = p(y), for
#    any q; by induction over positions the whole output is the target's sampling.</details>
# 2. *What goes wrong without the residual resample?* <details><summary>answer</summary>Resampling from p after a
#    rejection emits y with probability min(p, q) + (1 − β)·p(y), β = Σ min(p, q), not p(y): p pays out again
#    what acceptance already gave, so a token the draft likes (q ≥ p) gets (2 − β)·p(y): section 2's "skip
#    residual" row.</details>
# 3. *Why do tree drafts help, and what does the attention mask do?* <details><summary>answer</summary>Several
#    alternatives per position in one pass; each node sees only its root path, so it is scored as if its path were
#    the only continuation (siblings share a position id).</details>
#
# **When does speculative decoding stop paying?** Answer with the measured numbers:

# %%
# NBVAL_CHECK_OUTPUT
best = max(methods, key=lambda m: table[(m, 1)]["speedup"])
r1 = table[(best, 1)]
print(f"best at batch 1: {best}, {r1['speedup']:.2f}x with {r1['mean_acceptance_length']:.2f} tokens per verify step")
for b in batches[1:]:
    winners = [m for m in methods if table[(m, b)]["speedup"] > 1]
    print(f"batch {b:3d}: best speculative {max(table[(m, b)]['speedup'] for m in methods):.2f}x of plain; "
          f"methods that pay: {winners or 'none'}")
weights_ms = 135e6 * 2 / H200.bandwidth * 1e3  # SmolLM2's bf16 weights, read once
for b in batches:
    print(f"plain step at batch {b:3d}: {b / table[('plain', b)]['tokens_per_s'] * 1e3:5.2f} ms; "
          f"reading the weights takes {weights_ms:.3f} ms")

# %% [markdown]
# It stops paying when **the verify step stops being free** or **too little is accepted**.
# * *The step is not memory-bound any more.* For Llama-3-8B, section 1's roofline puts that where `batch x (k + 1)`
#   reaches the critical batch (about 33 sequences at k = 4). The bundled 135M model on an H200 is never
#   memory-bound at all: a plain step takes milliseconds while its weights stream in 0.06 ms; it is bound by
#   per-step overheads. Speculation adds its own per-sequence work (proposing, verifying, rolling back, longer
#   query rows), which grows with the batch while plain decoding replays one CUDA graph: at batch 8 and above every
#   method runs below plain throughput. Even at batch 1 the ceiling is low: a step here is ~280 kernels of a few
#   microseconds, so a 6-row verify step costs 0.78 ms of GPU time against a plain step's 0.67, and drafting is
#   kernels too (EAGLE's five draft steps 0.41 ms, the tree search about a full step). Divide tokens per step by
#   GPU time per step and, with the host costing nothing at all, n-gram tops out near 1.8x on these prompts and
#   EAGLE-2's tree near 1.2x (`spec_host_model_h200_s11.json`): on a 135M model the 2-3x of the papers is out of
#   reach; on a 7B+ model, whose step is bound by reading weights, it is not.
# * *The draft is too expensive for its acceptance.* EAGLE's head is one layer, but it drafts k tokens one after
#   another, each a pass through that layer and the 49152-word LM head: a chain verify step costs about twice a
#   plain one here, so 1.78 tokens per step do not pay; its trees accept more (2.74 with 63 nodes) and cost more
#   again. Training pays back directly: the same head trained three times longer (the shipped one now) accepts
#   2.01 as a chain and 2.98 as a 63-node tree on these prompts, and its chain beats plain decoding at batch 1
#   (1.08x; `speculative_p7_newhead_s10_h200.json`). The tree's shape is a search: EAGLE-2 expands the most
#   probable nodes of each depth, keeps each one's top-k children, and verifies the 63 most probable candidates.
#   A wider search (`speculative_config["tree_search_width"]`) only adds candidates: on these prompts on a CPU,
#   widths 8 / 10 / 16 accept 2.75 / 2.79 / 2.88 (`speculative_tree_widths_cpu_s10.json`); on the H200 width 16
#   (the default) accepts 3.06 against 2.91, and its wider search costs a few percent of speed
#   (`speculative_p7_widths_s11_h200.json`). (An earlier run, `speculative_h200.json`: a draft of 24 of the 30
#   layers, 0.68x even at batch 1.)
# * *Nothing repeats.* Prompt lookup is free but proposes only what already occurred: 1.40 tokens per step on chat
#   against 2.27 on code and 2.34 on summaries (the JSON's `acceptance_length_by_kind`). Read such figures with
#   care: the accepted length counts only the steps that carried drafts. Requiring a longer match (prompt_lookup_min
#   2 instead of 1) lifts it from 2.05 to 3.35 on these prompts, yet tokens per step, drafting or not, go from 1.53
#   to 1.46 (CPU, benchmarks/RESULTS.md): fewer, better drafts, the same speed.
#
# This is why vLLM switches speculation off above a batch size (`disable_by_batch_size`). One caution on the
# numbers: each is a single run, and plain decoding itself measured 949 and 999 tok/s in two runs the same hour:
# differences of a few percent between methods are noise.
#
# Later runs sharpen both caveats (benchmarks/RESULTS.md, twenty-first session). As plain decoding got faster
# (graphs that sample, programmatic dependent launch, a decode GEMV tiled for a 135M model's small matrices:
# 1,274 -> 1,500 tok/s), every speedup fell: n-gram measured 0.71x, 0.88x and 0.95x in three runs of the same
# code on the same machine, while plain decoding moved by 1%. A speculative step cannot overlap its host work
# with the GPU the way a plain step does (what step N + 1 verifies depends on what step N accepted), so the
# host's speed, which varies from process to process, lands in the result. And a profile of the kernels shows
# where a 6-row verify step's extra GPU time goes: the linear layers, 373 -> 600 us a step, because at 6 rows a
# small matrix is multiplied on tensor cores padded to 16 rows (~3-4 us a call) where one row takes a 1.5-2 us
# CUDA-core pass. The verify step is "almost free" only where reading the weights dominates, which is exactly
# what a 135M model never does. The twenty-second session repeated the lesson: running each RMSNorm inside the
# next GEMV made plain decoding 1,505 -> 1,867 tok/s (one launch fewer per norm, at 1 and 2 rows only: at 6 rows
# the fused kernel timed slower and the engine keeps them apart), and n-gram fell from 0.99x to 0.74x.
#
# The switch itself must cost nothing, and at first it did not: a speculative engine ran *every* step in sync, so
# with speculation off at batch 8 it still paid the host round trip that async scheduling hides for plain decoding
# (0.74x of plain at batch 8, 0.55-0.63x at 32). Now the steps over the limit run async like any plain engine's,
# and the engine drains the step in flight before it speculates again: 1.03-1.06x at batch 8, 0.93-0.95x at 32
# (benchmarks/RESULTS.md, twenty-third session). Set `disable_by_batch_size` (off by default, as in vLLM).
# The same idea serves prompt lookup at batch 1: about half its steps find no match and carry no draft, so the
# proposer predicts them (one token behind while a step is in flight) and they run async too. Replayed offline
# on these prompts with the H200's step times (`benchmarks/replay_ngram_async.py`), that turns n-gram's 0.85x
# into 0.99x, and 1.12x with `prompt_lookup_min=2` (fewer, better drafts now pay: the steps between them are as
# cheap as plain decoding's). The engine then measured it on the H200 (twenty-fifth session, plain 1,882 tok/s):
# 0.96x / **1.09x** / 1.09x at prompt_lookup_min 1 / 2 / 3, against 0.83x / 0.90x / 0.92x with every step in sync,
# the first speculative row above 1x on this model. So the engine's default is now `prompt_lookup_min=2`.
# One more step of the same idea was tried and measured: launch the verify step without waiting for the token in
# flight, drafting one token behind (the earlier occurrence's next token is the guess for the token in flight, the
# drafts are the tokens after it). It stays exact (a wrong guess only gets the drafts rejected), but it was no
# faster on the H200 (1.04x / 1.07x against 1.05x / 1.10x at `prompt_lookup_min` 2 / 3, same run): a wrong guess
# turns a whole verify step into one token, which is what the wait had been buying. The engine waits.
#
# Past batch 1 the same host round trip is the whole story. With 16 sequences nearly every step carries some
# draft, so nearly every step runs in sync. On an H100 (thirty-fifth session, `bench_spec_host.py --batch 16`,
# the bundled model, n-gram) a verify step kept the GPU busy 0.84 ms against a plain step's 0.90: its 96 rows
# cost a 135M model nothing extra. Yet the step took 2.35 ms against 1.14, because the GPU idled 1.5 ms while the
# host ran the output loop for 16 sequences (0.86 ms) and prepared the next launch. Plain decoding hides exactly
# that work behind the GPU. Measure where the time goes before you blame the verify step.
#
# **What to remember**
# * decode leaves compute idle; k + 1 query rows cost about one row while the step is memory-bound;
# * accept with min(1, p/q), resample from norm(max(0, p − q)), bonus token after a full accept: exact sampling;
# * greedy = accept while the draft equals the argmax; deterministic drafts = match the target's own samples;
# * drafts: n-grams (free, need repetition), draft models (cheap only if small), heads and trees (trained);
# * it pays at small batch and high acceptance; measure it, and switch it off for big batches;
# * a step that verifies nothing is a plain step: run it async, so that speculation costs nothing where it is off.
