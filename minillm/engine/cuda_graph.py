"""CUDA graphs for the decode step (chapter 4): record the whole forward once, replay it with one launch.

A decode step of a small batch is latency-bound on the *host*: each layer issues a dozen kernels (norm, qkv
matmul, RoPE, KV store, paged attention, o_proj, norm, gate_up, SiLU*mul, down), each a few microseconds of
GPU work, and Python plus the launch path take about as long per kernel. A CUDA graph records the sequence of
kernels with their arguments (device pointers included) and replays it with one call, so the GPU runs them
back to back. The price: every replay uses the *same* memory addresses and shapes. Hence

* static input buffers (input_ids, positions, slot_mapping, seq_lens, block_tables) that each step fills, and one
  output buffer per captured size, read back after the replay. They are typed views of one device byte buffer
  (minillm/engine/step_buffers.py), laid out per graph so that the runner fills all of them, padding included,
  with the step's ONE host-to-device copy: no per-field copies, no fill kernels before the replay;
* one graph per batch-size bucket (1, 2, 4, 8, 16, 24, 32, ... max_num_seqs); a batch of 5 replays the graph
  of 8, with 3 padding rows whose slot is -1 (their K/V are not stored) and whose seq_len is 1 over block 0
  (a valid address: the kernel reads one row of real memory and the result is thrown away);
* one memory pool shared by every graph (captured largest first, so the smaller ones fit in its blocks):
  the activations of all buckets together cost about what the largest one needs;
* a warm-up call before each capture: Triton compiles (and autotunes, where a kernel is autotuned) on its
  first call, and neither may happen while a graph is being recorded.
Only decode-like batches are replayed: a prefill's token count varies from step to step. Decode-like means
every sequence has the same number q_len of new tokens, from a configured tuple `query_lens` (default (1,):
plain decoding; speculative decoding with k drafts adds 1 + k). One graph per (bucket, q_len): its static
buffers hold bucket x q_len tokens, the query tokens of sequence i at rows i*q_len .. i*q_len + q_len - 1.

A replay also freezes what the attention kernels decided at capture from the metadata's *longest possible*
sequence: the paged decode kernel splits each sequence's keys into as many parts as max_seqlen_k calls for
(kernels/paged_attention.py, choose_decode_config), and a graph's block table is max_model_len wide, so a graph
captured for max_model_len = 8,192 splits every sequence 32 ways at batch 1 even when it holds 100 tokens: 31
splits with nothing to read, and a merge kernel. A second, *narrow* graph per small bucket, captured for a
short longest sequence and replayed while every block table fits, was built and measured (H200, SmolLM2's heads at
batch 1 and 128 keys: 3.3 us for one 128-key tile against 5.8 us for the 32-split kernel and merge), and then
removed: a couple of microseconds per layer is ~2-3% of a SmolLM2 step, and decode with and without the narrow
graphs differed by less than one configuration differed from itself between runs (benchmarks/RESULTS.md,
"Sixteenth session"), while each graph costs a capture and its memory.

With `sample=True` (the runner's choice on one rank) a graph of q_len 1 records the end of the step too: the LM
head and greedy argmax (`sampled[bucket, 1, False]` = its logits and tokens), and, first, async scheduling's gather of
deferred input ids (minillm/engine/async_step.py) from `prev_tokens`, a static buffer of the previous step's
tokens that the graph itself refills at its end (and the runner after any step whose tokens came from
elsewhere). On the H200 a SmolLM2 decode step under async scheduling was host-bound (benchmarks/RESULTS.md,
"Seventeenth session"): the LM head, the two argmax kernels and the gather's six small ops were ~20% of the host's
~1.1 ms; replayed, they cost no host time. Rows that sample with a temperature still sample eagerly, from the
graph's logits.

Verify steps of a chain method (q_len 1 + k, every row sampled) and tree graphs (Q rows per sequence) sample in
their graphs the same way, up to SAMPLED_VERIFY_MAX_ROWS rows (bucket x q_len): the LM head and greedy argmax of
every row (a tree graph's padding rows included, thrown away with them) are recorded after the forward, so a
verify step stops paying the eager LM head, two argmax launches and their host time after the replay (on the
H200 ~0.29 ms of an n-gram verify step's host time; benchmarks/RESULTS.md, nineteenth session). They defer no
input ids (speculative steps run synchronously), so they neither gather nor refill `prev_tokens`.

Token-tree verify steps (chapter 9: ngram_tree, medusa_tree, eagle_tree) are decode-like too once padded: a tree
method's tree has at most a configured number of nodes, so a step of B sequences has at most B x Q new tokens, Q =
1 + the tree's nodes (speculative.config.tree_graph_batch). Their trees differ in size from sequence to sequence
and from step to step (trimmed by the scheduler, cut short near a request's end), so a *tree graph* does not fix
each sequence's count: its static inputs add the two things the paged decode kernel's varlen + tree mode reads
(kernels/paged_attention.py, HAS_TREE), `cu_seqlens_q` (int32 [bucket + 1]: sequence b owns rows
cu[b] .. cu[b+1] - 1) and `tree_mask` (int64 [bucket x Q]: each row's ancestor bitmask). A step packs its rows
sequence after sequence as an eager step does; the rows past them (up to bucket x Q) and the padding sequences
(empty: cu[b] = cu[b+1]) are stored nowhere and their results thrown away. No sequence owns those rows, so their
attention output is whatever the kernel's output buffer held: harmless where every other op works row by row
(dense models; MoE models with expert capacity get no tree graphs). Without a tree graph a tree step runs
piecewise graphs around ~30 eager attention calls (about 100 us of host time per layer); replayed, it is one
launch. Tree graphs are captured only for a tree method, at the buckets speculation runs at (up to
disable_by_batch_size) and of at most TREE_GRAPH_MAX_TOKENS rows: past that a forward's GPU time dwarfs its launch
overhead, and the shared pool would grow for nothing.

How this maps onto TensorRT-LLM's build step (an engine "built" ahead of time for a fixed GPU):
  layer fusion      = our fused kernels (residual+RMSNorm, RoPE in place, SiLU*mul, the KV scatter, attention);
  kernel autotuning = triton.autotune, run in the warm-up calls here;
  memory planning   = the static graph pool (activations) and the KV pool sized up front by the engine.
`torch.compile(model, dynamic=True)` (EngineConfig.compile) is the other route to fewer launches: it fuses the
torch glue into generated kernels but still launches each one from the host; mode="reduce-overhead" would add
CUDA graphs of its own. Use one or the other (the runner does not capture graphs of a compiled model).
"""
from __future__ import annotations

