"""EAGLE's drafting chain run over whole rows at once, for training and for measuring it (chapter 9).

In the engine EAGLE drafts k tokens from a context ending at position p: step 1 reads the target's features
f_{<=p} and the token x_{p+1} and gives g_p (~ f_{p+1}, which picks draft 1); step j + 1 feeds the head its *own*
g from step j and the token it drafted, attending to the window of real positions (p - window, p] plus the draft
positions p + 1 .. p + j of its own chain. Training only on the target's features (teacher forcing) never shows
the head its own, slightly wrong, features: acceptance falls off fast after the first draft.

"Training-time test" (EAGLE-3, Li et al. 2025; HASS, Zhang et al. 2024) runs that chain during training, for every
start position of a row at once. Pass 0 is the teacher-forced pass. Pass j (j >= 1) at position t is draft step
j + 1 of the chain that started at p = t - j: its input is fc([g^{j-1}_{t-1}; embed(x_{t+1})]) (the previous
pass's output one position back, the real next token) and its query attends to

    pass 0's keys at positions (p - window, p]        the real context the proposer's window holds
    pass i's key at position p + i, for i = 1 .. j     the chain's own earlier drafts (the last one is itself)

a mask over the concatenated keys of passes 0..j, a causal band on pass 0 and one diagonal per later pass
(`chain_mask`), and, where a row packs several documents, only keys of the document the chain started in. Every
chain is then computed exactly as the proposer computes it, with the real token where the proposer feeds its
draft: the same thing whenever the drafts so far were right, the only case in which the later drafts count.

`held_out_acceptance` uses this to read the engine's greedy mean accepted length off held-out *requests* without
an engine: train_data holds prompts out before generation and has the target answer them greedily, so every start
of an answer is one the greedy engine drafts from, and walking the starts as the engine's verify steps do
(`walk_steps`) gives the engine's own unit: on the P7 texts the simulator's walk and the engine agree
(benchmarks/eagle_acceptance_probe.py). `held_out_top1` is the teacher-forced top-1 agreement on the same answers.

The older estimates, for rows built by hand: `simulated_acceptance` reads the engine's greedy mean accepted length
off held-out rows of sampled and greedy text: the chain's drafts against the target's own greedy tokens (argmax
of p, not the data's tokens, which are sampled in some rows), at start positions where the data's next tokens are
the greedy ones (where they are not, the target's later distributions in the data are conditioned on a token
greedy decoding would not have chosen),
averaged over start positions. Two caveats, both optimistic (issue 11: 3.07 simulated, 1.62 in the engine, where
benchmarks/eagle_acceptance_probe.py found the engine drafting exactly what this chain drafts): the scorable starts
of sampled text are its predictable stretches, and the engine averages over its verify steps, each starting where
the last one ended, which skips starts inside long accepted runs (`walk_steps`). `greedy_continued_acceptance`
removes the first (the target continues greedily from each chosen start); `walked_accepted_length` the second.
`top1_agreement` is the older teacher-forced number, one per head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.layers.norm import rms_norm
from minillm.layers.rotary import apply_rotary
from minillm.speculative.head_proposer import DEFAULT_WINDOW
from minillm.speculative.heads import TargetParts

ACCEPTANCE_DRAFTS = 5  # k of the simulated chain: the engine's usual num_speculative_tokens for EAGLE


def mixed_precision(device: torch.device):
    """bf16 autocast on CUDA (fp32 master weights, the target's bf16 matrices), plain fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def chain_mask(length: int, depth: int, window: int, device: torch.device) -> torch.Tensor:
    """Which keys pass `depth` attends to: bool [T, (depth + 1) * T] over the keys of passes 0..depth side by side.
    Query t belongs to the chain that started at p = t - depth (see the module docstring)."""
    t = torch.arange(length, device=device)[:, None]
    s = torch.arange(length, device=device)[None, :]
    start = t - depth
    blocks = [(s <= start) & (s > start - window)] + [s == start + i for i in range(1, depth + 1)]
    return torch.cat(blocks, dim=1)


def _block_pass(block: nn.Module, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                cache: list[tuple[torch.Tensor, torch.Tensor]], depth: int, window: int,
                segments: torch.Tensor | None = None) -> torch.Tensor:
    """DraftBlock's computation for pass `depth`, attending as `chain_mask` says; appends this pass's K/V to
    `cache`. Pass 0 without a window limit is plain causal attention (SDPA's is_causal: its fused kernels); the
    other passes use an additive float mask shared by every head (the memory-efficient kernel on CUDA), one per row
    when `segments` [B, T] (document ids) keeps a chain's attention inside the document it started in."""
    b, t, _ = x.shape
    h, kv, hd = block.num_heads, block.num_kv_heads, block.head_dim
    cos, sin = rotary
    y = rms_norm(x, block.input_norm, block.eps)
    q = apply_rotary(block.q_proj(y).view(b, t, h, hd), cos, sin).transpose(1, 2)
    k = apply_rotary(block.k_proj(y).view(b, t, kv, hd), cos, sin).transpose(1, 2)
    v = block.v_proj(y).view(b, t, kv, hd).transpose(1, 2)
    cache.append((k, v))
    group = h // kv
    keys = torch.cat([c[0] for c in cache], dim=2).repeat_interleave(group, 1)
    values = torch.cat([c[1] for c in cache], dim=2).repeat_interleave(group, 1)
    if depth == 0 and window >= t and segments is None:
        attn = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=hd ** -0.5)
    else:
        allowed = chain_mask(t, depth, window, x.device)
        if segments is not None:  # query t's chain started at t - depth; a key at s belongs to segments[s]
            # (never an empty row: the chain's start, or position 0 for t < depth, is a key of its document)
            start = segments[:, (torch.arange(t, device=x.device) - depth).clamp(min=0)]
            allowed = (allowed & (start[:, :, None] == segments.repeat(1, depth + 1)[:, None, :]))[:, None]
        columns = -(-allowed.shape[-1] // 16) * 16  # rows 16-aligned in memory, as the fused kernels want
        bias = torch.full((*allowed.shape[:-1], columns), float("-inf"), dtype=q.dtype,
                          device=x.device)[..., :allowed.shape[-1]]
        bias.masked_fill_(allowed, 0.0)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=hd ** -0.5)
    x = x + block.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
    y = rms_norm(x, block.post_attention_norm, block.eps)
    return x + block.down_proj(F.silu(block.gate_proj(y)) * block.up_proj(y))


