"""Pipeline parallelism: the decoder's layers cut into stages, one stage per rank (chapter 11).

Stage s holds layers get_pp_indices(L, s, pp)[0] .. [1] - 1; the first stage also holds the embedding, the last
the final norm and the LM head (and the embedding too when they are tied). What a stage does not hold is a
`PPMissingLayer`: the model keeps its shape (layer i is still `model.layers[i]`, checkpoint names still map),
the missing pieces have no parameters and are skipped by the loader. Between stages travel the activations
(hidden states and the residual stream, [T, hidden] each) with point-to-point send/recv.

A pipeline of one batch is a relay: while stage 2 works, stage 1 waits. To keep stages busy the step's batch is
cut into micro-batches (minillm.parallel.runner.split_step) that follow each other through the stages: stage 1 works on micro-batch 2
while stage 2 works on micro-batch 1 (GPipe's forward schedule, one step at a time; see ParallelModelRunner).
Sends are asynchronous, so a stage never waits for the next one to be ready before starting its next micro-batch.

vLLM does it differently: it runs pp_size "virtual engines", each with its own scheduler and its own share of the
requests, and keeps one step of each in flight, so stage 1 runs step t+1 of virtual engine B while stage 2 runs
step t of engine A. That overlaps across engine steps (decode steps too, where our micro-batches are one token
each) at the cost of more schedulers and asynchronous output handling. Ours keeps one scheduler and the
engine's synchronous step; the overlap is inside each step, and its bubble is (pp - 1) / (M + pp - 1) of it.
"""
from __future__ import annotations

from torch import nn


def get_pp_indices(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """[start, end) of the layers on stage `pp_rank`: as even as possible, the first stages take the extra ones."""
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size ({pp_size}) exceeds the model's {num_layers} layers: "
                         f"every stage needs at least one")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank must be in [0, {pp_size}), got {pp_rank}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (pp_rank < extra)


class PPMissingLayer(nn.Identity):
    """Stands where a layer of another pipeline stage would be: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this layer lives on another pipeline stage")


def is_pp_missing(model: nn.Module, param_name: str) -> bool:
    """Whether parameter `param_name` belongs to a module that sits on another pipeline stage."""
    module: nn.Module | None = model
    for part in param_name.split(".")[:-1]:
        module = getattr(module, part, None) if not isinstance(module, nn.ModuleList) else \
            (module[int(part)] if part.isdigit() and int(part) < len(module) else None)
        if module is None:
            return False
        if isinstance(module, PPMissingLayer):
            return True
    return False
