"""Piecewise CUDA graphs: steps with prefill tokens replayed as graphs between eager attention calls (chapter 4).

A decode step has a fixed shape per batch size, so cuda_graph.py records the whole forward once per size. A step
that carries prefill tokens (a prompt, a chunk of one, a prompt mixed with running decodes) does not: its
attention depends on how the tokens split into sequences and how much each has cached, which changes every step.
Run eagerly, such a step pays Python and the launch path for every kernel of every layer: a dozen launches a
layer, thirty layers, a few microseconds each, which on a small model is more than the GPU work itself.

vLLM's answer ("piecewise" CUDA graphs) is to cut the forward at the attention calls. Everything else in a
layer (RMSNorm, the QKV projection, RoPE, o_proj, the MLP) depends only on the number of tokens T, row by row:
it can be recorded once per token-count bucket. Attention runs eagerly in between, with the step's real
metadata. A forward of L layers becomes L + 1 graphs and L attention calls:

    graph 0      embed, layer 0's norm, qkv, rope                     -> q0, k0, v0  (static addresses)
    eager        out0[:n] = attention_0(q0[:n], k0[:n], v0[:n])        (the step's lengths and block tables)
    graph 1      layer 0's o_proj, norm, MLP; layer 1's norm, qkv, rope -> q1, k1, v1
    ...
    graph L      layer L-1's o_proj, norm, MLP; the final norm          -> hidden

How the cuts are made. The model's own forward is run once per bucket while the graphs are recorded. Each attention
module's forward is swapped for a stand-in that ends the graph being recorded (capture_end), keeps q, k and v
(outputs of that graph, so their addresses are fixed), allocates the static output that attention will fill,
begins recording the next graph and hands that output on as the attention's result. No model code knows about
the cuts: any model whose attention goes through these modules is cut the same way.

The same cut serves the verify steps of token trees (speculative decoding, minillm/speculative/tree.py): their
nodes attend through a tree mask, which breaks the whole-forward decode graphs (their attention is recorded with
a fixed causal shape) but not the pieces, whose attention runs eagerly with the step's mask.

Padding. A step of n tokens replays the smallest bucket T >= n. The rows n..T-1 hold whatever the inputs held
before (valid token ids and positions): every piece works row by row, so they never touch the real rows, and
attention only ever sees rows 0..n-1. Models whose non-attention layers mix rows (an MoE with expert capacity)
are not cut; they run eagerly. Heads that read the final norm's input (EAGLE, MTP) get it through the runner's
forward hook, whose copy into a static buffer is recorded in the last piece (launch_setup._keep_hidden_states).

Memory. All graphs share one pool, recorded largest bucket first. A tensor that lives from one graph into the
next (the residual stream, q/k/v) is still referenced while the next graph is recorded, so that graph cannot
reuse its memory; graphs of one bucket replay in the order they were recorded; graphs of different buckets never
run interleaved. Those are the conditions under which sharing a pool is safe.
"""
from __future__ import annotations

import torch
from torch import nn

from minillm.forward_context import AttentionMetadata, forward_context
from minillm.kernels.hardware import paused_gc

TOKEN_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
# Steps of more tokens run eagerly. Graphs pay where a step is launch-bound; a big step is GEMM-bound, and there a
# bucket's padding (up to 1.5x the rows) costs more than the launches it saves. Measured on the H200 (8B shape,
# 256 requests of 100..1024 tokens): buckets up to 2048 made the run 15% slower than eager mixed steps. vLLM's
# default largest capture size is 512 as well.
MAX_PIECEWISE_TOKENS = 512


def token_buckets(max_tokens: int) -> list[int]:
    """The bucket sizes up to max_tokens (at most 1.5x padding between neighbours); max_tokens itself closes the
    list when it lies between two of them."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    sizes = [t for t in TOKEN_BUCKETS if t <= max_tokens]
    if not sizes or (sizes[-1] < max_tokens and sizes[-1] < TOKEN_BUCKETS[-1]):
        sizes.append(min(max_tokens, TOKEN_BUCKETS[-1]))
    return sizes


class _Piece:
    """One cut: the attention module that runs eagerly there, its q/k/v (written by the graph before) and the
    output buffer the graph after reads; with `rope` (the model hands RoPE to attention, which fuses it with the
    KV store) also the RotaryEmbedding and the positions buffer, a static input of every graph, and Qwen3's q/k
    norms (`qk_norm`), which run inside the attention's eager launch too."""

    __slots__ = ("attention", "q", "k", "v", "out", "positions", "rope", "qk_norm")

    def __init__(self, attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, positions: torch.Tensor | None = None, rope: nn.Module | None = None,
                 qk_norm: tuple | None = None) -> None:
        self.attention, self.q, self.k, self.v, self.out = attention, q, k, v, out
        self.positions, self.rope, self.qk_norm = positions, rope, qk_norm

    def __call__(self, n: int) -> torch.Tensor:
        """The attention of the first n tokens (eager, between two graphs)."""
        if self.rope is None:
            return self.attention(self.q[:n], self.k[:n], self.v[:n], qk_norm=self.qk_norm)
        return self.attention(self.q[:n], self.k[:n], self.v[:n], self.positions[:n], self.rope,
                              qk_norm=self.qk_norm)