def unrolled_chain(head: nn.Module, features: torch.Tensor, token_embeds: torch.Tensor, depth: int, window: int,
                   detach: bool = False, segments: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[g^0, ..., g^{depth-1}], each [B, T, d]: pass j at position t is draft j + 1 of the chain started at t - j
    (valid for t >= j). features [B, T, d]: f_0..f_{T-1}; token_embeds [B, T, d]: embed(x_1..x_T); segments
    [B, T] (optional): the document of each position, for rows that pack several (a chain sees its own only).
    `detach`: feed pass j the previous pass's g without its gradient (the default keeps it: the loss of a later
    draft then also teaches the earlier step to produce features the next step can use, which is what drafting
    needs; detaching makes every pass an independent regression on its own inputs)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if features.shape != token_embeds.shape:
        raise ValueError(f"features {tuple(features.shape)} and token_embeds {tuple(token_embeds.shape)} disagree")
    block = head.layer
    length = features.shape[1]
    cos, sin = block.rope.tables(length, features.device)  # the block's own kept tables
    rotary = (cos[:length], sin[:length])  # positions 0..T-1: RoPE sees only distances, as the window's do
    cache: list[tuple[torch.Tensor, torch.Tensor]] = []
    outputs: list[torch.Tensor] = []
    inputs = features
    for j in range(depth):
        if j:  # position t reads g^{j-1}_{t-1}; position 0 has none (its chain would start before the row)
            previous = outputs[-1].detach() if detach else outputs[-1]
            inputs = F.pad(previous[:, :-1], (0, 0, 1, 0))
        x = head.fc(torch.cat([inputs, token_embeds], dim=-1))
        outputs.append(_block_pass(block, x, rotary, cache, j, window, segments))
    return outputs


