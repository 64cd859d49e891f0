"""From a StepInput (plain Python lists) to the device tensors of one forward, in one upload (chapters 2, 4, 5).

`prepare_batch` lays out every integer (and float) the step needs on the device in one pinned host buffer and
copies it once (minillm/engine/step_buffers.py explains why one copy); the PreparedBatch it returns holds typed
views of the device copy:

    input_ids, positions, slot_mapping   int64 [T]   the step's new tokens, packed sequence after sequence
    cu_seqlens_q, seq_lens               int32 [B+1], [B]
    block_tables                         int32 [B, W]  (-1 padded)
    sample_indices                       int64 [S]   the rows whose logits get sampled
    temperatures, top_ks, top_ps         [S]         only when some sampled row is not greedy (or has processors)
    logprob_rows                         int64 [R]   which sampled rows return log-probs (only when some, not all)
    prompt_rows, prompt_targets          int64 [P]   rows that score prompt tokens and the tokens they score

Two layouts. An eager step packs the fields back to back in the runner's growable buffer. A decode-like step that
a CUDA graph will replay (every sequence with the same q_len, a captured bucket) is written straight into the
graph's static inputs (DecodeCUDAGraphs.inputs), padding rows included: the upload then IS the graph's input copy.
A token-tree verify step whose trees fit a tree graph (at most its Q rows per sequence) is written the same way into
that graph's inputs (DecodeCUDAGraphs.tree_inputs): packed rows as in an eager step, then padding, plus the rows'
ancestor bitmasks and cu_seqlens_q. `tree_mask_rows` flattens the bitmasks for both layouts, so a CPU step (which
never has graphs) builds the same values a replayed step uploads.

Host work is kept to what cannot be avoided: numpy writes Python lists into the pinned pages at C speed, decode
steps (one row per sequence, all sampled) skip building index lists, and the device views are cached by
(offset, dtype, shape), so a decode step of the same batch shape as the last one creates no new tensors for its
metadata beyond slices of the graph's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch

from minillm.engine.step_buffers import FieldLayout, UploadBuffer
from minillm.engine.step_input import SamplingSpec, StepInput
from minillm.forward_context import AttentionMetadata


@dataclass
class PreparedBatch:
    """The tensors one forward needs, plus which rows of its output get sampled and how."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    metadata: AttentionMetadata
    sample_indices: torch.Tensor  # int64 [S]: the rows that get sampled, sequence by sequence
    sample_seqs: list[int]  # index of the sequence each sampled row belongs to
    all_rows_sampled: bool = False  # sample_indices is 0..T-1 (decode and verify steps): no gather needed
    row_specs: list[SamplingSpec] = field(default_factory=list)  # the sampling parameters of each sampled row
    # float32 / int64 / float32 [S]; None when every sampled row is greedy (argmax needs none of them)
    sampling: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    logprob_rows: torch.Tensor | None = None  # int64 [R]: sampled rows that return log-probs, when not all do
    prompt_rows: torch.Tensor | None = None  # int64 [P]: forward rows that score prompt tokens
    prompt_targets: torch.Tensor | None = None  # int64 [P]: the prompt tokens they score
    graph: tuple[int, int] | None = None  # (bucket, q_len) of the CUDA graph whose static inputs hold this step
    graph_tree: bool = False  # ... a tree graph (DecodeCUDAGraphs.tree_inputs; q_len: its rows per sequence)
    # the host's copies: the sampled rows that return log-probs (None: no request asked); per prompt row, its
    # sequence, its target token and its number of top alternatives
    logprob_row_list: list[int] | None = None
    prompt_scoring: tuple[list[int], list[int], list[int]] | None = None
    returns_raw_logits: bool = False  # the step returns the raw logits beside the processed ones (StepOutput)
    graph_set: object | None = None  # the DecodeCUDAGraphs that `graph` names (a LoRA step's own set, or the plain)


def _check(step: StepInput) -> None:
    n, b = len(step.input_ids), len(step.query_lens)
    if len(step.positions) != n or len(step.slot_mapping) != n or sum(step.query_lens) != n:
        raise ValueError(f"inconsistent step: {n} input ids, {len(step.positions)} positions, "
                         f"{len(step.slot_mapping)} slots, query lengths summing to {sum(step.query_lens)}")
    if not (len(step.seq_lens) == len(step.block_tables) == len(step.num_sampled) == len(step.sampling) == b):
        raise ValueError(f"inconsistent step: {b} query lengths, {len(step.seq_lens)} seq_lens, "
                         f"{len(step.block_tables)} block tables, {len(step.num_sampled)} num_sampled, "
                         f"{len(step.sampling)} sampling specs")


