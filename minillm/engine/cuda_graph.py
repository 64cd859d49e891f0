"""CUDA graphs for the decode step (chapter 4): record the whole forward once, replay it with one launch.

A decode step of a small batch is latency-bound on the *host*: each layer issues a dozen kernels (norm, qkv
matmul, RoPE, KV store, paged attention, o_proj, norm, gate_up, SiLU*mul, down), each a few microseconds of
GPU work, and Python plus the launch path take about as long per kernel. A CUDA graph records the sequence of
kernels with their arguments (device pointers included) and replays it with one call, so the GPU runs them
back to back. The price: every replay uses the *same* memory addresses and shapes. Hence

* static input buffers (input_ids, positions, slot_mapping, block_tables, seq_lens) that each step copies its
  values into, and one output buffer per captured size, read back after the replay;
* one graph per batch-size bucket (1, 2, 4, 8, 16, 24, 32, ... max_num_seqs); a batch of 5 replays the graph
  of 8, with 3 padding rows whose slot is -1 (their K/V are not stored) and whose seq_len is 1 over block 0
  (a valid address: the kernel reads one row of real memory and the result is thrown away);
* one memory pool shared by every graph (captured largest first, so the smaller ones fit in its blocks):
  the activations of all buckets together cost about what the largest one needs;
* a warm-up call before each capture: Triton compiles (and autotunes, where a kernel is autotuned) on its
  first call, and neither may happen while a graph is being recorded.
Only decode-only batches are replayed: a prefill's token count varies from step to step.

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

from minillm.forward_context import AttentionMetadata, forward_context


def batch_size_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (included even when not a multiple of 8)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs] + list(range(16, max_num_seqs + 1, 8))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeCUDAGraphs:
    """Captured decode forwards of `model` for every batch-size bucket, replayed on padded batches."""

    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self._check_device(device)
        self.model = model
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.buckets = batch_size_buckets(max_num_seqs)
        n = self.buckets[-1]
        # the static inputs: every replay reads from these addresses
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, object] = {}  # batch size -> torch.cuda.CUDAGraph
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.hidden_size, self.dtype = hidden_size, dtype

    # The three CUDA-specific steps, as methods so that a CPU test can stand a recorder in for the graph.
    def _check_device(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")

    def _synchronize(self) -> None:
        torch.cuda.synchronize()

    def _record(self, forward) -> tuple[object, torch.Tensor]:
        """Record `forward()` into a new graph in the shared pool; returns (graph, its output tensor)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = forward()
        if self.pool is None:
            self.pool = graph.pool()
        return graph, out

    def _metadata(self, batch: int) -> AttentionMetadata:
        max_len = self.max_blocks_per_seq * self.block_size
        return AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens_q[:batch + 1], seq_lens=self.seq_lens[:batch], max_seqlen_q=1,
            max_seqlen_k=max_len, slot_mapping=self.slot_mapping[:batch], block_tables=self.block_tables[:batch],
            block_size=self.block_size, seq_lens_list=[1] * batch, query_lens_list=[1] * batch)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up, then record one graph per bucket, largest first, all in one memory pool."""
        self._synchronize()
        for batch in reversed(self.buckets):
            meta = self._metadata(batch)

            def forward(batch: int = batch, meta: AttentionMetadata = meta) -> torch.Tensor:
                with forward_context(meta):
                    return self.model(self.input_ids[:batch], self.positions[:batch])

            forward()  # warm-up: Triton JIT and autotuning happen here, not during capture
            self._synchronize()
            self.graphs[batch], self.outputs[batch] = self._record(forward)
        self._synchronize()

    def bucket_for(self, batch: int) -> int | None:
        """The smallest captured size >= batch, or None when the batch is too big for any graph."""
        for size in self.buckets:
            if size >= batch:
                return size
        return None

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (bool(self.graphs) and meta.is_decode_only and meta.block_tables is not None
                and meta.slot_mapping is not None and self.bucket_for(meta.num_seqs) is not None
                and meta.block_tables.shape[1] <= self.max_blocks_per_seq)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Copy this step's decode inputs into the static buffers, replay, return hidden states [B, hidden]."""
        batch = meta.num_seqs
        size = self.bucket_for(batch)
        if size is None or not self.graphs:
            raise ValueError(f"no CUDA graph for a batch of {batch} (captured sizes: {self.buckets})")
        width = meta.block_tables.shape[1]
        self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:batch].copy_(meta.seq_lens, non_blocking=True)
        self.block_tables[:batch, :width].copy_(meta.block_tables, non_blocking=True)
        if size > batch:  # padding rows: store nothing, attend to one row of block 0, result discarded
            self.slot_mapping[batch:size].fill_(-1)
            self.seq_lens[batch:size].fill_(1)
            self.block_tables[batch:size].zero_()
            self.input_ids[batch:size].zero_()
            self.positions[batch:size].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:batch]