@torch.no_grad()
def accepted_lengths(head: nn.Module, target: TargetParts, tokens: torch.Tensor, features: torch.Tensor,
                     num_drafts: int, window: int) -> torch.Tensor:
    """int64 [B, L - num_drafts]: at start position p (context f_{<=p}, token x_{p+1}), 1 + the number of
    leading greedy drafts that equal the target's greedy tokens (the bonus token counted, as the engine counts
    tokens per verify step); -1 where the data's next num_drafts - 1 tokens are not the target's greedy ones."""
    k = num_drafts
    if tokens.shape[1] <= k:
        raise ValueError(f"rows of {tokens.shape[1]} tokens hold no chain of {k} drafts (need > {k})")
    passes = unrolled_chain(head, features[:, :-1], target.embed(tokens[:, 1:]), k, window)
    drafted = [target.logits(target.final_norm(g)).argmax(-1) for g in passes]  # [B, T] each
    greedy = target.logits(target.final_norm(features[:, 1:])).argmax(-1)  # [B, T]: the greedy token t + 2
    starts = greedy.shape[1] - k + 1
    hits = torch.stack([drafted[j][:, j:j + starts] == greedy[:, j:j + starts] for j in range(k)], dim=-1)
    leading = hits.long().cumprod(-1).sum(-1)
    follows = tokens[:, 2:] == greedy[:, :-1]  # x_{t+2} is the target's greedy choice
    eligible = torch.ones_like(leading, dtype=torch.bool)
    for j in range(k - 1):
        eligible &= follows[:, j:j + starts]
    return torch.where(eligible, 1 + leading, torch.full_like(leading, -1))


def walk_steps(lengths: torch.Tensor) -> list[int]:
    """The engine's verify steps over per-start accepted lengths [B, S] (-1: not scorable): along each row, a step
    at start p takes lengths[p] tokens and the next one starts at p + lengths[p]; an unscorable start is passed
    over (p + 1). The engine's mean accepted length is the mean of these steps, not of every start: it skips
    the starts inside a long accepted run and visits every start of a hard stretch, so the mean over starts
    overstates it (on a greedy P7 chat text of 128 tokens: 2.23 over starts, 1.88 walked, 1.88 in the engine)."""
    steps = []
    for row in lengths.tolist():
        p = 0
        while p < len(row):
            if row[p] > 0:
                steps.append(row[p])
            p += max(row[p], 1)
    return steps


def _summary(lengths: torch.Tensor, num_drafts: int, walk: bool) -> dict[str, float | int | list[float] | None]:
    """The numbers of per-start accepted lengths [B, S] (1 + leading accepted drafts; -1: not scorable);
    `walk`: the starts of a row are consecutive positions, so walk_steps applies (walked_accepted_length)."""
    scored = lengths[lengths > 0]
    reached = [int((scored >= i).sum()) for i in range(1, num_drafts + 1)]  # drafts 1..i-1 accepted
    accepted = [int((scored >= i + 1).sum()) for i in range(1, num_drafts + 1)]
    steps = walk_steps(lengths) if walk else []
    return {"num_drafts": num_drafts, "positions": int(scored.numel()),
            "eligible_fraction": float(scored.numel() / max(lengths.numel(), 1)),
            "mean_accepted_length": float(scored.float().mean()) if scored.numel() else None,
            "walked_accepted_length": sum(steps) / len(steps) if steps else None,
            "per_step_acceptance": [a / r if r else None for a, r in zip(accepted, reached)]}


@torch.no_grad()
def simulated_acceptance(head: nn.Module, target: TargetParts, tokens: torch.Tensor, features: torch.Tensor,
                         num_drafts: int = ACCEPTANCE_DRAFTS, window: int = DEFAULT_WINDOW, rows_per_batch: int = 8
                         ) -> dict[str, float | int | list[float] | None]:
    """The greedy engine's mean accepted length (tokens per verify step, bonus included) for a chain of
    `num_drafts`, simulated on these rows; per_step_acceptance[i]: how often draft i + 1 is accepted when
    drafts 1..i were (None where no chain got that far); eligible_fraction: the share of start positions the
    data let us score; walked_accepted_length: the engine's unit (walk_steps) over the scorable starts. Caveats:
    on sampled or human text the scorable starts are those where the data happens to follow greedy decoding for
    num_drafts - 1 tokens: the predictable ones, so a small eligible_fraction means an optimistic number
    (greedy_continued_acceptance scores unbiased starts); and the mean over starts is above the engine's
    per-step mean (walk_steps says why)."""
    lengths = []
    for start in range(0, tokens.shape[0], rows_per_batch):
        with mixed_precision(features.device):
            lengths.append(accepted_lengths(head, target, tokens[start:start + rows_per_batch].to(features.device),
                                            features[start:start + rows_per_batch].float(), num_drafts, window))
    return _summary(torch.cat(lengths), num_drafts, walk=True)