import torch
from torch import nn

from typing import NamedTuple

from minillm.engine.step_buffers import FieldLayout, UploadBuffer, resolve_deferred_ids
from minillm.forward_context import MAX_DECODE_QUERY_LEN, AttentionMetadata, forward_context
from minillm.kernels.hardware import graph_capture
from minillm.layers.sampler import greedy_tokens
from minillm.layers.tree_attention import MAX_TREE_NODES

# Verify and tree graphs record their LM head and argmax up to this many rows (bucket x q_len): the logits
# buffer, shared by every sampling graph, is then no larger than a 256-sequence decode graph's.
SAMPLED_VERIFY_MAX_ROWS = 256
# Room per token, in the graph's upload layout, for the step's other metadata (sampled rows, sampling parameters,
# log-prob rows, prompt log-prob rows and targets: at most 6 numbers of 8 bytes per token) between the static
# inputs and the block table.
EXTRA_BYTES_PER_TOKEN = 48
# the most rows (bucket x Q) a tree graph holds: a bigger tree step is GPU-bound and runs as before
TREE_GRAPH_MAX_TOKENS = 1024


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (included even when not a multiple of 8)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs] + list(range(16, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


def check_query_lens(query_lens: tuple[int, ...]) -> tuple[int, ...]:
    """The sorted, distinct query lengths to capture, each in [1, MAX_DECODE_QUERY_LEN]."""
    lens = tuple(sorted(set(query_lens))) if isinstance(query_lens, (tuple, list)) else ()
    if not lens or any(isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= MAX_DECODE_QUERY_LEN
                       for q in lens):
        raise ValueError(f"query_lens must be a non-empty tuple of ints in [1, {MAX_DECODE_QUERY_LEN}], "
                         f"got {query_lens!r}")
    return lens


def tree_graph_buckets(max_num_seqs: int, tree_query_len: int | None, max_batch: int | None = None) -> list[int]:
    """The batch buckets a tree graph of Q = tree_query_len rows per sequence is captured for: those that a step
    of at most max_batch sequences (None: max_num_seqs) may replay, of at most TREE_GRAPH_MAX_TOKENS rows each;
    [] without a tree length."""
    if tree_query_len is None:
        return []
    if isinstance(tree_query_len, bool) or not isinstance(tree_query_len, int) or \
            not 2 <= tree_query_len <= MAX_TREE_NODES:
        raise ValueError(f"tree_query_len must be None or an int in [2, {MAX_TREE_NODES}], got {tree_query_len!r}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
    buckets = batch_size_buckets(max_num_seqs)
    limit = next((b for b in buckets if b >= (max_batch or max_num_seqs)), buckets[-1])
    return [b for b in buckets if b <= limit and b * tree_query_len <= TREE_GRAPH_MAX_TOKENS]


class GraphInputs(NamedTuple):
    """The static inputs of the graph of one (batch size, q_len), views of DecodeCUDAGraphs.upload's device buffer.
    Byte layout: input_ids | positions | slot_mapping | seq_lens | extras (room for other per-step fields, from
    extras_offset) | block_tables. The block table comes last so that a step copies only the rows it uses."""

    input_ids: torch.Tensor  # int64 [batch * q_len]
    positions: torch.Tensor  # int64 [batch * q_len]
    slot_mapping: torch.Tensor  # int64 [batch * q_len]
    seq_lens: torch.Tensor  # int32 [batch]
    block_tables: torch.Tensor  # int32 [batch, max_blocks_per_seq]
    layout: FieldLayout  # the offsets of the five fields above
    extras_offset: int  # first byte free for the step's other fields
    extras_end: int  # ... up to here (the block table's offset)
    tree_mask: torch.Tensor | None = None  # int64 [batch * q_len]: tree graphs only
    cu_seqlens_q: torch.Tensor | None = None  # int32 [batch + 1]: tree graphs only
    lora_slots: torch.Tensor | None = None  # int32 [batch * q_len]: each row's adapter slot (LoRA graphs only)


class DecodeCUDAGraphs:
    """Captured decode forwards of `model` for every (batch-size bucket, query length), replayed on padded
    batches."""

    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device,
                 query_lens: tuple[int, ...] = (1,), tree_query_len: int | None = None,
                 tree_max_batch: int | None = None, sample: bool = False, lora=None,
                 prev_tokens: torch.Tensor | None = None) -> None:
        self._check_device(device)
        self.model = model
        # multi-LoRA (minillm.lora): graphs that also run every adapted layer's shrink and expand, one segment per
        # row, each row's slot read from the static `lora_slots` input (-1: none). The runner keeps a second set
        # of these beside the plain graphs, for the steps that use adapters.
        self.lora = lora
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.buckets = batch_size_buckets(max_num_seqs)
        self.query_lens = check_query_lens(query_lens)
        # token trees: Q rows per sequence at most, at these buckets (none without a tree method)
        self.tree_buckets = tree_graph_buckets(max_num_seqs, tree_query_len, tree_max_batch)
        self.tree_query_len = tree_query_len if self.tree_buckets else None
        # every graph to capture: (bucket, q_len, tree)
        self.shapes = [(b, q, False) for b in self.buckets for q in self.query_lens]
        self.shapes += [(b, tree_query_len, True) for b in self.tree_buckets]
        layouts = {(b, q, tree): self._layout(b, q, tree) for b, q, tree in self.shapes}
        # every graph's inputs live in this one buffer (graphs replay one at a time, each step rewrites its part)
        self.upload = UploadBuffer(device, max(layout.end for layout, _ in layouts.values()), growable=False)
        self.inputs: dict[tuple[int, int], GraphInputs] = {}
        self.tree_inputs: dict[int, GraphInputs] = {}  # bucket -> a tree graph's inputs
        for (b, q, tree), (layout, extras) in layouts.items():
            views = self.upload.views(layout)
            inputs = GraphInputs(views["input_ids"], views["positions"], views["slot_mapping"], views["seq_lens"],
                                 views["block_tables"], layout, extras, layout.fields["block_tables"][0],
                                 views.get("tree_mask"), views.get("cu_seqlens_q"), views.get("lora_slots"))
            if tree:
                self.tree_inputs[b] = inputs
            else:
                self.inputs[b, q] = inputs
        n = self.buckets[-1]
        self.cu_seqlens_q = {q: torch.arange(0, q * n + 1, q, dtype=torch.int32, device=device)
                             for q in self.query_lens + ((self.tree_query_len,) if self.tree_buckets else ())}
        self._step_views: dict[tuple[int, int, int, int], tuple[torch.Tensor, ...]] = {}
        self.graphs: dict[int, dict[int, object]] = {}  # batch size -> q_len -> torch.cuda.CUDAGraph
        self.outputs: dict[int, dict[int, torch.Tensor]] = {}
        self.tree_graphs: dict[int, tuple[object, torch.Tensor]] = {}  # bucket -> (graph, its output)
        self.num_tree_replays = 0  # tree steps replayed (benchmarks and tests read it)
        self.pool = None
        self.hidden_size, self.dtype = hidden_size, dtype
        # q_len-1 graphs that also gather deferred ids and compute logits and greedy tokens (module docstring)
        self.sample = sample
        # (shared with the other graph set when there are two: either may replay the step before the other's)
        self.prev_tokens = prev_tokens if prev_tokens is not None or not sample else \
            torch.zeros(n, dtype=torch.int64, device=device)
        rows = max(b * q for b, q, _ in self.shapes)  # a LoRA graph's segments: row r alone, of length 1
        self.lora_starts = torch.arange(rows, dtype=torch.int32, device=device) if lora is not None else None
        self.lora_lens = torch.ones(rows, dtype=torch.int32, device=device) if lora is not None else None
        # (bucket, q_len, tree) -> (logits, greedy tokens) of that graph's rows
        self.sampled: dict[tuple[int, int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        # the logits of every sampling graph, in one buffer [most rows, vocab] (graphs replay one at a time):
        # kept per graph they would add up over the buckets (Llama-3-8B, 256 sequences: 1.1 GB, against 66 MB)
        self.sampling_shapes = {(b, q, tree) for b, q, tree in self.shapes
                                if sample and ((q == 1 and not tree) or b * q <= SAMPLED_VERIFY_MAX_ROWS)}
        self.logit_rows = max((b * q for b, q, _ in self.sampling_shapes), default=0)
        self.logits: torch.Tensor | None = None

    def _layout(self, batch: int, q_len: int, tree: bool = False) -> tuple[FieldLayout, int]:
        tokens = batch * q_len
        layout = FieldLayout()
        for name in ("input_ids", "positions", "slot_mapping") + (("tree_mask",) if tree else ()):
            layout.add(name, torch.int64, (tokens,))
        layout.add("seq_lens", torch.int32, (batch,))
        if tree:
            layout.add("cu_seqlens_q", torch.int32, (batch + 1,))
        if self.lora is not None:
            layout.add("lora_slots", torch.int32, (tokens,))
        extras = layout.end
        layout.end += tokens * EXTRA_BYTES_PER_TOKEN
        layout.add("block_tables", torch.int32, (batch, self.max_blocks_per_seq))
        return layout, extras

    # The three CUDA-specific steps, as methods so that a CPU test can stand a recorder in for the graph.
    def _check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")

    def _synchronize(self) -> None:
        torch.cuda.synchronize()

    def _record(self, forward) -> tuple[object, torch.Tensor]:
        """Record `forward()` into a new graph in the shared pool; returns (graph, its output tensor)."""
        graph = torch.cuda.CUDAGraph()
        with graph_capture(graph, pool=self.pool):
            out = forward()
        if self.pool is None:
            self.pool = graph.pool()
        return graph, out

    def _metadata(self, batch: int, q_len: int, tree: bool = False) -> AttentionMetadata:
        """What the captured forward's attention reads: the static inputs. A tree graph's attention takes the
        tree-masked varlen path (tree_mask set, cu_seqlens_q its static buffer): the host lists say Q rows per
        sequence, the upper bound the kernel is compiled for, and are never read again at replay."""
        inputs = self.tree_inputs[batch] if tree else self.inputs[batch, q_len]
        max_len = self.max_blocks_per_seq * self.block_size
        meta = AttentionMetadata(
            cu_seqlens_q=inputs.cu_seqlens_q if tree else self.cu_seqlens_q[q_len][:batch + 1],
            seq_lens=inputs.seq_lens, max_seqlen_q=q_len, max_seqlen_k=max_len, slot_mapping=inputs.slot_mapping,
            block_tables=inputs.block_tables, block_size=self.block_size, seq_lens_list=[q_len] * batch,
            query_lens_list=[q_len] * batch, tree_mask=inputs.tree_mask)
        if self.lora is not None:
            from minillm.lora.layers import LoRAMapping
            rows = inputs.lora_slots.numel()
            meta.lora = LoRAMapping(self.lora_starts[:rows], self.lora_lens[:rows], inputs.lora_slots, 1, None,
                                    rows_covered=True)  # one segment per row
        return meta

    def _pad(self, inputs: GraphInputs, batch: int, q_len: int, tokens: int) -> None:
        """Padding rows from `batch` / `tokens` on: store nothing (slot -1), attend to q_len rows of block 0."""
        inputs.input_ids[tokens:].zero_()
        inputs.positions[tokens:].zero_()
        inputs.slot_mapping[tokens:].fill_(-1)
        inputs.seq_lens[batch:].fill_(q_len)
        inputs.block_tables[batch:].zero_()
        if inputs.lora_slots is not None:
            inputs.lora_slots[tokens:].fill_(-1)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up, then record one graph per (bucket, q_len) and one tree graph per tree bucket, most tokens
        first, all in one memory pool."""
        self._synchronize()
        for batch, q_len, tree in sorted(self.shapes, key=lambda s: (-s[0] * s[1], s[2])):
            meta = self._metadata(batch, q_len, tree)
            inputs = self.tree_inputs[batch] if tree else self.inputs[batch, q_len]
            self._pad(inputs, 0, q_len, 0)  # every row a padding row: valid addresses for the warm-up and capture
            if tree:  # ... each sequence q_len rows over q_len keys, causal
                inputs.tree_mask.fill_(-1)
                inputs.cu_seqlens_q.copy_(self.cu_seqlens_q[q_len][:batch + 1])

            def forward(inputs: GraphInputs = inputs, meta: AttentionMetadata = meta) -> torch.Tensor:
                with forward_context(meta):
                    return self.model(inputs.input_ids, inputs.positions)

            samples = (batch, q_len, tree) in self.sampling_shapes
            if samples:
                def forward(inputs: GraphInputs = inputs, meta: AttentionMetadata = meta, batch: int = batch,
                            rows: int = batch * q_len, decode: bool = q_len == 1 and not tree):
                    if decode:  # async scheduling's deferred ids (verify steps run synchronously: none)
                        resolve_deferred_ids(inputs.input_ids, self.prev_tokens)  # ids >= 0 are kept as they are
                    with forward_context(meta):
                        hidden = self.model(inputs.input_ids, inputs.positions)
                    logits = self.model.compute_logits(hidden)
                    if self.logits is None:  # in the first warm-up (never inside a capture): the shared buffer
                        self.logits = logits.new_empty((self.logit_rows, logits.shape[-1]))
                    self.logits[:rows].copy_(logits)
                    tokens = greedy_tokens(logits)
                    if decode:
                        self.prev_tokens[:batch].copy_(tokens)
                    return hidden, tokens

            forward()  # warm-up: Triton JIT and autotuning happen here, not during capture
            self._synchronize()
            graph, out = self._record(forward)
            if samples:
                out, tokens = out
                self.sampled[batch, q_len, tree] = (self.logits[:batch * q_len], tokens)
            if tree:
                self.tree_graphs[batch] = (graph, out)
                continue
            self.graphs.setdefault(batch, {})[q_len] = graph
            self.outputs.setdefault(batch, {})[q_len] = out
        self._synchronize()

    def samples(self, graph: tuple[int, int] | None, tree: bool = False) -> bool:
        """Whether the replay of `graph` ((bucket, q_len), as PreparedBatch.graph; a tree graph's with `tree`)
        computes the logits and greedy tokens of its rows (`sampled[bucket, q_len, tree]`); the decode graphs (q_len
        1) also gather deferred ids first."""
        return graph is not None and (*graph, tree) in self.sampled

    def gathers_deferred_ids(self, graph: tuple[int, int] | None, tree: bool = False) -> bool:
        """Whether the replay of `graph` puts async scheduling's deferred input ids in place itself: a sampling
        decode graph (q_len 1) does; verify and tree graphs never see deferred ids."""
        return not tree and graph is not None and graph[1] == 1 and self.samples(graph)

    def keep_tokens(self, tokens: torch.Tensor) -> None:
        """Make `tokens` (a step's sampled tokens, not a sampling graph's own greedy ones) what the next replay's
        deferred ids refer to. (Only async steps defer, one row per sequence: at most a bucket's rows.)"""
        if self.sample and tokens.numel() <= self.prev_tokens.numel():
            self.prev_tokens[:tokens.numel()].copy_(tokens)

    def bucket_for(self, batch: int) -> int | None:
        """The smallest captured size >= batch, or None when the batch is too big for any graph."""
        for size in self.buckets:
            if size >= batch:
                return size
        return None

    def plan(self, batch: int, q_len: int, width: int) -> int | None:
        """The bucket whose graph will run a step of `batch` sequences with q_len new tokens each and block tables
        `width` wide, or None when no captured graph fits (the step then runs eagerly)."""
        if not self.graphs or q_len not in self.query_lens or width > self.max_blocks_per_seq:
            return None
        return self.bucket_for(batch)

    def plan_tree(self, batch: int, max_q_len: int, width: int) -> int | None:
        """The bucket whose tree graph will run a tree step of `batch` sequences with at most max_q_len new tokens
        each and block tables `width` wide, or None (no tree graph fits: the step runs as without one)."""
        if not self.tree_graphs or max_q_len > self.tree_query_len or width > self.max_blocks_per_seq:
            return None
        size = self.bucket_for(batch)
        return size if size in self.tree_graphs else None

    def can_run(self, meta: AttentionMetadata) -> bool:
        if not self.graphs or meta.block_tables is None or meta.slot_mapping is None or meta.tree_mask is not None:
            return False
        return (meta.decode_query_len in self.query_lens and self.bucket_for(meta.num_seqs) is not None
                and meta.block_tables.shape[1] <= self.max_blocks_per_seq)

    def step_views(self, size: int, q_len: int, batch: int, width: int) -> tuple[torch.Tensor, ...]:
        """(input_ids, positions, cu_seqlens_q, slot_mapping, seq_lens, block_tables) of a step of `batch`
        sequences with block tables `width` wide, as slices of the graph's static inputs (cached: a decode step
        of the same shape as the last reuses them). block_tables keeps the static table's row stride."""
        key = (size, q_len, batch, width)
        views = self._step_views.get(key)
        if views is None:
            if len(self._step_views) >= 4096:
                self._step_views.clear()
            inputs, tokens = self.inputs[size, q_len], batch * q_len
            views = self._step_views[key] = (
                inputs.input_ids[:tokens], inputs.positions[:tokens], self.cu_seqlens_q[q_len][:batch + 1],
                inputs.slot_mapping[:tokens], inputs.seq_lens[:batch], inputs.block_tables[:batch, :width])
        return views

    def tree_step_views(self, size: int, batch: int, width: int, tokens: int) -> tuple[torch.Tensor, ...]:
        """step_views' six views of a tree step of `tokens` packed rows, and its tree_mask [tokens]."""
        key = (size, -1, batch, width, tokens)
        views = self._step_views.get(key)
        if views is None:
            if len(self._step_views) >= 4096:
                self._step_views.clear()
            inputs = self.tree_inputs[size]
            views = self._step_views[key] = (
                inputs.input_ids[:tokens], inputs.positions[:tokens], inputs.cu_seqlens_q[:batch + 1],
                inputs.slot_mapping[:tokens], inputs.seq_lens[:batch], inputs.block_tables[:batch, :width],
                inputs.tree_mask[:tokens])
        return views

    def replay(self, size: int, q_len: int, tokens: int, tree: bool = False) -> torch.Tensor:
        """Replay the graph of (size, q_len), or the tree graph of bucket `size`, on what its static inputs hold;
        hidden states of the first `tokens` rows. The runner has filled the inputs (padding rows included) with
        the step's one upload."""
        if tree:
            graph, out = self.tree_graphs[size]
            graph.replay()
            self.num_tree_replays += 1
            return out[:tokens]
        self.graphs[size][q_len].replay()
        return self.outputs[size][q_len][:tokens]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Copy a decode step's inputs (device tensors prepared for an eager forward) into the static buffers,
        replay, return hidden states [B * q_len, hidden]. The runner's own steps avoid these copies: it lays a
        graph step out in the static buffers directly (plan / replay)."""
        batch, q_len = meta.num_seqs, meta.decode_query_len
        size = self.bucket_for(batch)
        if size is None or q_len not in self.query_lens or not self.graphs:
            raise ValueError(f"no CUDA graph for a batch of {batch} with {q_len} query tokens each (captured "
                             f"sizes: {self.buckets}, query lengths: {self.query_lens})")
        inputs, width, tokens = self.inputs[size, q_len], meta.block_tables.shape[1], batch * q_len
        inputs.input_ids[:tokens].copy_(input_ids, non_blocking=True)
        inputs.positions[:tokens].copy_(positions, non_blocking=True)
        inputs.slot_mapping[:tokens].copy_(meta.slot_mapping, non_blocking=True)
        inputs.seq_lens[:batch].copy_(meta.seq_lens, non_blocking=True)
        inputs.block_tables[:batch, :width].copy_(meta.block_tables, non_blocking=True)
        if size > batch:
            self._pad(inputs, batch, q_len, tokens)
        return self.replay(size, q_len, tokens)
