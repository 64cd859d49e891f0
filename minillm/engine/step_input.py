"""StepInput: the slim, picklable description of one step that the engine sends to its workers.

Chapter 2 builds the loop that sends it; chapter 11 runs the workers in other processes.

The scheduler thinks in `Sequence` objects (token lists, status, timing, detokenizer state); a worker only needs
numbers: which token ids to feed at which positions, where each new token's K/V goes (slot_mapping), where each
sequence's earlier K/V lives (block_tables), which rows to sample and how. Keeping that boundary narrow is what
lets a worker live in another process (tensor parallelism, prefill/decode disaggregation: issue 13), as vLLM's
`SchedulerOutput` / `ModelInputForGPU` split does. Everything here is plain Python lists and dataclasses: cheap
to pickle, and nothing in it can reach back into the scheduler.

    batch = scheduler.schedule()                       # Sequences and block decisions (engine process)
    step = build_step_input(batch, block_size)         # numbers only (engine process)
    output = executor.execute_model(step)              # tensors, forward, sampling (worker process(es))
    scheduler.postprocess(batch, output.sampled_token_ids)

Multi-token steps: a sequence carrying draft tokens (`Sequence.spec_token_ids`, speculative decoding) feeds them
after its uncomputed tokens and asks for samples at its last 1 + k rows (`num_sampled`): the verify step.

Log-probabilities (SamplingParams.logprobs / prompt_logprobs) travel only when some sequence asks for them:
`num_logprobs` (top-k per sequence for its sampled rows) and `prompt_logprob_rows` (which rows of a prefill chunk
score which prompt tokens; the chunk's last row scores the first token of the *next* chunk, so the target ids
are sent along). Otherwise both stay None and cost nothing to pickle or to compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from minillm.engine.block_table import slot_mapping
from minillm.engine.prompt_embeds import embedding_rows
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.hooks import dispatch

# A chunk at least this long gets its slot mapping from one vectorised expression instead of a Python loop
# (only when no learner override is active: an override is always called, so it is always exercised).
_VECTORISED_SLOTS_FROM = 512


class LogitsProcessing(NamedTuple):
    """One sequence's logits processors for this step (minillm/layers/logits_processors.py), sent only for a
    request that asks for one. The step feeds the sequence's tokens start, start + 1, ...; a sampled row that follows
    position p bans `stop_ids` while fewer than min_tokens tokens are out (p + 1 - num_prompt_tokens), and its
    penalties count `history` (the tokens before `start`; None when no penalty is on) plus the step's own tokens on
    the row's path (a chain's rows up to it, drafts included; a tree node's ancestors and itself). A constrained
    request (structured outputs, allowed_token_ids, bad_words) also carries each sampled row's mask and bans,
    which the engine computes on the host (constraints.constrain_step)."""

    stop_ids: tuple[int, ...]
    min_tokens: int
    logit_bias: tuple[tuple[int, float], ...]
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    history: list[int] | None
    start: int
    num_prompt_tokens: int
    # constraints (minillm/engine/constraints.py), one entry per sampled row of the sequence, in row order: the
    # tokens the row may sample (bool [V] on the CPU; None: any), and the tokens bad_words bans there
    allowed: tuple | None = None
    bans: tuple[tuple[int, ...], ...] | None = None


class SamplingSpec(NamedTuple):
    """What the sampler needs of one request's SamplingParams (the rest stays with the engine). A NamedTuple:
    immutable, picklable, and built for every sequence of every step at a fraction of a frozen dataclass's cost."""

    request_id: str
    temperature: float
    top_k: int
    top_p: float
    seed: int | None  # a per-request generator lives in the worker, keyed by request_id
    processing: LogitsProcessing | None = None  # None: the row's logits are sampled as they are

    @property
    def greedy(self) -> bool:
        """Argmax of the raw logits is this row's token: no temperature, no processor."""
        return self.temperature <= 0 and self.processing is None


@dataclass(frozen=True)
class PromptLogprobRows:
    """Rows first_row .. first_row + len(token_ids) - 1 of a sequence's chunk score the prompt tokens
    `token_ids` (row r predicts the token after it), each with its `num_top` most likely alternatives."""

    first_row: int
    token_ids: list[int]
    num_top: int