class PiecewiseCUDAGraphs:
    """The forward of `model` recorded as len(attention_modules) + 1 graphs per token bucket."""

    def __init__(self, model: nn.Module, attention_modules: list[nn.Module], max_tokens: int,
                 device: torch.device, lora=None) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if not attention_modules:
            raise ValueError("piecewise graphs cut the forward at attention modules; the model has none")
        self.model, self.attention_modules = model, list(attention_modules)
        self.buckets = token_buckets(max_tokens)
        t = self.buckets[-1]
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.pieces: dict[int, list[_Piece]] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.device = device
        # multi-LoRA (minillm.lora): pieces that also run every adapted layer's shrink and expand, each row its own
        # segment of length 1 whose slot the step writes into `lora_slots` (-1: none); the runner keeps a second
        # set of these for the steps that use adapters
        self.lora = None
        if lora is not None:
            from minillm.lora.layers import LoRAMapping
            self.lora_slots = torch.full((t,), -1, dtype=torch.int32, device=device)
            self.lora = LoRAMapping(torch.arange(t, dtype=torch.int32, device=device),
                                    torch.ones(t, dtype=torch.int32, device=device), self.lora_slots, 1, None,
                                    rows_covered=True)

    # -- recording ----------------------------------------------------------------------------------------
    def _warmup_metadata(self, tokens: int) -> AttentionMetadata:
        """One fresh prompt of `tokens` tokens whose K/V are not stored (slot -1): the warm-up touches no cache.
        With LoRA, the static mapping of the first `tokens` rows (the recording reads it too)."""
        cu = torch.tensor([0, tokens], dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(cu_seqlens_q=cu, seq_lens=cu[1:], max_seqlen_q=tokens, max_seqlen_k=tokens,
                                 slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=self.device),
                                 block_tables=None, seq_lens_list=[tokens], query_lens_list=[tokens])
        if self.lora is not None:
            lora = self.lora
            meta.lora = type(lora)(lora.seg_starts[:tokens], lora.seg_lens[:tokens], lora.seg_slots[:tokens], 1, None,
                                   rows_covered=True)
        return meta

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and record every bucket, largest first, on a side stream, in one shared pool."""
        stream = torch.cuda.Stream(self.device)
        if self.pool is None:  # one private memory pool for every graph of every bucket
            self.pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize(self.device)
        for tokens in sorted(self.buckets, reverse=True):
            ids, pos = self.input_ids[:tokens], self.positions[:tokens]
            meta = self._warmup_metadata(tokens)
            with forward_context(meta):
                self.model(ids, pos)  # Triton compiles and autotunes here, never while recording
            torch.cuda.synchronize(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            # (the pieces never read the metadata but for a LoRA set's static mapping: attention is cut out)
            with torch.cuda.stream(stream), paused_gc(), forward_context(meta if self.lora is not None else None):
                self._record(tokens, ids, pos)
            torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def _record(self, tokens: int, ids: torch.Tensor, pos: torch.Tensor) -> None:
        graphs: list[torch.cuda.CUDAGraph] = []
        pieces: list[_Piece] = []
        state = {"graph": self._begin()}

        def cut(module: nn.Module):
            def stand_in(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None,
                         rope: nn.Module | None = None, qk_norm: tuple | None = None) -> torch.Tensor:
                state["graph"].capture_end()
                graphs.append(state["graph"])
                out = torch.zeros_like(q)  # outside any recording: an ordinary, long-lived allocation
                pieces.append(_Piece(module, q, k, v, out, positions, rope, qk_norm))
                state["graph"] = self._begin()
                return out
            return stand_in

        saved = [module.__dict__.get("forward") for module in self.attention_modules]
        for module in self.attention_modules:
            module.forward = cut(module)  # an instance attribute shadows the class's forward
        try:
            hidden = self.model(ids, pos)
            state["graph"].capture_end()
            graphs.append(state["graph"])
        except BaseException:
            if torch.cuda.is_current_stream_capturing():
                state["graph"].capture_end()
            raise
        finally:
            for module, forward in zip(self.attention_modules, saved):
                del module.forward
                if forward is not None:  # e.g. a forward kept out of torch.compile: put it back
                    module.forward = forward
        if len(pieces) != len(self.attention_modules):
            raise RuntimeError(f"the forward called attention {len(pieces)} times for "
                               f"{len(self.attention_modules)} attention modules: cannot cut it into pieces")
        self.graphs[tokens], self.pieces[tokens], self.outputs[tokens] = graphs, pieces, hidden

    def _begin(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        return graph

    # -- replay -------------------------------------------------------------------------------------------
    def bucket_for(self, tokens: int) -> int | None:
        for size in self.buckets:
            if size >= tokens:
                return size
        return None

    def can_run(self, meta: AttentionMetadata, tokens: int) -> bool:
        """Any step of at most the largest bucket's tokens: prefills, mixed steps, and token-tree verify steps
        (speculative decoding's trees: the tree mask, like every other shape of the step, lives in the metadata
        that the eager attention calls read, so the recorded pieces never see it)."""
        return bool(self.graphs) and self.bucket_for(tokens) is not None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            lora_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [n, hidden] for this step's n tokens; call inside the step's forward_context. A LoRA set
        takes each row's adapter slot (`lora_slots`, int32 [n], -1: none)."""
        n = input_ids.shape[0]
        size = self.bucket_for(n)
        if size is None or size not in self.graphs:
            raise ValueError(f"no piecewise graph for {n} tokens (captured buckets: {sorted(self.graphs)})")
        if (lora_slots is None) != (self.lora is None):
            raise ValueError("a LoRA set of piecewise graphs needs the step's lora_slots, a plain set none")
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        if lora_slots is not None:  # the padding rows keep earlier (valid) slots: their rows are discarded
            self.lora_slots[:n].copy_(lora_slots, non_blocking=True)
        graphs, pieces = self.graphs[size], self.pieces[size]
        for graph, piece in zip(graphs, pieces):
            graph.replay()
            piece.out[:n].copy_(piece(n))
        graphs[-1].replay()
        return self.outputs[size][:n]
