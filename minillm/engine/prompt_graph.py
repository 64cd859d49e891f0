"""Whole-forward CUDA graphs for a step that is one fresh prompt (chapter 4): time to first token on a small model.

Piecewise graphs (piecewise_graph.py) serve every step with prefill tokens, but they still call attention eagerly
in every layer: on SmolLM2 (30 layers) on an H200 a 40-180-token prompt took 10.3 ms of which the GPU worked 0.9,
the rest being Python and launch work around 30 attention calls (benchmarks/RESULTS.md, "Ninth session"). The
commonest prefill, though, has a shape a graph can hold: one sequence, nothing cached before it (a new request
without a prefix-cache hit, or the first chunk of a chunked prompt), so its attention is FlashAttention over its own
keys with q_len == seq_len. Such a step of n tokens replays the whole forward recorded for the smallest token
bucket T >= n:

    static inputs   input_ids[:T], positions[:T], slot_mapping[:T] (rows n..T-1 get slot -1: stored nowhere)
                    cu_seqlens = [0, n] (int32, on the device)
    attention       recorded with max_seqlen_q = T: the grid covers T query rows, and FlashAttention's programs
                    read the sequence's end from cu_seqlens, so the tiles past n return at once and the rows
                    past n in the last tile are masked; rows n..T-1 of every other op are padding that no real
                    row reads (every op outside attention is row by row, as for the piecewise graphs; MoE
                    layers, which are not, never get here)

The metadata's Python lists ([T], [T]) choose FlashAttention at capture; they are never read again at replay.
Graphs of every bucket share one memory pool of their own, recorded largest first (a replay leaves nothing alive
that another graph of the pool needs: the runner reads the output before the next forward).
"""
from __future__ import annotations

import torch
from torch import nn

from minillm.engine.piecewise_graph import token_buckets
from minillm.forward_context import AttentionMetadata, forward_context
from minillm.kernels.hardware import graph_capture


class PromptCUDAGraphs:
    """The forward of `model` recorded once per token bucket for steps that are one fresh prompt."""

    def __init__(self, model: nn.Module, max_tokens: int, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model, self.device = model, device
        self.buckets = token_buckets(max_tokens)
        t = self.buckets[-1]
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.int64, device=device)
        self.cu_seqlens = torch.tensor([0, t], dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    def _metadata(self, tokens: int) -> AttentionMetadata:
        """What the recorded attention reads: the static buffers, one sequence of `tokens` fresh tokens."""
        return AttentionMetadata(cu_seqlens_q=self.cu_seqlens, seq_lens=self.cu_seqlens[1:], max_seqlen_q=tokens,
                                 max_seqlen_k=tokens, slot_mapping=self.slot_mapping[:tokens],
                                 seq_lens_list=[tokens], query_lens_list=[tokens])

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and record every bucket, largest first. Every slot is -1 meanwhile: no cache is touched."""
        self.slot_mapping.fill_(-1)
        for tokens in sorted(self.buckets, reverse=True):
            self.cu_seqlens[1] = tokens
            meta = self._metadata(tokens)
            ids, pos = self.input_ids[:tokens], self.positions[:tokens]
            with forward_context(meta):
                self.model(ids, pos)  # Triton compiles and autotunes here, never while recording
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with forward_context(meta), graph_capture(graph, pool=self.pool):
                out = self.model(ids, pos)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[tokens], self.outputs[tokens] = graph, out
        torch.cuda.synchronize(self.device)

    def bucket_for(self, tokens: int) -> int | None:
        return next((size for size in self.buckets if size >= tokens), None)

    def can_run(self, meta: AttentionMetadata, tokens: int) -> bool:
        """One sequence with nothing cached before its `tokens` new tokens (q_len == seq_len), no token tree,
        storing its K/V, and a bucket that holds it."""
        q_lens, seq_lens = meta.query_lens_list, meta.seq_lens_list
        return (bool(self.graphs) and q_lens is not None and len(q_lens) == 1 and q_lens == seq_lens
                and q_lens[0] == tokens and meta.tree_mask is None and meta.slot_mapping is not None
                and self.bucket_for(tokens) is not None)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [n, hidden] of the prompt's n tokens; the caller has checked can_run (the runner does,
        once per step), so only the bucket is looked up here."""
        n = input_ids.shape[0]
        size = self.bucket_for(n)
        if size is None or size not in self.graphs:
            raise ValueError(f"no prompt graph for {n} tokens (captured buckets: {sorted(self.graphs)})")
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:size].fill_(-1)
        self.cu_seqlens[1:].copy_(meta.cu_seqlens_q[1:2], non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:n]