@torch.no_grad()
def greedy_continued_acceptance(head: nn.Module, target_model: nn.Module, tokens: torch.Tensor,
                                num_drafts: int = ACCEPTANCE_DRAFTS, window: int = DEFAULT_WINDOW,
                                starts_per_row: int = 8) -> dict[str, float | int | list[float] | None]:
    """simulated_acceptance without the scorable-position bias: at `starts_per_row` start positions p per row,
    spread evenly, the row's own context x_{<=p+1} is continued by the *target* greedily for num_drafts tokens
    (num_drafts cache-less prefills), its features recorded on that (one more), and the chain scored at p.
    Every chosen start is scored: what the engine's greedy run would see there, whatever the data did next.
    eligible_fraction < 1 only where a near-tie's argmax flips between the incremental and the final prefill
    (bf16). Costs (num_drafts + 1) * starts_per_row prefills of the rows: a subset of positions, not all."""
    from minillm.speculative.train_data import record_features
    if isinstance(starts_per_row, bool) or not isinstance(starts_per_row, int) or starts_per_row < 1:
        raise ValueError(f"starts_per_row must be an integer >= 1, got {starts_per_row!r}")
    if tokens.shape[1] < 2:
        raise ValueError(f"rows of {tokens.shape[1]} tokens hold no start position (need >= 2)")
    target = TargetParts(target_model)
    device = target.lm_head_weight.device
    starts = torch.linspace(0, tokens.shape[1] - 2, starts_per_row + 1)[1:].round().long().unique().tolist()
    lengths = []
    for p in starts:
        rows = tokens[:, :p + 2].to(device)
        for _ in range(num_drafts):  # the target's own greedy continuation of x_{<=p+1}
            last = record_features(target_model, rows, device, progress=False)[:, -1]
            rows = torch.cat([rows, target.logits(target.final_norm(last)).argmax(-1, keepdim=True)], dim=1)
        features = record_features(target_model, rows, device, progress=False).float()
        with mixed_precision(device):
            lengths.append(accepted_lengths(head, target, rows, features, num_drafts, window)[:, p, None])
    return _summary(torch.cat(lengths, dim=1), num_drafts, walk=False)  # starts far apart: no walk


@torch.no_grad()
def top1_agreement(loss, heads: nn.Module, tokens: torch.Tensor, features: torch.Tensor,
                   rows_per_batch: int = 8) -> list[float]:
    """Per head / module (`loss`: a train_heads.HeadLoss): how often its argmax is the target's argmax on these
    rows, every input taken from the target's own sequence (teacher forcing). For head 1 this is the greedy
    acceptance rate of the first draft; for later heads an upper bound (in the engine they read drafts, and a
    draft is only kept after accepted ones)."""
    hits: list[float] = []
    counts: list[int] = []
    for start in range(0, tokens.shape[0], rows_per_batch):
        with mixed_precision(features.device):
            pairs, _ = loss.predictions(heads, tokens[start:start + rows_per_batch],
                                        features[start:start + rows_per_batch].float())
        if not hits:
            hits, counts = [0.0] * len(pairs), [0] * len(pairs)
        for k, (q, p) in enumerate(pairs):
            hits[k] += float((q.argmax(-1) == p.argmax(-1)).sum())
            counts[k] += p.shape[0] * p.shape[1]
    return [h / max(c, 1) for h, c in zip(hits, counts)]


