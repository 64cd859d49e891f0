"""The model runner of one rank of a tensor/pipeline-parallel worker group (chapter 11).

Every rank gets the same StepInput and runs `execute_model`; what differs is what it does with it:

    every rank        applies the step's block operations to its own KV pool (its layers, its K/V heads)
    first stage       embeds the tokens; every later stage receives (hidden, residual) from the stage before
    middle stages     run their layers and send (hidden, residual) on, asynchronously
    last stage        runs the final norm and its slice of the LM head; TP rank 0 gathers the logits, samples
                      and answers with the StepOutput (and, when the step asks, the rows' hidden states after
                      the final norm, which every TP rank holds whole: embedding requests pool them);
                      every other rank answers None

With pp > 1 the step's sequences are cut into pp micro-batches (split_step; where to cut is micro_batch_bounds, the
course exercise ch11.pipeline_schedule, reached through `dispatch`) that flow
through the stages one after the other, so the stages overlap. The logits of all micro-batches are sampled at
once, in the step's row order: the same sampler call as the single-process runner, so the seeded and unseeded
generators advance identically and greedy and seeded outputs match one process. Log-probabilities are scored
there too (SamplingParams.logprobs on the sampled rows; prompt_logprobs on each micro-batch's prompt rows, whose
LM-head gather every rank of the last stage joins).

CUDA graphs are not captured here (a graph would have to capture the collectives too); the runner runs eagerly.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from minillm.config import EngineConfig
from minillm.engine.logprobs import token_logprobs
from minillm.engine.model_runner import ModelRunner
from minillm.engine.step_input import StepInput, StepOutput
from minillm.forward_context import forward_context
from minillm.hooks import dispatch
from minillm.parallel.state import get_parallel_state, pipeline_isend, pipeline_recv


# >>> exercise ch11.pipeline_schedule
def micro_batch_bounds(query_lens: list[int], num_micro_batches: int) -> list[int]:
    """Cut a step's sequences (query_lens[i] new tokens each, in the step's order) into consecutive micro-batches
    of about equal token counts, for the pipeline: returns the boundaries [0, b_1, ..., num_seqs], micro-batch m
    being sequences bounds[m] .. bounds[m + 1] - 1.

    n = min(num_micro_batches, num_seqs) micro-batches, none empty, every sequence in exactly one, order kept.
    Walk the sequences with a running token count: micro-batch g (1, 2, ..., n - 1) closes after the first
    sequence, past the one that closed micro-batch g - 1, at which the count reaches g / n of the step's tokens
    (count * n >= total * g, in integers: a float total / n * g can land a hair off), or as soon as the
    sequences left are just enough to give each micro-batch still to open one sequence. One sequence closes at
    most one micro-batch (a long prompt that passes two thresholds closes g; g + 1 closes at the next sequence).
    The last micro-batch takes whatever remains.

    Example: query_lens [5, 17, 1, 3] (26 tokens), 2 micro-batches -> [0, 2, 4] (22 and 4 tokens: the 17-token
    prompt cannot be cut); [1, 1, 1, 1, 1], 2 -> [0, 3, 5]; [100, 1, 1, 1], 3 -> [0, 1, 2, 4]; [4], 3 -> [0, 1].
    Raise ValueError for num_micro_batches < 1 or an empty query_lens.
    """
    # >>> solution
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    if not query_lens:
        raise ValueError("query_lens is empty: a step has at least one sequence")
    num_seqs = len(query_lens)
    n = min(num_micro_batches, num_seqs)
    total = sum(query_lens)
    bounds, acc = [0], 0
    for i, q in enumerate(query_lens):
        acc += q
        left, groups_to_open = num_seqs - (i + 1), n - len(bounds)
        # acc / total >= g / n, compared in integers (a float quotient can land a hair below an exact boundary)
        if groups_to_open > 0 and (acc * n >= total * len(bounds) or left == groups_to_open):
            bounds.append(i + 1)
    bounds.append(num_seqs)
    return bounds
    # <<< solution
# <<< exercise


def split_step(step: StepInput, num_micro_batches: int) -> list[StepInput]:
    """Cut a step's sequences into at most `num_micro_batches` consecutive groups of about equal token counts
    (micro_batch_bounds). Block operations, finished requests and LoRA adapter copies travel with the step itself
    (applied once, before any micro-batch)."""
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")
    if num_micro_batches == 1 or step.num_seqs <= 1:
        return [step]
    bounds = dispatch("ch11.pipeline_schedule", micro_batch_bounds)(list(step.query_lens), num_micro_batches)
    if bounds[0] != 0 or bounds[-1] != step.num_seqs or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"micro_batch_bounds returned {bounds}: expected increasing boundaries from 0 to "
                         f"{step.num_seqs} (every micro-batch non-empty)")
    if len(bounds) == 2:
        return [step]
    token_starts = [0]
    for q in step.query_lens:
        token_starts.append(token_starts[-1] + q)
    parts = []
    for lo, hi in zip(bounds, bounds[1:]):
        a, b = token_starts[lo], token_starts[hi]
        # every per-token and per-sequence field sliced (a field left whole would be read against the wrong rows:
        # tree masks were, once); the step-level block operations stay with the step
        per_seq = {name: getattr(step, name)[lo:hi] for name in _PER_SEQUENCE}
        per_seq.update({name: None if getattr(step, name) is None else getattr(step, name)[lo:hi]
                        for name in _PER_SEQUENCE_OPTIONAL})
        # embeddings prompts' rows (a chunk never spans two sequences), counted from the micro-batch's first row
        embeds = [(row - a, values) for row, values in step.prompt_embeds or () if a <= row < b] or None
        parts.append(dataclasses.replace(
            step, **{name: getattr(step, name)[a:b] for name in _PER_TOKEN}, **per_seq,
            blocks_to_swap_out=[], blocks_to_swap_in=[], blocks_to_copy=[], slots_to_copy=[],
            finished_request_ids=[], lora_loads=[], prompt_embeds=embeds))
    return parts


_PER_TOKEN = ("input_ids", "positions", "slot_mapping")
_PER_SEQUENCE = ("query_lens", "seq_lens", "block_tables", "num_sampled", "sampling")
_PER_SEQUENCE_OPTIONAL = ("num_logprobs", "prompt_logprob_rows", "tree_masks", "lora_slots")


class ForwardFailed(RuntimeError):
    """A tensor-parallel forward raised between its collectives (the message is the cause's). Its TP peers are
    still in step only if their forward failed too (every rank's embedding refuses the same bad token id); one
    rank failing alone (out of memory on one GPU) leaves its peers in, or past, collectives it never joined, and
    the engine ends the group (minillm.engine.executor.desynchronised)."""

    in_forward = True


class ParallelModelRunner(ModelRunner):
    def configure(self, engine_config: EngineConfig) -> None:
        super().configure(dataclasses.replace(engine_config, enforce_eager=True, compile=False))

    @torch.inference_mode()
    def execute_model(self, step: StepInput) -> StepOutput | None:
        state = get_parallel_state()
        for request_id in step.finished_request_ids:
            self._generators.pop(request_id, None)
        self.apply_block_ops(step)
        if step.is_empty:
            return StepOutput([[] for _ in range(step.num_seqs)]) if state.is_driver else None
        if step.lora_slots is not None:  # every rank copies the step's new adapters into its own layers' slots
            self._load_adapters(step)
        if self.attention_layers[0].k_cache.data_ptr() != self.kv_cache.storage.data_ptr():
            self.bind_kv_cache()
        hidden_size = self.model_config.hidden_size
        pending, logits_parts, prompt_parts, hidden_parts = [], [], [], []
        next_seq = 0
        failure = None  # the first exception of this rank's step, raised once every message has gone out
        for index, micro in enumerate(split_step(step, state.pp_size)):
            first_seq, next_seq = next_seq, next_seq + micro.num_seqs  # the micro-batch's sequences in the step
            shape = (len(micro.input_ids), hidden_size)
            intermediate = None
            if not state.is_first_stage:  # hidden and residual of this micro-batch from the previous stage
                intermediate = tuple(pipeline_recv([shape, shape], self.dtype, self.device, tag=2 * index))
            out = None
            if failure is None:
                try:
                    prepared = self.prepare(micro)
                    with forward_context(prepared.metadata), self.prompt_embeds_of(micro):
                        out = self.model(prepared.input_ids, prepared.positions, intermediate)
                    if state.is_last_stage:
                        self._logits(prepared, out, first_seq, logits_parts, prompt_parts)
                        if step.return_hidden_states and state.is_driver:  # embedding requests' rows (pooling)
                            hidden_parts.append(out)
                except Exception as err:  # the next stage still waits for this micro-batch and the later ones
                    failure, out = err, None
            if not state.is_last_stage:  # after a failure, zeros: the pipeline stays in step and the engine
                if out is None:  # hears of the failure from this rank's WorkerError (and may rerun, isolated)
                    out = (torch.zeros(shape, dtype=self.dtype, device=self.device),) * 2
                pending.extend(pipeline_isend(list(out), tag=2 * index))
        for work, _ in pending:  # the last micro-batch's sends must finish before the step returns
            work.wait()
        if failure is not None:
            if state.tp_size > 1:  # raised between collectives: safe only if every TP peer failed there too
                raise ForwardFailed(f"{type(failure).__name__}: {failure}") from failure
            raise failure
        if not state.is_driver:
            return None
        output = self._sample_all(step, logits_parts)
        if step.prompt_logprob_rows is not None:  # each micro-batch's prompt rows, scored where they were cut
            output.prompt_logprobs = [[] for _ in range(step.num_seqs)]
            for owners, targets, widths, scoring in prompt_parts:
                for i, entry in zip(owners, token_logprobs(scoring, targets, widths)):
                    output.prompt_logprobs[i].append(entry)
        if step.return_hidden_states:  # after the final norm, every row of the step, to host: they are pickled
            output.hidden_states = list(torch.cat(hidden_parts).cpu().split(step.query_lens))  # to the engine
        return output

    def _logits(self, prepared, out, first_seq: int, logits_parts: list, prompt_parts: list) -> None:
        """The last stage's LM head over a micro-batch's sampled rows (None off TP rank 0) and its prompt-scoring
        rows (every TP rank joins the gather); `first_seq`: the micro-batch's first sequence in the step."""
        if prepared.sample_seqs:
            logits_parts.append(self.model.compute_logits(out[prepared.sample_indices]))
        if prepared.prompt_scoring is not None:
            owners, targets, widths = prepared.prompt_scoring
            scoring = self.model.compute_logits(out[prepared.prompt_rows])
            prompt_parts.append(([first_seq + i for i in owners], targets, widths, scoring))

    def _sample_all(self, step: StepInput, logits_parts: list[torch.Tensor]) -> StepOutput:
        """The step's tokens from the logits of all micro-batches at once (the single-process sampler call), the
        log-probs of the sampled rows whose request asked (SamplingParams.logprobs: log-softmax of the raw
        logits, as the single-process runner scores them), and the rejection rule's distribution if asked."""
        sampled: list[list[int]] = [[] for _ in range(step.num_seqs)]
        logprobs = None if step.num_logprobs is None else [[] for _ in range(step.num_seqs)]
        if not logits_parts:
            return StepOutput(sampled, [] if step.return_logits else None, logprobs)
        logits = torch.cat(logits_parts)
        rows = [i for i, k in enumerate(step.num_sampled) for _ in range(k)]
        specs = [step.sampling[i] for i in rows]
        input_ids = None
        if any(s.processing is not None for s in specs):  # the penalties count this step's tokens too
            input_ids = torch.tensor(step.input_ids, dtype=torch.int64, device=logits.device)
        tokens = self.sample(logits, specs, input_ids, step)
        for i, token in zip(rows, tokens):
            sampled[i].append(token)
        asked = [] if logprobs is None else [r for r, i in enumerate(rows) if step.num_logprobs[i] >= 0]
        if asked:
            entries = token_logprobs(logits[asked], [tokens[r] for r in asked],
                                     [step.num_logprobs[rows[r]] for r in asked])
            for r, entry in zip(asked, entries):
                logprobs[rows[r]].append(entry)
        per_seq_logits = raw_logits = None
        if step.return_logits:  # for the rejection rule: the distribution sampled from (processors applied)
            temperatures = torch.tensor([s.temperature for s in specs], dtype=torch.float32, device=logits.device)
            per_seq_logits = list(self.target_logits(logits, temperatures).cpu().split([len(s) for s in sampled]))
            if logprobs is not None and self._step_processed is not None:  # log-probs read the raw logits
                raw_logits = list(logits.float().cpu().split([len(s) for s in sampled]))
        return StepOutput(sampled, per_seq_logits, logprobs, raw_logits=raw_logits)


class StageForProfiling(nn.Module):
    """One rank's shard dressed as a whole model for the KV-pool profiler (minillm.engine.kv_cache), which runs
    `model(input_ids, positions)` then `model.compute_logits(hidden)` on every rank at once: a stage after the
    first gets zero activations instead of a recv, a stage before the last hands its hidden states on as its
    "logits" (the peak is the stage's own), a TP rank that does not sample returns its hidden states too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        state = get_parallel_state()
        intermediate = None
        if not state.is_first_stage:
            zeros = torch.zeros(input_ids.shape[0], self.model.config.hidden_size, device=input_ids.device,
                                dtype=next(self.model.parameters()).dtype)
            intermediate = (zeros, zeros)
        out = self.model(input_ids, positions, intermediate)
        return out if state.is_last_stage else out[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.model.compute_logits(hidden_states) if get_parallel_state().is_last_stage else None
        return hidden_states if logits is None else logits