class TokenLogprobs(NamedTuple):
    """One scored row: the log-probability and 1-based rank of `token_id`, and the row's top tokens in
    decreasing order (plain numbers, so it pickles across processes)."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class StepInput:
    """One step for the workers. Per sequence i (in batch order): query_lens[i] new tokens, packed into
    input_ids / positions / slot_mapping; seq_lens[i] tokens of context after the step; block_tables[i]; the
    last num_sampled[i] of its rows are sampled with sampling[i] (0: no sample, e.g. a prefill chunk)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    num_sampled: list[int] = field(default_factory=list)
    sampling: list[SamplingSpec] = field(default_factory=list)
    block_size: int = 16
    # block operations to apply before the forward, in this order (see scheduler_interface.ScheduledBatch)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_offload: list[tuple[int, int]] = field(default_factory=list)  # the prefix cache's CPU tier
    blocks_to_onload: list[tuple[int, int]] = field(default_factory=list)
    # requests that ended since the previous step: a worker drops their per-request state (generators)
    finished_request_ids: list[str] = field(default_factory=list)
    return_logits: bool = False  # also return the logits of the sampled rows (speculative verification)
    # also return every row's last hidden state (Medusa / EAGLE / MTP heads draft from it)
    return_hidden_states: bool = False
    # per sequence: top-k log-probs for its sampled rows (-1: none); None when no sequence asks
    num_logprobs: list[int] | None = None
    # per sequence: the prompt tokens its rows score (None: none); None when no sequence asks
    prompt_logprob_rows: list[PromptLogprobRows | None] | None = None
    # token-tree verify steps (chapter 9, minillm/speculative/tree_verify.py): per sequence the int64 ancestor
    # bitmask of each new token (None: causal), None when no sequence carries a tree; and (src, dst) cache slots to
    # copy before anything else, moving the previous step's accepted tree nodes to consecutive positions
    tree_masks: list[list[int] | None] | None = None
    slots_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # async scheduling (minillm/engine/async_step.py): some input ids are -(r + 1), row r of the previous step's
    # sampled tokens, which the host has not downloaded yet; the runner gathers them on the device
    deferred_input_ids: bool = False
    # multi-LoRA (minillm.lora): per sequence the adapter slot its tokens use (-1: none), None when no sequence
    # uses an adapter; and the (slot, LoRARequest) copies a worker makes before the forward
    lora_slots: list[int] | None = None
    lora_loads: list = field(default_factory=list)
    # prompts given as embeddings (minillm/engine/prompt_embeds.py): (first row, [rows, hidden] host tensor) for
    # the step rows whose embedding lookup the caller's vectors replace; None when no sequence has any
    prompt_embeds: list | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_empty(self) -> bool:
        return not self.query_lens


@dataclass
class StepOutput:
    """What a worker returns: per sequence, the tokens sampled at its num_sampled rows (in row order)."""

    sampled_token_ids: list[list[int]]
    logits: list | None = None  # per sequence a [num_sampled, vocab] tensor, when return_logits was set
    # per sequence, one entry per sampled row (empty unless asked), when StepInput.num_logprobs was set
    logprobs: list[list[TokenLogprobs]] | None = None
    # per sequence, one entry per scored prompt row, when StepInput.prompt_logprob_rows was set
    prompt_logprobs: list[list[TokenLogprobs]] | None = None
    # per sequence a [query_len, hidden] tensor on the worker's device (the target's last hidden state at every
    # row of its step, before or after the final norm as the head method asks), when return_hidden_states was set
    hidden_states: list | None = None
    # the `logits` rows before logits processors, when those changed them and logprobs were asked: a token the
    # rejection rule accepts or resamples is scored from these (log-probs are the raw model's, as vLLM's)
    raw_logits: list | None = None