def _answer_starts(held, lengths: torch.Tensor, first: int, num_drafts: int) -> tuple[torch.Tensor, int]:
    """(lengths [B, S] of held-out documents first .. first + B - 1 with -1 outside each one's answer, the number
    of answer starts): a start p counts from prompt length - 1 (the engine's first proposal: the context is the
    prompt, x_{p+1} its first answer token) to document length - 1 - num_drafts (every draft inside the document)."""
    p = torch.arange(lengths.shape[1], device=lengths.device)[None]
    prompt = held.prompt_lengths[first:first + lengths.shape[0], None].to(lengths.device)
    end = held.lengths[first:first + lengths.shape[0], None].to(lengths.device) - num_drafts
    inside = (p >= prompt - 1) & (p < end)
    return torch.where(inside, lengths, torch.full_like(lengths, -1)), int(inside.sum())


@torch.no_grad()
def held_out_acceptance(head: nn.Module, target: TargetParts, held, num_drafts: int = ACCEPTANCE_DRAFTS,
                        window: int = DEFAULT_WINDOW, docs_per_batch: int = 8, max_docs: int | None = None
                        ) -> dict[str, float | int | list[float] | None]:
    """The greedy engine's mean accepted length on held-out requests, without its engine: every held-out document
    (train_data.HeldOut: prompts never trained on, answered greedily by the target) is drafted from every start
    of its answer by the chain of `num_drafts` on the head's own features (accepted_lengths), and the starts are
    walked as the engine's verify steps walk them (walk_steps: walked_accepted_length, the engine's unit; on greedy
    text the simulator's walk equals the engine's number, eagle_acceptance_probe.py). eligible_fraction: the share
    of answer starts scored, < 1 only where a bf16 near-tie's argmax differs between the engine's decode and the
    recording prefill (that start, and those before it whose drafts reach it, are passed over).
    first_draft_acceptance: the share of starts whose first draft is the target's token (top-1 agreement at the
    positions a greedy engine drafts from)."""
    count = held.tokens.shape[0] if max_docs is None else min(max_docs, held.tokens.shape[0])
    device = target.lm_head_weight.device
    lengths, starts = [], 0
    for first in range(0, count, docs_per_batch):
        last = min(first + docs_per_batch, count)
        longest = int(held.lengths[first:last].max())
        if longest <= num_drafts + 1:
            continue
        tokens = held.tokens[first:last, :longest].to(device)
        with mixed_precision(device):
            found = accepted_lengths(head, target, tokens, held.features[first:last, :longest].to(device).float(),
                                     num_drafts, window)
        found, inside = _answer_starts(held, found, first, num_drafts)
        starts += inside
        lengths.append(F.pad(found, (0, held.tokens.shape[1] - found.shape[1]), value=-1))
    if not lengths:
        raise ValueError(f"no held-out document is longer than {num_drafts + 1} tokens: nothing to draft")
    summary = _summary(torch.cat(lengths), num_drafts, walk=True)
    summary.update(documents=count, eligible_fraction=summary["positions"] / max(starts, 1))
    summary["first_draft_acceptance"] = summary["per_step_acceptance"][0]
    return summary


@torch.no_grad()
def held_out_top1(loss, heads: nn.Module, held, max_docs: int = 64) -> list[float]:
    """Per head / module (`loss`: a train_heads.HeadLoss): how often its teacher-forced argmax is the target's, over
    the answer positions (from prompt length - 1) of held-out documents. For EAGLE's head and Medusa's head 1 this
    is the first draft's greedy acceptance; later heads read the target's tokens here, drafts in the engine."""
    hits: list[float] = []
    counts: list[int] = []
    for i in range(min(max_docs, held.tokens.shape[0])):
        n, start = int(held.lengths[i]), int(held.prompt_lengths[i]) - 1
        with mixed_precision(held.features.device):
            pairs, _ = loss.predictions(heads, held.tokens[i:i + 1, :n].to(held.features.device),
                                        held.features[i:i + 1, :n].float())
        if not hits:
            hits, counts = [0.0] * len(pairs), [0] * len(pairs)
        for k, (q, p) in enumerate(pairs):
            hits[k] += float((q[:, start:].argmax(-1) == p[:, start:].argmax(-1)).sum())
            counts[k] += max(0, q.shape[1] - start)
    return [h / max(c, 1) for h, c in zip(hits, counts)]
