"""Expert parallelism: the experts of every MoE layer spread over ranks, tokens sent to them by all-to-all (chapter 11).

    LLM("mixtral-dir/", expert_parallel_size=2)    2 worker processes, each with half of every layer's experts

Placement. With E experts and N ranks, rank r holds experts [r * E/N, (r + 1) * E/N) of every MoE layer; the
attention, the norms, the router, the embedding and the LM head are replicated (each rank has them whole).
Memory is where EP pays: Mixtral-8x7B's experts are 45 of its 47B parameters.

One MoE layer on rank r, every rank holding the same T tokens (the replicated attention computed them all):

    1. take my slice          tokens [r * S, (r + 1) * S), S = ceil(T / N): each token is routed by one rank only
    2. route                  route_topk(gate(x), k): k (expert, weight) rows per token
    3. exchange counts        all-to-all of how many rows I send to each expert of each rank (and my token count,
                              so every rank knows T for the capacity): the split sizes of the next two calls
    4. dispatch               all-to-all of the rows themselves, sorted by destination  [T_r * k, hidden] out
    5. compute                each local expert on the rows it received, from every rank (capacity applied here)
    6. return                 all-to-all back, the reverse splits                       [T_r * k, hidden] back
    7. combine                sum of each token's k outputs times its router weights
    8. all-gather             every rank's slice, so every rank holds all T tokens for the next attention

Bytes per layer and rank (the comm_stats counters, each the whole buffer a rank hands over, its own chunk
included: the rows a rank sends to its own experts never leave it, about 1/N of them with a balanced router):

    all_to_all_dispatch   T_r x k x hidden x bytes          my tokens' rows, out to the experts
    all_to_all_combine    R_r x hidden x bytes              the R_r rows my experts received, back to their tokens
    all_to_all_counts     N x (E/N + 1) x 8                 the split sizes (int64)
    all_gather            S x hidden x bytes                my slice, padded to S rows

Summed over the ranks, dispatch and combine are T x k x hidden x bytes each, whatever the routing.

vLLM pairs EP with *data-parallel* attention instead (each rank serves its own requests with its own scheduler and
KV cache), so step 1's slice is simply the rank's own batch and step 8 disappears; with tensor-parallel attention
its ranks hold the same tokens, as ours do. Ours keeps one scheduler: the attention work is repeated on every rank.

Capacity (off by default, so EP=N gives the tokens one process gives): rows beyond an expert's capacity are dropped
in a fixed order, the global token order (rank 0's slice first), so one process and N drop the same rows. GShard
drops at the sender; we drop at the receiver, which knows every row its expert gets: that saves the compute but
not the bytes. `collect_load_stats` gathers every rank's tokens-per-expert counts into one table per step.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from minillm.config import ModelConfig
from minillm.layers.moe import ExpertLoad, combine_expert_outputs, expert_capacity, route, run_experts
from minillm.parallel.state import expert_all_gather, expert_all_to_all, get_parallel_state


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """[first, end) of the experts on EP rank `ep_rank`: equal contiguous blocks."""
    if ep_size < 1 or num_experts % ep_size:
        raise ValueError(f"expert parallelism needs num_local_experts ({num_experts}) divisible by "
                         f"expert_parallel_size ({ep_size})")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank must be in [0, {ep_size}), got {ep_rank}")
    per_rank = num_experts // ep_size
    return ep_rank * per_rank, (ep_rank + 1) * per_rank


def check_expert_parallel_config(model_config: ModelConfig, expert_parallel_size: int) -> None:
    """Raise ValueError, before any process starts, when the model cannot be split into that many expert ranks."""
    if expert_parallel_size == 1:
        return
    if not model_config.num_local_experts:
        raise ValueError(f"expert_parallel_size={expert_parallel_size} needs a mixture-of-experts model; "
                         f"{model_config.architecture!r} has no experts")
    expert_range(model_config.num_local_experts, expert_parallel_size, 0)


def token_slice(num_tokens: int, ep_size: int, ep_rank: int) -> tuple[int, int, int]:
    """(first, end, rows_per_rank) of the tokens EP rank `ep_rank` routes: ceil(T / N) each, the last ones fewer."""
    per_rank = -(-num_tokens // ep_size)
    first = min(ep_rank * per_rank, num_tokens)
    return first, min(first + per_rank, num_tokens), per_rank


def expert_parallel_moe(hidden_states: torch.Tensor, gate: Callable[[torch.Tensor], torch.Tensor], top_k: int,
                        num_experts: int, local_experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                        capacity_factor: float | None, renormalize: bool = True,
                        grouped: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
                        = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The MoE layer across the EP group (steps 1-8 of the module docstring). hidden_states [T, hidden], the same
    on every rank; returns (output [T, hidden], rows routed to each local expert by every rank, rows dropped).
    `grouped` (rows [R, hidden], local expert of each row [R] -> (out [R, hidden], rows per local expert)): the
    received rows' experts in one grouped GEMM (kernels/fused_moe.py) instead of the per-expert loop; used only
    without a capacity, which is the loop's to enforce."""
    state = get_parallel_state()
    n, per_rank_experts = state.ep_size, len(local_experts)
    first, end, rows_per_rank = token_slice(hidden_states.shape[0], n, state.ep_rank)
    x = hidden_states[first:end]
    weights, expert_ids = route(gate(x), top_k, renormalize)
    flat_ids = expert_ids.reshape(-1)  # row i is token i // k's (i % k)-th choice
    order = torch.argsort(flat_ids, stable=True)  # by expert, hence by the rank that owns it
    rows_per_expert = torch.bincount(flat_ids, minlength=num_experts).view(n, per_rank_experts)
    my_tokens = torch.full((n, 1), x.shape[0], dtype=torch.int64, device=flat_ids.device)
    counts = expert_all_to_all(torch.cat([rows_per_expert, my_tokens], dim=1).flatten(), [per_rank_experts + 1] * n,
                               [per_rank_experts + 1] * n, counter="all_to_all_counts").view(n, -1).cpu()
    received_per_expert, num_tokens = counts[:, :-1], int(counts[:, -1].sum())
    send_splits, recv_splits = rows_per_expert.sum(dim=1).tolist(), received_per_expert.sum(dim=1).tolist()

    received = expert_all_to_all(x[order // top_k], recv_splits, send_splits, counter="all_to_all_dispatch")
    # received rows: by source rank, then by local expert, then in the source's token order
    local_ids = torch.arange(per_rank_experts).repeat(n).repeat_interleave(received_per_expert.flatten())
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    if grouped is not None and capacity is None:
        (out, load), dropped = grouped(received, local_ids.to(received.device)), 0
    else:
        out, load, dropped = run_experts(received, local_ids.to(received.device), local_experts, capacity)
    returned = expert_all_to_all(out, send_splits, recv_splits, counter="all_to_all_combine")
    rows_out = torch.empty_like(returned)
    rows_out[order] = returned  # back to token-major row order
    return expert_all_gather(combine_expert_outputs(rows_out, weights), rows_per_rank, hidden_states.shape[0]), \
        load, dropped


def collect_load_stats(executor: Any, reset: bool = False) -> dict[str, Any]:
    """Tokens per expert of every MoE layer, over all ranks, for the last step and in total since the last reset:
    {"last": [layers][experts], "total": ..., "dropped_last": int, "dropped_total": int, "max_over_mean": [layers]}
    (max_over_mean of the last step: 1.0 is a perfectly balanced router, E / k the worst). Works with the
    in-process executor and with the multi-process one (one collective_rpc). The totals count every forward,
    the KV-pool profiling one on CUDA included: reset before measuring a workload."""
    if hasattr(executor, "collective_rpc"):
        per_rank = executor.collective_rpc("get_moe_stats", reset)
    else:
        per_rank = [executor.driver_worker.get_moe_stats(reset)]
    if not per_rank[0]["last"]:
        raise ValueError("the model has no MoE layers: load statistics exist only for a mixture-of-experts model")
    merged: dict[str, Any] = {}
    for key in ("last", "total"):  # each rank holds its experts' columns; ranks are in expert order
        merged[key] = torch.cat([torch.tensor(r[key], dtype=torch.int64) for r in per_rank], dim=1).tolist()
    for key in ("dropped_last", "dropped_total"):  # a row is dropped by the one rank that owns its expert
        merged[key] = sum(r[key] for r in per_rank)
    last = torch.tensor(merged["last"], dtype=torch.float64)
    merged["max_over_mean"] = (last.max(dim=1).values / last.mean(dim=1).clamp(min=1e-9)).tolist()
    return merged


def model_load_stats(model: torch.nn.Module, reset: bool = False) -> dict[str, Any]:
    """This process's share of collect_load_stats: every MoE block's ExpertLoad, in layer order."""
    loads = [m.load for m in _moe_blocks(model)]
    stats = {"last": [ld.last.tolist() for ld in loads], "total": [ld.total.tolist() for ld in loads],
             "dropped_last": sum(ld.last_dropped for ld in loads),
             "dropped_total": sum(ld.total_dropped for ld in loads)}
    if reset:
        for ld in loads:
            ld.reset()
    return stats


def set_capacity_factor(model: torch.nn.Module, capacity_factor: float | None) -> None:
    """Apply EngineConfig.moe_capacity_factor to every MoE block of `model` (None: no capacity, nothing dropped)."""
    for module in _moe_blocks(model):
        module.capacity_factor = capacity_factor


def _moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE blocks of `model` (minillm.models.moe imports this module, so they are known by their ExpertLoad)."""
    return [m for m in model.modules() if isinstance(getattr(m, "load", None), ExpertLoad)]
