"""The pieces of a sparse mixture-of-experts layer that do not depend on where the experts live (chapter 11).

A Mixtral MLP is E SwiGLU experts and a router. For each token the router scores every expert
(a linear layer hidden -> E), a softmax turns the scores into probabilities, the top k experts are kept and
their k probabilities renormalised to sum to 1; the token's output is the weighted sum of those k experts'
outputs. Only k of the E experts run per token: Mixtral-8x7B holds 47B parameters but spends about 13B per token.

    route_topk(router_logits, k)       -> (weights [T, k], expert_ids [T, k])     which experts, how much each
    route(router_logits, k, renorm)    route_topk as the model calls it (Qwen3-MoE may keep the raw probabilities)
    run_experts(rows, expert_of_row)   every expert on the rows routed to it (one gather and two matmuls each)
    combine_expert_outputs(out, w)     the weighted sum over each token's k experts

A "row" is one (token, expert) assignment: a token routed to k experts is k rows. Rows are handled in a fixed
priority order (token-major: token 0's k rows, then token 1's, ...), which matters only with a capacity:
`expert_capacity` is Switch Transformer's and GShard's cap on the rows one expert takes in a step,
ceil(capacity_factor * tokens * k / E); rows beyond it are dropped (their output is zero, so the token keeps only
the residual stream for that expert's share). Without a capacity (the default) nothing is dropped and the layer
is exactly Mixtral's. `ExpertLoad` counts the rows each expert received, for the load-balance statistics.

Where the experts run (this process, or other ranks reached by all-to-all) is minillm.parallel.expert's business.
`route_topk` is a course exercise (ch11.moe_route): `route`, which both callers use, reaches it through `dispatch`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from minillm.hooks import dispatch


# >>> exercise ch11.moe_route
def route_topk(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router: softmax over the E experts (in fp32), keep the top_k, renormalise their weights to sum
    to 1. router_logits [T, E] -> (weights [T, top_k] float32, expert_ids [T, top_k] int64), best expert first.

    Example: logits [[2.0, 0.0, 1.0]] (probabilities 0.665, 0.090, 0.245), top_k 2 -> weights [[0.731, 0.269]],
    expert_ids [[0, 2]]. Renormalised, the weights equal a softmax over the k kept logits alone.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [num_tokens, num_experts], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}] (the number of experts), got {top_k!r}")
    # >>> solution
    probs = F.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    # the others' mass is redistributed over the kept experts in proportion: each token's weights sum to 1
    return weights / weights.sum(dim=-1, keepdim=True), expert_ids
    # <<< solution
# <<< exercise


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The router as a model layer calls it: route_topk (through `dispatch`, so a learner's version runs), and with
    renormalize=False (Qwen3-MoE's norm_topk_prob false) the k experts' softmax probabilities as they are, the
    renormalised weights times the mass the k kept: with logits [[2.0, 0.0, 1.0]] and k 2, [[0.665, 0.245]]."""
    weights, expert_ids = dispatch("ch11.moe_route", route_topk)(router_logits, top_k)
    if not renormalize:
        kept = F.softmax(router_logits.float(), dim=-1).gather(-1, expert_ids).sum(dim=-1, keepdim=True)
        weights = weights * kept
    return weights, expert_ids


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Rows one expert may take in a step: ceil(factor * tokens * top_k / experts); None (no cap) without a factor.
    With factor 1 a perfectly balanced router fills every expert exactly; an imbalanced one drops rows."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def run_experts(rows: torch.Tensor, expert_of_row: torch.Tensor,
                experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each expert on its rows. rows [M, hidden]; expert_of_row [M] in 0 .. len(experts) - 1.
    Returns (out [M, hidden], rows routed to each expert [len(experts)] int64, rows dropped by the capacity).
    Within an expert, rows keep their order in `rows` (a stable sort), so the capacity keeps the first ones."""
    counts = torch.bincount(expert_of_row, minlength=len(experts))
    order = torch.argsort(expert_of_row, stable=True)  # rows grouped by expert: one matmul per expert
    out = torch.zeros_like(rows)
    start, dropped = 0, 0
    for expert, count in zip(experts, counts.tolist()):  # one host sync for all the counts
        kept = count if capacity is None else min(count, capacity)
        if kept:
            index = order[start:start + kept]
            out[index] = expert(rows[index])
        dropped += count - kept
        start += count
    return out, counts, dropped


def combine_expert_outputs(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out [T * k, hidden] (token-major rows) and weights [T, k] -> [T, hidden]: sum_j weights[t, j] * out[t, j],
    accumulated in fp32 (the router's weights are fp32) and returned in the activations' dtype."""
    num_tokens, top_k = weights.shape
    mixed = out.view(num_tokens, top_k, out.shape[-1]).float() * weights.unsqueeze(-1)
    return mixed.sum(dim=1).to(out.dtype)


@dataclass
class ExpertLoad:
    """Rows routed to the experts this process holds (first_expert .. first_expert + n - 1), before any drop:
    the last forward's and the running total since the last reset, and the rows the capacity dropped."""

    first_expert: int
    num_experts: int
    last: torch.Tensor = field(init=False)
    total: torch.Tensor = field(init=False)
    last_dropped: int = 0
    total_dropped: int = 0

    def __post_init__(self) -> None:
        self.last = torch.zeros(self.num_experts, dtype=torch.int64)
        self.total = torch.zeros(self.num_experts, dtype=torch.int64)

    def record(self, counts: torch.Tensor, dropped: int) -> None:
        """Count a forward's rows per expert. The counts stay on their device (a GPU's, from the fused path: no
        sync per layer) in two buffers updated in place, so a CUDA graph that recorded this call keeps them
        current at every replay; they are read, and copied, only when someone asks (minillm.parallel.expert)."""
        counts = counts.detach()
        if self.total.device != counts.device:  # the first forward on this device: the buffers move there once
            self.last, self.total = self.last.to(counts.device), self.total.to(counts.device)
        self.last.copy_(counts)
        self.total += counts
        self.last_dropped = dropped
        self.total_dropped += dropped

    def reset(self) -> None:
        self.last.zero_()  # in place: a captured graph writes into these very buffers
        self.total.zero_()
        self.last_dropped = self.total_dropped = 0
