"""The model runner: from a StepInput to sampled token ids (chapters 2 and 5). It lives in a worker.

Each step it
  1. applies the scheduler's block operations (swap out, swap in, copy-on-write) to the KV cache,
  2. turns the step's packed lists into tensors: `input_ids` [T], `positions` [T], and the AttentionMetadata
     (cu_seqlens_q, seq_lens, slot_mapping, block_tables) that tells every Attention layer which token belongs
     to which sequence and where keys and values live,
  3. runs the forward inside `forward_context(...)`,
  4. keeps the hidden states of the rows that need a sample: the *last* new token of each sequence whose step
     reached its end (a chunk of a long prompt needs none), or its last 1 + k rows when it carries k draft
     tokens (the verify step of speculative decoding); computes logits for those rows only (the vocabulary
     projection is the most expensive matmul of a small model: no point doing it for all T),
  5. samples, each request with its own generator when it asked for a seed,
  6. only when a request asked (SamplingParams.logprobs / prompt_logprobs): log_softmax in fp32 of the raw logits
     of its sampled rows, and of the prefill rows that score its prompt tokens (`token_logprobs`),
  7. only when the speculative method drafts from the target's features (Medusa, EAGLE, MTP: chapter 9) and the
     step asks (StepInput.return_hidden_states): every row's last hidden state, after the final norm (the forward's
     output) or before it (the residual stream, caught by a hook on the final norm; with CUDA graphs the hook
     copies it into a static buffer inside the captured graph, so a replay refreshes it too).

The runner owns the KV cache tensors: it allocates them once and hands each Attention module its layer's
views through the module's `k_cache` / `v_cache` attributes.

Launch overhead (chapter 4), set by `configure(engine_config)` (or the `engine_config=` argument):
on CUDA with `enforce_eager=False` (the default there), decode-only steps replay CUDA graphs captured up front
for batch-size buckets (minillm/engine/cuda_graph.py); every other step runs eagerly. `compile=True` runs the
forward through `torch.compile(dynamic=True)` instead (an alternative to graphs, not a complement).
The operator backend itself (torch reference or Triton kernels) is the model's (minillm.layers.backend).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.kv_cache import KVCache
from minillm.engine.kv_scales import calibrate_kv_scales
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.step_input import StepInput, StepOutput, TokenLogprobs, build_step_input
from minillm.forward_context import AttentionMetadata, forward_context
from minillm.layers.sampler import Sampler


@dataclass
class PreparedBatch:
    """The tensors one forward needs, plus which rows of its output get sampled."""

    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    metadata: AttentionMetadata
    sample_indices: torch.Tensor  # int64 [S]: the rows that get sampled, sequence by sequence
    sample_seqs: list[int]  # index of the sequence each sampled row belongs to


def token_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """Row i of `logits` [R, V] scores token_ids[i] (its log-probability and 1-based rank) and lists its
    num_top[i] most likely tokens. log_softmax in fp32 over the raw logits: the model's own distribution, before
    temperature or top-k/top-p (vLLM's default). Ties rank the same (rank = 1 + tokens strictly more likely)."""
    if logits.dim() != 2 or logits.shape[0] != len(token_ids) or len(num_top) != len(token_ids):
        raise ValueError(f"need [rows, vocab] logits with one token id and one num_top per row, got shape "
                         f"{tuple(logits.shape)}, {len(token_ids)} ids, {len(num_top)} num_top")
    if not token_ids:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(token_ids, dtype=torch.int64, device=logprobs.device).unsqueeze(-1)
    chosen = logprobs.gather(-1, ids)
    ranks = (logprobs > chosen).sum(-1) + 1
    width = min(max(num_top), logprobs.shape[-1])
    top_lp, top_ids = logprobs.topk(width, dim=-1) if width > 0 else (logprobs[:, :0], ids[:, :0])
    chosen, ranks, top_lp, top_ids = chosen.squeeze(-1).tolist(), ranks.tolist(), top_lp.tolist(), top_ids.tolist()
    return [TokenLogprobs(token_ids[i], chosen[i], ranks[i], top_ids[i][:k], top_lp[i][:k])
            for i, k in enumerate(num_top)]


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
        self._generators: dict[str, torch.Generator] = {}  # request_id -> its own generator (seeded requests)
        self.kv_cache = KVCache(model_config, num_blocks, block_size, dtype, device, num_cpu_blocks,
                                kv_cache_dtype=engine_config.kv_cache_dtype if engine_config is not None else "auto")
        self.attention_layers = attention_modules(model)
        if len(self.attention_layers) != model_config.num_hidden_layers:
            raise ValueError(f"the model has {len(self.attention_layers)} attention modules with k_cache/v_cache, "
                             f"but the config says num_hidden_layers={model_config.num_hidden_layers}")
        self.bind_kv_cache()
        if self.kv_cache.scales is not None:  # an fp8 cache: fix its scales before any step or CUDA graph reads them
            calibrate_kv_scales(model, self.attention_layers, self.kv_cache, model_config)
        self.engine_config: EngineConfig | None = None
        self.cuda_graphs = None  # DecodeCUDAGraphs once captured
        self.forward_fn = model
        self.hidden_state_kind: str | None = None  # "post_norm" / "pre_norm": what return_hidden_states returns
        self._pre_norm: torch.Tensor | None = None  # the last forward's residual stream before the final norm
        self._graph_pre_norm: torch.Tensor | None = None  # the static copy of it that captured graphs write
        self._pre_norm_hook = None
        self._capturing_graphs = False  # only this runner's own captures record the pre-norm copy
        if engine_config is not None:
            self.configure(engine_config)

    def configure(self, engine_config: EngineConfig) -> None:
        """Apply the engine's launch options: CUDA graphs for decode (CUDA, enforce_eager=False) or
        torch.compile (compile=True). Graphs are captured here, before the first request."""
        self.engine_config = engine_config
        self.cuda_graphs, self.forward_fn = None, self.model
        from minillm.speculative.config import hidden_state_kind, verify_query_lens
        # before any capture: a graph records the pre-norm copy only if the hook exists when it is captured
        self._keep_hidden_states(hidden_state_kind(engine_config),
                                 engine_config.max_num_seqs * max(verify_query_lens(engine_config)))
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
        # query lengths (1,) or (1, 1 + k) with speculative decoding
        graphs = DecodeCUDAGraphs(self.model, engine_config.max_num_seqs, -(-max_model_len // self.block_size),
                                  self.block_size, self.model_config.hidden_size, self.dtype, self.device,
                                  query_lens=verify_query_lens(engine_config))
        with torch.inference_mode():
            self._capturing_graphs = True
            try:
                graphs.capture()
            finally:
                self._capturing_graphs = False
        self.cuda_graphs = graphs

    def _keep_hidden_states(self, kind: str | None, max_graph_tokens: int) -> None:
        """Prepare what return_hidden_states needs: for "pre_norm", a forward hook on the final norm (the fused
        residual norm returns (normed, residual stream)); nothing for "post_norm" (the forward's own output)."""
        if kind not in (None, "post_norm", "pre_norm"):
            raise ValueError(f"hidden state kind must be None, 'post_norm' or 'pre_norm', got {kind!r}")
        self.hidden_state_kind = kind
        if kind != "pre_norm" or self._pre_norm_hook is not None:
            return
        final_norm = getattr(getattr(self.model, "model", None), "norm", None)
        if not isinstance(final_norm, nn.Module):
            raise ValueError(f"pre-norm hidden states need the model's final norm at model.norm; "
                             f"{type(self.model).__name__} has none")
        if self.device.type == "cuda":
            self._graph_pre_norm = torch.empty(max_graph_tokens, self.model_config.hidden_size, dtype=self.dtype,
                                               device=self.device)
        runner = weakref.ref(self)  # the hook must not keep a finished engine's runner (and its KV pool) alive

        def keep_pre_norm(module: nn.Module, inputs: tuple, output: object) -> None:
            me = runner()
            if me is None or not isinstance(output, tuple):
                return
            stream = output[1]
            # another engine sharing these weights may be capturing its own graphs: not this buffer's business
            if me._capturing_graphs and torch.cuda.is_current_stream_capturing():
                me._graph_pre_norm[:stream.shape[0]].copy_(stream)  # recorded: every replay refreshes it
            me._pre_norm = stream
        self._pre_norm_hook = final_norm.register_forward_hook(keep_pre_norm)
        weakref.finalize(self, self._pre_norm_hook.remove)

    def bind_kv_cache(self) -> None:
        """Point every attention module at its layer's views of this runner's cache. Called again before each
        forward when another runner (a second engine over the same model object) has rebound them meanwhile."""
        for index, module in enumerate(self.attention_layers):
            module.k_cache, module.v_cache = self.kv_cache.layer(index)
            module.k_scale, module.v_scale = self.kv_cache.layer_scales(index)  # (None, None) unless fp8

    # -- block operations ---------------------------------------------------------------------------------
    def apply_block_ops(self, step: StepInput | ScheduledBatch) -> None:
        """Swap-outs first (they free device blocks that swap-ins or copies may then reuse), then swap-ins,
        then copy-on-write. Tree-verify slot copies (StepInput.slots_to_copy) go before all three: they finish
        the previous step, whose blocks this step's operations may move or reuse."""
        self.kv_cache.copy_slots(getattr(step, "slots_to_copy", []))
        self.kv_cache.swap_out(step.blocks_to_swap_out)
        self.kv_cache.swap_in(step.blocks_to_swap_in)
        self.kv_cache.copy(step.blocks_to_copy)

    # -- input preparation --------------------------------------------------------------------------------
    def prepare(self, step: StepInput | ScheduledBatch) -> PreparedBatch:
        """Tensors for one forward. A ScheduledBatch (tests, notebooks) is flattened with build_step_input
        first; the engine sends StepInputs."""
        if isinstance(step, ScheduledBatch):
            step = build_step_input(step, self.block_size)
        if step.block_size != self.block_size:
            raise ValueError(f"step built for block_size={step.block_size}, the cache has {self.block_size}")
        cu_seqlens_q = [0]
        sample_indices: list[int] = []
        sample_seqs: list[int] = []
        for i, (n, k) in enumerate(zip(step.query_lens, step.num_sampled)):
            cu_seqlens_q.append(cu_seqlens_q[-1] + n)
            sample_indices.extend(range(cu_seqlens_q[-1] - k, cu_seqlens_q[-1]))
            sample_seqs.extend([i] * k)
        max_blocks = max(len(table) for table in step.block_tables)
        block_tables = [table + [-1] * (max_blocks - len(table)) for table in step.block_tables]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        metadata = AttentionMetadata(
            cu_seqlens_q=tensor(cu_seqlens_q, torch.int32),
            seq_lens=tensor(step.seq_lens, torch.int32),
            max_seqlen_q=max(step.query_lens),
            max_seqlen_k=max(step.seq_lens),
            slot_mapping=tensor(step.slot_mapping, torch.int64),
            block_tables=tensor(block_tables, torch.int32),
            block_size=self.block_size,
            seq_lens_list=list(step.seq_lens),
            query_lens_list=list(step.query_lens),
        )
        if step.tree_masks is not None:  # token trees: ancestor bitmasks; -1 (causal) for the other rows
            masks = [m if m is not None else [-1] * n for m, n in zip(step.tree_masks, step.query_lens)]
            metadata.tree_mask = tensor([b for m in masks for b in m], torch.int64)
        return PreparedBatch(tensor(step.input_ids, torch.int64), tensor(step.positions, torch.int64), metadata,
                             tensor(sample_indices, torch.int64), sample_seqs)

    # -- the step -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, step: StepInput) -> StepOutput:
        """Run one step; for each sequence, the tokens sampled at its last num_sampled rows."""
        for request_id in step.finished_request_ids:
            self._generators.pop(request_id, None)
        self.apply_block_ops(step)
        sampled: list[list[int]] = [[] for _ in range(step.num_seqs)]
        if step.is_empty:
            return StepOutput(sampled)
        prepared = self.prepare(step)
        if self.attention_layers[0].k_cache.data_ptr() != self.kv_cache.storage.data_ptr():
            self.bind_kv_cache()
        hidden = self.forward(prepared)
        prompt_logprobs = self.prompt_logprobs(step, hidden)
        hidden_states = self.hidden_states(step, hidden)
        if not prepared.sample_seqs:
            return StepOutput(sampled, [] if step.return_logits else None, prompt_logprobs=prompt_logprobs,
                              logprobs=None if step.num_logprobs is None else [[] for _ in sampled],
                              hidden_states=hidden_states)
        logits = self.model.compute_logits(hidden[prepared.sample_indices])
        tokens = self.sample(logits, [step.sampling[i] for i in prepared.sample_seqs])
        for i, token in zip(prepared.sample_seqs, tokens):
            sampled[i].append(token)
        per_seq_logits = None
        if step.return_logits:
            per_seq_logits = list(logits.float().cpu().split([len(s) for s in sampled]))
        return StepOutput(sampled, per_seq_logits, self.sampled_logprobs(step, prepared, logits, tokens),
                          prompt_logprobs, hidden_states)

    def hidden_states(self, step: StepInput, hidden: torch.Tensor) -> list[torch.Tensor] | None:
        """Per sequence, its rows' hidden states [query_len, hidden] (views: no copy), when the step asks."""
        if not step.return_hidden_states:
            return None
        if self.hidden_state_kind is None:
            raise ValueError("return_hidden_states was set but this runner was configured without a head method "
                             "(speculative_config method medusa, eagle or mtp)")
        if self.hidden_state_kind == "pre_norm":
            hidden = self._pre_norm
            if hidden is None or hidden.shape[0] < sum(step.query_lens):
                raise RuntimeError("the final norm's hook did not see this forward: no pre-norm hidden states")
        return list(hidden[:sum(step.query_lens)].split(step.query_lens))

    def sampled_logprobs(self, step: StepInput, prepared: PreparedBatch, logits: torch.Tensor,
                         tokens: list[int]) -> list[list[TokenLogprobs]] | None:
        """Per sequence, the log-probs of the tokens sampled at its rows (only sequences that asked)."""
        if step.num_logprobs is None:
            return None
        rows = [r for r, i in enumerate(prepared.sample_seqs) if step.num_logprobs[i] >= 0]
        per_seq: list[list[TokenLogprobs]] = [[] for _ in range(step.num_seqs)]
        if rows:
            scored = token_logprobs(logits[rows], [tokens[r] for r in rows],
                                    [step.num_logprobs[prepared.sample_seqs[r]] for r in rows])
            for r, entry in zip(rows, scored):
                per_seq[prepared.sample_seqs[r]].append(entry)
        return per_seq

    def prompt_logprobs(self, step: StepInput, hidden: torch.Tensor) -> list[list[TokenLogprobs]] | None:
        """Per sequence, the log-probs of the prompt tokens its rows score (a second, small vocabulary
        projection over those rows only)."""
        if step.prompt_logprob_rows is None:
            return None
        indices, targets, num_top, owners = [], [], [], []
        offset = 0
        for i, (n, rows) in enumerate(zip(step.query_lens, step.prompt_logprob_rows)):
            if rows is not None:
                indices.extend(range(offset + rows.first_row, offset + rows.first_row + len(rows.token_ids)))
                targets.extend(rows.token_ids)
                num_top.extend([rows.num_top] * len(rows.token_ids))
                owners.extend([i] * len(rows.token_ids))
            offset += n
        per_seq: list[list[TokenLogprobs]] = [[] for _ in range(step.num_seqs)]
        if indices:
            index = torch.tensor(indices, dtype=torch.int64, device=hidden.device)
            for i, entry in zip(owners, token_logprobs(self.model.compute_logits(hidden[index]), targets, num_top)):
                per_seq[i].append(entry)
        return per_seq

    def forward(self, prepared: PreparedBatch) -> torch.Tensor:
        """Hidden states [T, hidden]: a CUDA graph replay for a decode-only batch when graphs are captured,
        else the (possibly compiled) eager forward."""
        self._pre_norm = None
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(prepared.metadata):
            hidden = self.cuda_graphs.run(prepared.input_ids, prepared.positions, prepared.metadata)
            if self._graph_pre_norm is not None:  # what the replay's recorded copy wrote
                self._pre_norm = self._graph_pre_norm[:hidden.shape[0]]
            return hidden
        with forward_context(prepared.metadata):
            return self.forward_fn(prepared.input_ids, prepared.positions)

    def sample(self, logits: torch.Tensor, specs: list) -> list[int]:
        """One token per row; rows of a request with a seed draw from that request's own generator."""
        if all(s.temperature <= 0 for s in specs):  # all greedy: decided on the host, so no sampling parameters
            return logits.argmax(dim=-1).tolist()  # cross to the device and only the tokens' copy waits for it
        temperatures = torch.tensor([s.temperature for s in specs], dtype=torch.float32, device=self.device)
        top_ks = torch.tensor([s.top_k for s in specs], dtype=torch.int64, device=self.device)
        top_ps = torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=self.device)
        tokens = self.sampler(logits, temperatures, top_ks, top_ps,
                              generators=[self._generator_of(s) for s in specs], default_generator=self.generator)
        return tokens.tolist()

    def _generator_of(self, spec) -> torch.Generator | None:
        if spec.seed is None:
            return None
        generator = self._generators.get(spec.request_id)
        if generator is None:
            generator = self._generators[spec.request_id] = torch.Generator(device=self.device)
            generator.manual_seed(spec.seed)
        return generator
