"""The model runner: from a ScheduledBatch to sampled token ids (chapters 2 and 5).

Each step it
  1. applies the scheduler's block operations (swap out, swap in, copy-on-write) to the KV cache,
  2. packs the new tokens of every scheduled sequence into one flat `input_ids` [T] / `positions` [T] pair,
  3. builds the AttentionMetadata (cu_seqlens_q, seq_lens, slot_mapping, block_tables) that tells every
     Attention layer which token belongs to which sequence and where keys and values live,
  4. runs the forward inside `forward_context(...)`,
  5. keeps the hidden state of the *last* new token of each sequence that needs a sample (a prefill that is
     not finished yet, i.e. a chunk of a long prompt, needs none), computes logits for those rows only
     (the vocabulary projection is the most expensive matmul of a small model: no point doing it for all T)
  6. samples.

The runner owns the KV cache tensors: it allocates them once and hands each Attention module its layer's
views through the module's `k_cache` / `v_cache` attributes.

Launch overhead (chapter 4), set by `configure(engine_config)` (or the `engine_config=` argument):
on CUDA with `enforce_eager=False`, decode-only steps replay CUDA graphs captured up front for batch-size
buckets (minillm/engine/cuda_graph.py); every other step runs eagerly. `compile=True` runs the forward through
`torch.compile(dynamic=True)` instead (an alternative to graphs, not a complement: no graphs are captured).
The operator backend itself (torch reference or Triton kernels) is the model's: `model.attention_backend`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.block_table import slot_mapping as slot_mapping_reference
from minillm.engine.kv_cache import KVCache
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.forward_context import AttentionMetadata, forward_context
from minillm.layers.sampler import Sampler

from minillm.hooks import dispatch

# A prefill chunk at least this long gets its slot mapping from torch ops instead of a Python list comprehension
# (only when no learner override is active: an override is always called, so it is always exercised).
_VECTORISED_SLOTS_FROM = 512


@dataclass
class PreparedBatch:
    """The tensors one forward needs, plus which rows of its output get sampled."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    metadata: AttentionMetadata
    sample_indices: torch.Tensor  # int64 [S]: row of the last new token of each sampled sequence
    sample_seqs: list[int]  # index into batch.seqs of each sampled row


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that hold a KV cache (they expose `k_cache`/`v_cache`), in layer order."""
    return [m for m in model.modules() if hasattr(m, "k_cache") and hasattr(m, "v_cache")]


class ModelRunner:
    def __init__(self, model: nn.Module, model_config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, seed: int = 0, num_cpu_blocks: int = 0,
                 engine_config: EngineConfig | None = None) -> None:
        self.model = model
        self.model_config = model_config
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.sampler = Sampler()
        # the generator shared by every request without its own seed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.kv_cache = KVCache(model_config, num_blocks, block_size, dtype, device, num_cpu_blocks)
        self.attention_layers = attention_modules(model)
        if len(self.attention_layers) != model_config.num_hidden_layers:
            raise ValueError(f"the model has {len(self.attention_layers)} attention modules with k_cache/v_cache, "
                             f"but the config says num_hidden_layers={model_config.num_hidden_layers}")
        self.bind_kv_cache()
        self.engine_config: EngineConfig | None = None
        self.cuda_graphs = None  # DecodeCUDAGraphs once captured
        self.forward_fn = model
        if engine_config is not None:
            self.configure(engine_config)

    def configure(self, engine_config: EngineConfig) -> None:
        """Apply the engine's launch options: CUDA graphs for decode (CUDA, enforce_eager=False) or
        torch.compile (compile=True). Graphs are captured here, before the first request."""
        self.engine_config = engine_config
        self.cuda_graphs, self.forward_fn = None, self.model
        if engine_config.compile:
            # Attention reads per-step Python metadata (lengths, the forward context): traced, it would recompile
            # every step. Kept out of the graph (vLLM's "piecewise" compilation), the rest fuses between the
            # attention calls, with symbolic token counts (dynamic=True).
            for module in self.attention_layers:
                if not getattr(module.forward, "_minillm_not_compiled", False):
                    module.forward = torch.compiler.disable(module.forward)
                    module.forward._minillm_not_compiled = True
            self.forward_fn = torch.compile(self.model, dynamic=True)
            return
        if engine_config.enforce_eager or self.device.type != "cuda":
            return
        if getattr(self.model, "attention_backend", "auto") not in ("auto", "triton"):
            # the torch path slices by Python lists of lengths, which a graph would freeze at capture time
            raise ValueError(f"CUDA graphs (enforce_eager=False) need the triton operator backend, got "
                             f"attention_backend={self.model.attention_backend!r}; use 'auto'/'triton' or "
                             f"enforce_eager=True")
        from minillm.engine.cuda_graph import DecodeCUDAGraphs
        max_model_len = engine_config.max_model_len or self.model_config.max_position_embeddings
        graphs = DecodeCUDAGraphs(self.model, engine_config.max_num_seqs, -(-max_model_len // self.block_size),
                                  self.block_size, self.model_config.hidden_size, self.dtype, self.device)
        with torch.inference_mode():
            graphs.capture()
        self.cuda_graphs = graphs

    def bind_kv_cache(self) -> None:
        """Point every attention module at its layer's views of this runner's cache. Called again before each
        forward when another runner (a second engine over the same model object) has rebound them meanwhile."""
        for index, module in enumerate(self.attention_layers):
            module.k_cache, module.v_cache = self.kv_cache.layer(index)

    # -- block operations ---------------------------------------------------------------------------------
    def apply_block_ops(self, batch: ScheduledBatch) -> None:
        """Swap-outs first (they free device blocks that swap-ins or copies may then reuse), then swap-ins,
        then copy-on-write."""
        self.kv_cache.swap_out(batch.blocks_to_swap_out)
        self.kv_cache.swap_in(batch.blocks_to_swap_in)
        self.kv_cache.copy(batch.blocks_to_copy)

    # -- input preparation --------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> PreparedBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        cu_seqlens_q = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        sample_indices: list[int] = []
        sample_seqs: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            if n < 1 or end > seq.num_tokens:
                raise ValueError(f"sequence {seq.request_id!r}: cannot compute tokens {start}..{end - 1} of "
                                 f"{seq.num_tokens}")
            if len(seq.block_table) * bs < end:
                raise ValueError(f"sequence {seq.request_id!r}: block_table {seq.block_table} holds "
                                 f"{len(seq.block_table) * bs} slots, {end} needed")
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(self.slot_mapping(seq.block_table, start, end))
            cu_seqlens_q.append(cu_seqlens_q[-1] + n)
            seq_lens.append(end)
            query_lens.append(n)
            if end == seq.num_tokens:  # reached the end of what is known: sample the next token
                sample_indices.append(cu_seqlens_q[-1] - 1)
                sample_seqs.append(i)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        block_tables = [seq.block_table + [-1] * (max_blocks - len(seq.block_table)) for seq in batch.seqs]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        metadata = AttentionMetadata(
            cu_seqlens_q=tensor(cu_seqlens_q, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            max_seqlen_q=max(query_lens),
            max_seqlen_k=max(seq_lens),
            slot_mapping=tensor(slot_mapping, torch.int64),
            block_tables=tensor(block_tables, torch.int32),
            block_size=bs,
            seq_lens_list=seq_lens,
            query_lens_list=query_lens,
        )
        return PreparedBatch(tensor(input_ids, torch.int64), tensor(positions, torch.int64), metadata,
                             tensor(sample_indices, torch.int64), sample_seqs)

    def slot_mapping(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions start..end-1 (exercise ch05.slot_mapping, through `dispatch`)."""
        fn = dispatch("ch05.slot_mapping", slot_mapping_reference)
        if fn is slot_mapping_reference and end - start >= _VECTORISED_SLOTS_FROM:
            # the same formula over a long chunk, as tensor ops (a long list comprehension costs ~1 ms / 8k tokens)
            bs = self.block_size
            positions = torch.arange(start, end)
            table = torch.tensor(block_table, dtype=torch.int64)
            return (table[positions // bs] * bs + positions % bs).tolist()
        return fn(block_table, start, end, self.block_size)

    # -- the step -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int | None]:
        """Run one step; returns, for each seqs[i], the sampled token id or None (no sample this step)."""
        self.apply_block_ops(batch)
        results: list[int | None] = [None] * len(batch.seqs)
        if batch.is_empty:
            return results
        prepared = self.prepare(batch)
        if self.attention_layers[0].k_cache.data_ptr() != self.kv_cache.storage.data_ptr():
            self.bind_kv_cache()
        hidden = self.forward(prepared)
        if not prepared.sample_seqs:
            return results
        logits = self.model.compute_logits(hidden[prepared.sample_indices])
        seqs = [batch.seqs[i] for i in prepared.sample_seqs]
        tokens = self.sample(logits, seqs)
        for i, token in zip(prepared.sample_seqs, tokens):
            results[i] = token
        return results

    def forward(self, prepared: PreparedBatch) -> torch.Tensor:
        """Hidden states [T, hidden]: a CUDA graph replay for a decode-only batch when graphs are captured,
        else the (possibly compiled) eager forward."""
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(prepared.metadata):
            return self.cuda_graphs.run(prepared.input_ids, prepared.positions, prepared.metadata)
        with forward_context(prepared.metadata):
            return self.forward_fn(prepared.input_ids, prepared.positions)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        params = [s.sampling_params for s in seqs]
        temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=self.device)
        top_ks = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=self.device)
        top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=self.device)
        tokens = self.sampler(logits, temperatures, top_ks, top_ps,
                              generators=[s.generator for s in seqs], default_generator=self.generator)
        return tokens.tolist()
