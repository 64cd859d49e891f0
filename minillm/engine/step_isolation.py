"""When a batched step fails, find the request that broke it: rerun the step one sequence at a time (chapter 10:
a server batches strangers' requests, and one bad request must not take the others down).

A step is one forward over every scheduled sequence, so an exception inside it (a learner's override that fails
on one shape, a kernel bug one prompt reaches) used to finish *all* of them with "error": one bad request took its
batch-mates down. Before giving up, the engine reruns the same work (the same sequences, the same token counts,
the same blocks) one sequence per forward. The ones whose forward succeeds go on; only the ones that fail alone
end in "error". A failure that is nobody's in particular (the device is gone, memory is short) fails every rerun
too and ends as before, N forwards later. Greedy requests get exactly the tokens they would have had; a sampled
one draws again, so a seeded request whose step failed after its draw gets a different (equally valid) sample.

Rerunning is safe only where the failed attempt left nothing half-done that a rerun would do twice:
* no block operations in the batch (swaps and copy-on-write copies run at the start of the forward: they may
  already have happened);
* no speculative decoding (a verify step's bookkeeping and a head's features span the batch) and no step
  in flight (async scheduling reads the step in flight first, then reruns the failed one synchronously);
* the model in this process (UniProcExecutor), or worker processes that all answered the step (the failure is a
  WorkerError: every rank came back from the collective; pipeline stages keep their messages flowing past a
  failed micro-batch, minillm.parallel.runner): a worker stuck in a collective (or dead) cannot rerun anything.
K/V written by the failed attempt is harmless: each rerun writes the same slots again before anything reads them.
Blocks the step was to fill (from the prefix cache's CPU tier, or by a swap-in) may never have been filled by a
step that fails: `forget_unfilled_blocks` keeps every prefix hash off them (tier blocks are registered when
planned, swapped-in ones would be offered when their request ends), so nobody hits stale K/V later.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.constraints import constrain_step
from minillm.engine.step_input import StepOutput, build_step_input

logger = logging.getLogger(__name__)


def can_isolate(batch: ScheduledBatch, executor: Any, speculative: Any, error: BaseException | None = None) -> bool:
    """Whether a failed `batch` may be rerun one sequence at a time (see the module docstring); `error` is what the
    step raised. Callers rerun only with no step in flight: the synchronous step has none, the async one reads its
    step in flight first."""
    from minillm.engine.executor import UniProcExecutor, WorkerError
    return (len(batch.seqs) > 1 and not batch.moves_blocks
            and speculative is None and (isinstance(executor, UniProcExecutor) or isinstance(error, WorkerError)))


def forget_unfilled_blocks(scheduler: Any, batch: ScheduledBatch) -> None:
    """A failed step's CPU-tier loads and swap-ins may not have run: no prefix hash may vouch for their blocks."""
    block_manager = getattr(scheduler, "block_manager", None)
    if block_manager is not None and (batch.blocks_to_onload or batch.blocks_to_swap_in):
        block_manager.forget_unfilled(batch.blocks_to_onload, batch.blocks_to_swap_in)


def rerun_one_by_one(batch: ScheduledBatch, block_size: int, execute: Callable[[Any], StepOutput],
                     lora_slots: Any = None) -> tuple[ScheduledBatch, StepOutput, list[tuple[Any, str]]]:
    """Each sequence of `batch` in a forward of its own through `execute` (the executor's execute_model).
    Returns (the batch of the sequences that ran, their outputs merged into one StepOutput in that batch's order,
    [(sequence, error message)] of the rest)."""
    survivors, outputs, failed = ScheduledBatch(), [], []
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        alone = ScheduledBatch(seqs=[seq], num_new_tokens=[n])
        try:
            step = build_step_input(alone, block_size, [], lora_slots)
            constrain_step(step, alone.seqs)  # a constrained request keeps its masks when it runs alone
            step.return_hidden_states = seq.pooling is not None  # an embedding request, its hidden states
            outputs.append(execute(step))
        except Exception as err:
            if lora_slots is not None:
                lora_slots.forget()
            logger.warning("request %s fails a step alone: %s: %s", seq.request_id, type(err).__name__, err)
            failed.append((seq, f"{type(err).__name__}: {err}"))
            continue
        survivors.seqs.append(seq)
        survivors.num_new_tokens.append(n)
    return survivors, _merge(outputs), failed


def _merge(outputs: list[StepOutput]) -> StepOutput:
    """One-sequence outputs as the output of one step over all of them (a field none of them has stays None)."""
    def field(name: str) -> list | None:
        values = [getattr(o, name) for o in outputs]
        return None if all(v is None for v in values) else [v[0] if v else [] for v in values]

    return StepOutput([o.sampled_token_ids[0] for o in outputs], logprobs=field("logprobs"),
                      prompt_logprobs=field("prompt_logprobs"), hidden_states=field("hidden_states"))