def prepare_batch(step: StepInput, buffer: UploadBuffer, arange: torch.Tensor, graphs=None) -> PreparedBatch:
    """Lay the step out in `buffer` (or in the inputs of the graph that will replay it), upload once, return the
    views. `arange` is a device int64 0, 1, 2, ... at least T long (sample_indices of an all-rows step);
    `graphs`: the runner's DecodeCUDAGraphs or None."""
    _check(step)
    q_lens, num_sampled = step.query_lens, step.num_sampled
    num_seqs, num_tokens = len(q_lens), len(step.input_ids)
    num_rows = sum(num_sampled)
    all_rows = num_rows == num_tokens  # num_sampled[i] <= q_lens[i]: equal sums mean every row is sampled
    if all_rows and num_tokens == num_seqs:  # a decode step: row i is sequence i
        sample_seqs, sample_rows = list(range(num_seqs)), None
    elif all_rows:
        sample_seqs, sample_rows = [i for i, n in enumerate(q_lens) for _ in range(n)], None
    else:
        ends = list(accumulate(q_lens))
        sample_seqs = [i for i, k in enumerate(num_sampled) for _ in range(k)]
        sample_rows = [r for end, k in zip(ends, num_sampled) for r in range(end - k, end)]
    sampling = step.sampling
    row_specs = [sampling[i] for i in sample_seqs]
    greedy = all(s.greedy for s in row_specs)
    width = max(map(len, step.block_tables))
    max_q = max(q_lens)
    size, tree_graph = None, False
    lora_segments = _lora_segments(step)
    if lora_segments is not None and getattr(graphs, "lora", None) is None:
        graphs = None  # a step with LoRA adapters runs eagerly unless these are graphs captured with them
    if graphs is not None and step.tree_masks is None and min(q_lens) == max_q:
        size = graphs.plan(num_seqs, max_q, width)
    elif graphs is not None and step.tree_masks is not None:
        size = graphs.plan_tree(num_seqs, max_q, width)
        tree_graph = size is not None
    graph_q = graphs.tree_query_len if tree_graph else max_q  # the graph's rows per sequence

    # -- the layout --------------------------------------------------------------------------------------------
    if size is not None:
        inputs = graphs.tree_inputs[size] if tree_graph else graphs.inputs[size, max_q]
        buffer, extras = graphs.upload, FieldLayout(inputs.extras_offset)
    else:
        extras = FieldLayout()
        for name in ("input_ids", "positions", "slot_mapping"):
            extras.add(name, torch.int64, (num_tokens,))
        if step.tree_masks is not None:
            extras.add("tree_mask", torch.int64, (num_tokens,))
        extras.add("cu_seqlens_q", torch.int32, (num_seqs + 1,))
        extras.add("seq_lens", torch.int32, (num_seqs,))
        extras.add("block_tables", torch.int32, (num_seqs, width))
    if sample_rows is not None:
        extras.add("sample_indices", torch.int64, (num_rows,))
    if not greedy:
        extras.add("temperatures", torch.float32, (num_rows,))
        extras.add("top_ks", torch.int64, (num_rows,))
        extras.add("top_ps", torch.float32, (num_rows,))
    logprob_rows = logprob_row_list = None
    if step.num_logprobs is not None:
        asks = step.num_logprobs
        logprob_row_list = [r for r, i in enumerate(sample_seqs) if asks[i] >= 0]
        if len(logprob_row_list) < num_rows:  # all sampled rows need no index
            logprob_rows = logprob_row_list
            extras.add("logprob_rows", torch.int64, (len(logprob_rows),))
    if lora_segments is not None:  # the segments (eager kernels), and each row's slot (the piecewise LoRA graphs)
        extras.add("lora_segments", torch.int32, (3, len(lora_segments[0])))
        extras.add("lora_token_slots", torch.int32, (num_tokens,))
    prompt_rows, prompt_targets, prompt_owners, prompt_top = _prompt_rows(step)
    if prompt_rows:
        extras.add("prompt_rows", torch.int64, (len(prompt_rows),))
        extras.add("prompt_targets", torch.int64, (len(prompt_rows),))
    if size is not None:
        if extras.end > inputs.extras_end:
            raise ValueError(f"a graph step's metadata needs {extras.end - inputs.extras_offset} bytes, the graph "
                             f"layout has {inputs.extras_end - inputs.extras_offset}")
        # up to the last block-table entry a replay reads: row size-1's first `width` entries, or for a padding
        # row the blocks its keys span (q_len keys; 1 for a tree graph's padding sequences)
        pad_cols = min(-(-_pad_keys(max_q, tree_graph) // step.block_size), graphs.max_blocks_per_seq) \
            if size > num_seqs else 0
        end = inputs.extras_end + 4 * ((size - 1) * graphs.max_blocks_per_seq + max(width, pad_cols, 1))
    else:
        end = extras.end
    buffer.reserve(end)

    # -- the host writes ---------------------------------------------------------------------------------------
    def put(name: str, values) -> None:
        buffer.host_view(*extras.fields[name])[:] = values

    if size is not None:
        _write_graph_inputs(buffer, inputs, step, size, max_q, width, tree_graph)
    else:
        put("input_ids", step.input_ids)
        put("positions", step.positions)
        put("slot_mapping", step.slot_mapping)
        if step.tree_masks is not None:
            put("tree_mask", tree_mask_rows(step))
        put("cu_seqlens_q", [0, *accumulate(q_lens)])
        put("seq_lens", step.seq_lens)
        put("block_tables", _padded(step.block_tables, width))
    if sample_rows is not None:
        put("sample_indices", sample_rows)
    if not greedy:
        put("temperatures", [s.temperature for s in row_specs])
        put("top_ks", [s.top_k for s in row_specs])
        put("top_ps", [s.top_p for s in row_specs])
    if logprob_rows is not None:
        put("logprob_rows", logprob_rows)
    if prompt_rows:
        put("prompt_rows", prompt_rows)
        put("prompt_targets", prompt_targets)
    if lora_segments is not None:
        put("lora_segments", lora_segments)
        put("lora_token_slots", [slot for slot, n in zip(step.lora_slots, q_lens) for _ in range(n)])
    buffer.upload(end)

    # -- the device views --------------------------------------------------------------------------------------
    views = buffer.views(extras)
    tree_mask = views.get("tree_mask")
    if tree_graph:
        input_ids, positions, cu_seqlens_q, slot_mapping, seq_lens, block_tables, tree_mask = \
            graphs.tree_step_views(size, num_seqs, width, num_tokens)
    elif size is not None:  # block_tables keeps the row stride of the graph's static table (its max blocks)
        input_ids, positions, cu_seqlens_q, slot_mapping, seq_lens, block_tables = \
            graphs.step_views(size, max_q, num_seqs, width)
    else:
        input_ids, positions, slot_mapping = views["input_ids"], views["positions"], views["slot_mapping"]
        cu_seqlens_q, seq_lens, block_tables = views["cu_seqlens_q"], views["seq_lens"], views["block_tables"]
    metadata = AttentionMetadata(
        cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, max_seqlen_q=max_q, max_seqlen_k=max(step.seq_lens),
        slot_mapping=slot_mapping, block_tables=block_tables, block_size=step.block_size,
        seq_lens_list=step.seq_lens, query_lens_list=q_lens, tree_mask=tree_mask)
    if lora_segments is not None:
        from minillm.lora.layers import LoRAMapping
        starts, lens, slots = views["lora_segments"]
        metadata.lora = LoRAMapping(starts, lens, slots, max(lora_segments[1]), list(zip(*lora_segments)),
                                    views["lora_token_slots"])
    return PreparedBatch(
        input_ids, positions, metadata,
        sample_indices=arange[:num_tokens] if sample_rows is None else views["sample_indices"],
        sample_seqs=sample_seqs, all_rows_sampled=sample_rows is None, row_specs=row_specs,
        sampling=None if greedy else (views["temperatures"], views["top_ks"], views["top_ps"]),
        logprob_rows=views.get("logprob_rows"), prompt_rows=views.get("prompt_rows"),
        prompt_targets=views.get("prompt_targets"), graph=None if size is None else (size, graph_q),
        graph_tree=tree_graph, logprob_row_list=logprob_row_list,
        prompt_scoring=(prompt_owners, prompt_targets, prompt_top) if prompt_rows else None, graph_set=graphs)


def _lora_segments(step: StepInput) -> list[list[int]] | None:
    """[starts, lengths, slots] of the sequences whose tokens use a LoRA adapter (minillm.lora), in packed-token
    coordinates; None when none does."""
    if step.lora_slots is None:
        return None
    starts, lens, slots, offset = [], [], [], 0
    for q_len, slot in zip(step.query_lens, step.lora_slots):
        if slot >= 0:
            starts.append(offset)
            lens.append(q_len)
            slots.append(slot)
        offset += q_len
    return [starts, lens, slots] if slots else None


def _padded(tables: list[list[int]], width: int) -> list[list[int]]:
    if all(len(t) == width for t in tables):
        return tables
    return [t + [-1] * (width - len(t)) for t in tables]


def tree_mask_rows(step: StepInput) -> list[int]:
    """Per new token of a tree step, its int64 ancestor bitmask over its sequence's new tokens; -1 (plain causal)
    for the rows of sequences without a tree."""
    return [b for m, n in zip(step.tree_masks, step.query_lens) for b in (m if m is not None else [-1] * n)]


def _pad_keys(q_len: int, tree_graph: bool) -> int:
    """Keys a padding sequence of a graph step attends to: q_len (its q_len rows, causal), or, in a tree graph,
    1 (it owns no rows: cu_seqlens_q gives it none, so only its first block-table entry must be valid)."""
    return 1 if tree_graph else q_len


def _write_graph_inputs(buffer: UploadBuffer, inputs, step: StepInput, size: int, q_len: int, width: int,
                        tree_graph: bool = False) -> None:
    """The step's static inputs in the graph's layout; rows past the batch are padding rows: token 0 at position 0,
    stored nowhere (slot -1), attending to q_len keys in block 0 onwards (valid memory; the result is discarded).
    A tree graph's step keeps its packed rows (cu_seqlens_q says whose they are, tree_mask how they see each other);
    its rows past them belong to no sequence (-1 masks), and its padding sequences own none."""
    fields, tokens, batch = inputs.layout.fields, len(step.input_ids), len(step.query_lens)
    for name, values, pad in (("input_ids", step.input_ids, 0), ("positions", step.positions, 0),
                              ("slot_mapping", step.slot_mapping, -1)):
        view = buffer.host_view(*fields[name])
        view[:tokens] = values
        view[tokens:] = pad
    pad_keys = _pad_keys(q_len, tree_graph)
    if tree_graph:
        masks = buffer.host_view(*fields["tree_mask"])
        masks[:tokens] = tree_mask_rows(step)
        masks[tokens:] = -1
        cu = buffer.host_view(*fields["cu_seqlens_q"])
        cu[:batch + 1] = [0, *accumulate(step.query_lens)]
        cu[batch + 1:] = tokens
    if "lora_slots" in fields:  # a LoRA graph: each row's adapter slot, -1 for no adapter and for padding rows
        slots = buffer.host_view(*fields["lora_slots"])
        per_seq = step.lora_slots or [-1] * batch
        slots[:tokens] = [slot for slot, n in zip(per_seq, step.query_lens) for _ in range(n)]
        slots[tokens:] = -1
    seq_lens = buffer.host_view(*fields["seq_lens"])
    seq_lens[:batch] = step.seq_lens
    seq_lens[batch:] = pad_keys
    tables = buffer.host_view(*fields["block_tables"])
    tables[:batch, :width] = _padded(step.block_tables, width)
    # the blocks a padding row's keys span must be valid addresses: block 0 (the graph's buffer is shared by
    # every captured shape, so whatever else is left there may be any bytes)
    tables[batch:size, :-(-pad_keys // step.block_size)] = 0


def _prompt_rows(step: StepInput) -> tuple[list[int], list[int], list[int], list[int]]:
    """The forward rows that score prompt tokens (StepInput.prompt_logprob_rows), the tokens they score, the
    sequence each belongs to and its number of top alternatives."""
    rows: list[int] = []
    targets: list[int] = []
    owners: list[int] = []
    num_top: list[int] = []
    if step.prompt_logprob_rows is None:
        return rows, targets, owners, num_top
    offset = 0
    for i, (n, scored) in enumerate(zip(step.query_lens, step.prompt_logprob_rows)):
        if scored is not None:
            first, count = offset + scored.first_row, len(scored.token_ids)
            rows.extend(range(first, first + count))
            targets.extend(scored.token_ids)
            owners.extend([i] * count)
            num_top.extend([scored.num_top] * count)
        offset += n
    return rows, targets, owners, num_top