def compute_slot_mapping(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Cache slots of positions start..end-1 (the ch05.slot_mapping exercise, through `dispatch`)."""
    fn = dispatch("ch05.slot_mapping", slot_mapping)
    if fn is slot_mapping and end - start >= _VECTORISED_SLOTS_FROM:
        # the same formula, one block of positions at a time (a per-token Python loop costs ~1 ms / 8k tokens)
        slots: list[int] = []
        for p in range(start - start % block_size, end, block_size):
            base = block_table[p // block_size] * block_size
            lo, hi = max(p, start) - p, min(p + block_size, end) - p
            slots.extend(range(base + lo, base + hi))
        return slots
    return fn(block_table, start, end, block_size)


def build_step_input(batch: ScheduledBatch, block_size: int,
                     finished_request_ids: list[str] | None = None, lora_slots=None) -> StepInput:
    """Flatten a scheduled batch into a StepInput (raises ValueError if a sequence's numbers are inconsistent).
    `lora_slots` (the engine's minillm.lora.slots.LoRASlots, when LoRA is on) gives each sequence's adapter a slot.

    This runs for every sequence of every step, so the loop is written for the host's sake: list methods bound
    once, the slot of a single new token computed inline (the ch05.slot_mapping formula; a learner's override
    is called for every sequence instead), no copy of a sequence's token list."""
    step = StepInput(block_size=block_size, blocks_to_swap_out=list(batch.blocks_to_swap_out),
                     blocks_to_swap_in=list(batch.blocks_to_swap_in), blocks_to_copy=list(batch.blocks_to_copy),
                     blocks_to_offload=list(batch.blocks_to_offload), blocks_to_onload=list(batch.blocks_to_onload),
                     finished_request_ids=list(finished_request_ids or ()))
    num_logprobs: list[int] = []
    prompt_rows: list[PromptLogprobRows | None] = []
    input_ids, positions, slots = step.input_ids, step.positions, step.slot_mapping
    query_lens, seq_lens, block_tables = step.query_lens.append, step.seq_lens.append, step.block_tables.append
    num_sampled, sampling = step.num_sampled.append, step.sampling.append
    inline_slots = dispatch("ch05.slot_mapping", slot_mapping) is slot_mapping
    any_logprobs = any_prompt_rows = False
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        drafts, table, token_ids = seq.spec_token_ids, seq.block_table, seq.token_ids
        num_tokens = len(token_ids)
        num_known = num_tokens + len(drafts)
        start = seq.num_computed_tokens
        end = start + n
        if n < 1 or end > num_known:
            raise ValueError(f"sequence {seq.request_id!r}: cannot compute tokens {start}..{end - 1} of "
                             f"{num_known}")
        if len(table) * block_size < end:
            raise ValueError(f"sequence {seq.request_id!r}: block_table {table} holds "
                             f"{len(table) * block_size} slots, {end} needed")
        if seq.prompt_embeds is not None and start < seq.num_prompt_tokens:  # rows the caller's vectors fill
            if step.prompt_embeds is None:
                step.prompt_embeds = []
            step.prompt_embeds.append(embedding_rows(seq, start, end, len(input_ids)))
        if n == 1 and end <= num_tokens:  # a decode step's one token
            input_ids.append(token_ids[start])
            positions.append(start)
            if inline_slots:
                slots.append(table[start // block_size] * block_size + start % block_size)
            else:
                slots.extend(compute_slot_mapping(table, start, end, block_size))
        else:
            input_ids.extend(token_ids[start:end])
            if end > num_tokens:  # the drafts follow the known tokens
                input_ids.extend(drafts[max(0, start - num_tokens):end - num_tokens])
            positions.extend(range(start, end))
            slots.extend(compute_slot_mapping(table, start, end, block_size))
        query_lens(n)
        seq_lens(end)
        block_tables(list(table))
        # reached the end of what is known: sample the next token (and one per draft, to verify it)
        num_sampled(min(n, 1 + len(drafts)) if end == num_known else 0)
        p = seq.sampling_params
        sampling(SamplingSpec(seq.request_id, p.temperature, p.top_k, p.top_p, p.seed,
                              _processing(seq, start) if p.processes_logits else None))
        if p.logprobs is not None:
            any_logprobs = True
        num_logprobs.append(-1 if p.logprobs is None else p.logprobs)
        rows = None if p.prompt_logprobs is None else _prompt_logprob_rows(seq, start, end)
        any_prompt_rows = any_prompt_rows or rows is not None
        prompt_rows.append(rows)
    if any_logprobs:
        step.num_logprobs = num_logprobs
    if any_prompt_rows:
        step.prompt_logprob_rows = prompt_rows
    if lora_slots is not None:
        step.lora_slots, step.lora_loads = lora_slots.assign(seq.lora_request for seq in batch.seqs)
    return step


def _processing(seq, start: int) -> LogitsProcessing:
    """The processors of a sequence whose step feeds its tokens from position `start` on."""
    p = seq.sampling_params
    return LogitsProcessing(seq.min_tokens_stop_ids, p.min_tokens,
                            tuple(p.logit_bias.items()) if p.logit_bias else (), p.min_p, p.presence_penalty,
                            p.frequency_penalty, p.repetition_penalty, seq.token_ids[:start] if p.penalizes else None,
                            start, seq.num_prompt_tokens)


def _prompt_logprob_rows(seq, start: int, end: int) -> PromptLogprobRows | None:
    """The rows of this chunk that score prompt tokens not scored yet. The engine keeps the scores in
    `seq.prompt_logprobs` ([None] for position 0, then one per scored position), so a chunk recomputed after a
    preemption scores nothing twice."""
    k, scored = seq.sampling_params.prompt_logprobs, seq.prompt_logprobs
    if k is None or scored is None:
        return None
    # row r predicts token r + 1; the next unscored target is position len(scored)
    first, last = max(start, len(scored) - 1), min(end, seq.num_prompt_tokens - 1)
    if first >= last:
        return None
    return PromptLogprobRows(first - start, seq.token_ids[first + 1:last + 1], k)
