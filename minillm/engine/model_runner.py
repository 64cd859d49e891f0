"""The model runner: from a StepInput to sampled token ids (chapters 2 and 5). It lives in a worker.

Each step it
  1. applies the scheduler's block operations (swap out, swap in, copy-on-write) to the KV cache,
  2. turns the step's packed lists into tensors: `input_ids` [T], `positions` [T], and the AttentionMetadata
     (cu_seqlens_q, seq_lens, slot_mapping, block_tables) that tells every Attention layer which token belongs
     to which sequence and where keys and values live, all in ONE host-to-device copy from a pinned buffer
     (prepared_batch.py; a step a CUDA graph replays is written straight into the graph's static inputs),
  3. runs the forward inside `forward_context(...)`,
  4. keeps the hidden states of the rows that need a sample: the *last* new token of each sequence whose step
     reached its end (a chunk of a long prompt needs none), or its last 1 + k rows when it carries k draft
     tokens (the verify step of speculative decoding); computes logits for those rows only (the vocabulary
     projection is the most expensive matmul of a small model: no point doing it for all T),
  5. samples, each request with its own generator when it asked for a seed,
  6. only when a request asked (SamplingParams.logprobs / prompt_logprobs): log_softmax in fp32 of the raw logits
     of its sampled rows, and of the prefill rows that score its prompt tokens (logprobs.py), on the device;
     the sampled tokens, these scores and (for the rejection rule) the logits come back in ONE transfer, the
     step's only wait for the device (step_buffers.download),
  7. only when the speculative method drafts from the target's features (Medusa, EAGLE, MTP: chapter 9) and the
     step asks (StepInput.return_hidden_states): every row's last hidden state, after the final norm (the forward's
     output) or before it (the residual stream, caught by a hook on the final norm; with CUDA graphs the hook
     copies it into a static buffer inside the captured graph, so a replay refreshes it too).

Async scheduling (minillm/engine/async_step.py) splits execute_model in two: `launch(step)` queues everything up to
the download (into a pinned buffer, with an event) and returns; `collect(launched)` waits for that one step's tokens.
A launched step may take some input ids from the previous launch's samples, still on the device
(StepInput.deferred_input_ids, gathered by step_buffers.resolve_deferred_ids before the forward). On one rank a
decode step's CUDA graph does steps 4-5 for greedy rows and that gather inside the replay (cuda_graph.py, `sample`).

The runner owns the KV cache tensors: it allocates them once and hands each Attention module its layer's
views through the module's `k_cache` / `v_cache` attributes.

Launch overhead (chapter 4): `configure(engine_config)` (or the `engine_config=` argument) chooses eager,
compiled or CUDA-graph forwards and captures the graphs up front (minillm/engine/launch_setup.py, a mixin of
ModelRunner); `forward` picks among them step by step.
"""
from __future__ import annotations

import collections
import contextlib
from itertools import accumulate
from typing import Iterator, NamedTuple

import torch
from torch import nn

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.kv_cache import KVCache
from minillm.engine.kv_scales import calibrate_kv_scales
from minillm.engine.launch_setup import LaunchSetup
from minillm.engine.logprobs import logprob_entries, score_tokens, token_logprobs  # noqa: F401  (re-exported)
from minillm.engine.prepared_batch import PreparedBatch, prepare_batch
from minillm.engine.prompt_embeds import EmbeddingRows
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.step_buffers import DownloadRing, PendingDownload, UploadBuffer, download, resolve_deferred_ids
from minillm.engine.step_input import StepInput, StepOutput, TokenLogprobs, build_step_input
from minillm.forward_context import forward_context
from minillm.hooks import dispatch
from minillm.layers.logits_processors import processing_tensors
from minillm.layers.sampler import Sampler, greedy_tokens


class LaunchedStep(NamedTuple):
    """A step queued on the device by ModelRunner.launch; ModelRunner.collect turns it into its StepOutput."""

    step: StepInput
    prepared: PreparedBatch | None  # None: an empty step (nothing was computed)
    download: PendingDownload | None
    num_top: list[int] | None
    hidden_states: list | None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that hold a KV cache (they expose `k_cache`/`v_cache`), in layer order."""
    return [m for m in model.modules() if hasattr(m, "k_cache") and hasattr(m, "v_cache")]


class ModelRunner(LaunchSetup):
    def __init__(self, model: nn.Module, model_config: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, seed: int = 0, num_cpu_blocks: int = 0,
                 engine_config: EngineConfig | None = None, lora=None, num_offload_blocks: int = 0) -> None:
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
                                kv_cache_dtype=engine_config.kv_cache_dtype if engine_config is not None else "auto",
                                num_offload_blocks=num_offload_blocks)
        self.attention_layers = attention_modules(model)
        if len(self.attention_layers) != model_config.num_hidden_layers:
            raise ValueError(f"the model has {len(self.attention_layers)} attention modules with k_cache/v_cache, "
                             f"but the config says num_hidden_layers={model_config.num_hidden_layers}")
        self.bind_kv_cache()
        if self.kv_cache.scales is not None:  # an fp8 cache: fix its scales before any step or CUDA graph reads them
            calibrate_kv_scales(model, self.attention_layers, self.kv_cache, model_config)
        self.engine_config: EngineConfig | None = None
        self.cuda_graphs = None  # DecodeCUDAGraphs once captured
        self.piecewise_graphs = None  # PiecewiseCUDAGraphs (steps with prefill tokens), when configured
        self.prompt_graphs = None  # PromptCUDAGraphs (a step that is one fresh prompt), with the piecewise ones
        # forwards by how they ran: "graph" (a decode/verify replay), "prompt_graph" (one fresh prompt, a whole
        # replay), "piecewise", "eager" (benchmarks read it)
        self.forward_counts: collections.Counter = collections.Counter()
        self.forward_fn = model
        self.hidden_state_kind: str | None = None  # "post_norm" / "pre_norm": what return_hidden_states returns
        self._pre_norm: torch.Tensor | None = None  # the last forward's residual stream before the final norm
        # this step's logits processors and the logits they made (ProcessingTensors, float32 [S, V]), or None;
        # set by _sample_on_device, read for return_logits
        self._step_processed: tuple | None = None
        self._graph_pre_norm: torch.Tensor | None = None  # the static copy of it that captured graphs write
        self._pre_norm_hook = None
        self._capturing_graphs = False  # only this runner's own captures record the pre-norm copy
        self._upload: UploadBuffer | None = None  # the step metadata's pinned staging and device buffer
        self._arange = torch.arange(256, device=device)  # 0, 1, 2, ...: sample_indices of all-rows steps
        self._downloads: DownloadRing | None = None  # pinned buffers of launched steps' downloads (async scheduling)
        self._last_sampled: torch.Tensor | None = None  # the last step's sampled tokens, still on the device
        self._graph_sampled: tuple[torch.Tensor, torch.Tensor] | None = None  # the last replay's logits, tokens
        self._embedding_rows: EmbeddingRows | None = None  # prompts given as embeddings: the lookup's hook
        self.lora = lora  # the worker's LoRAWeights (minillm.lora.layers) when enable_lora
        # decode and piecewise graphs captured with the adapters' kernels, beside the plain ones
        self.lora_graphs = self.lora_piecewise_graphs = None
        if engine_config is not None:
            self.configure(engine_config)

    def bind_kv_cache(self) -> None:
        """Point every attention module at its layer's views of this runner's cache. Called again before each
        forward when another runner (a second engine over the same model object) has rebound them meanwhile."""
        for index, module in enumerate(self.attention_layers):
            module.k_cache, module.v_cache = self.kv_cache.layer(index)
            module.k_scale, module.v_scale = self.kv_cache.layer_scales(index)  # (None, None) unless fp8

    # -- block operations ---------------------------------------------------------------------------------
    def apply_block_ops(self, step: StepInput | ScheduledBatch) -> None:
        """Swap-outs first and the prefix cache's CPU-tier stores (they copy out device blocks that swap-ins,
        copies or loads may then reuse), then swap-ins, then copy-on-write, then the tier's loads (after the copies,
        which may read a block an eviction gave to a load; a copy of a loaded block is planned as a second load:
        minillm/engine/offload_tier.py). Tree-verify slot copies (StepInput.slots_to_copy) go before them all:
        they finish the previous step, whose blocks this step's operations may move or reuse."""
        self.kv_cache.copy_slots(getattr(step, "slots_to_copy", []))
        self.kv_cache.swap_out(step.blocks_to_swap_out)
        self.kv_cache.offload(step.blocks_to_offload)
        self.kv_cache.swap_in(step.blocks_to_swap_in)
        self.kv_cache.copy(step.blocks_to_copy)
        self.kv_cache.onload(step.blocks_to_onload)

    # -- input preparation --------------------------------------------------------------------------------
    def prepare(self, step: StepInput | ScheduledBatch) -> PreparedBatch:
        """Device tensors for one forward, in ONE host-to-device copy (minillm/engine/prepared_batch.py). A
        ScheduledBatch (tests, notebooks) is flattened with build_step_input first; the engine sends StepInputs.
        The tensors are views of a buffer the next prepare() rewrites: use them before preparing another step."""
        if isinstance(step, ScheduledBatch):
            step = build_step_input(step, self.block_size)
        if step.block_size != self.block_size:
            raise ValueError(f"step built for block_size={step.block_size}, the cache has {self.block_size}")
        if step.is_empty:
            raise ValueError("an empty step has nothing to prepare")
        num_tokens = len(step.input_ids)
        if self._upload is None:
            self._upload = UploadBuffer(self.device, 1 << 16)
        if self._arange.numel() < num_tokens:  # sample_indices of the steps that sample every row: a slice of it
            self._arange = torch.arange(max(num_tokens, 2 * self._arange.numel()), device=self.device)
        graphs = self.lora_graphs if step.lora_slots is not None and self.lora_graphs is not None \
            else self.cuda_graphs
        return prepare_batch(step, self._upload, self._arange, None if step.prompt_embeds else graphs)

    # -- the step -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, step: StepInput) -> StepOutput:
        """Run one step; for each sequence, the tokens sampled at its last num_sampled rows. The host waits for
        the device once: for the one download of the sampled tokens (and the log-probs / logits asked for)."""
        run = self._run(step)
        if run is None:
            return StepOutput([[] for _ in range(step.num_seqs)])
        prepared, parts, num_top, hidden_states = run
        return self._step_output(step, prepared, download(parts), num_top, hidden_states)

    @torch.inference_mode()
    def launch(self, step: StepInput) -> "LaunchedStep":
        """Queue one step on the device without waiting for it (async scheduling, minillm/engine/async_step.py):
        its download goes into a pinned buffer of the runner's DownloadRing; `collect` reads it later. A step may
        take input ids from the previous launch's samples (StepInput.deferred_input_ids)."""
        run = self._run(step)
        if run is None:
            return LaunchedStep(step, None, None, None, None)
        prepared, parts, num_top, hidden_states = run
        if self._downloads is None:
            self._downloads = DownloadRing(self.device)
        return LaunchedStep(step, prepared, self._downloads.start(parts), num_top, hidden_states)

    def collect(self, launched: "LaunchedStep") -> StepOutput:
        """Wait for a launched step's download (only for it: later launches keep running) and cut it into a
        StepOutput, as execute_model would have returned."""
        if launched.download is None:
            return StepOutput([[] for _ in range(launched.step.num_seqs)])
        host = launched.download.wait()
        return self._step_output(launched.step, launched.prepared, host, launched.num_top, launched.hidden_states)

    def _run(self, step: StepInput) -> tuple[PreparedBatch, list[torch.Tensor], list[int] | None, list | None] | None:
        """Everything of a step up to its download, queued on the device: (prepared batch, the device tensors to
        download, log-prob widths, hidden states), or None for a step with nothing to compute."""
        for request_id in step.finished_request_ids:
            self._generators.pop(request_id, None)
        self.apply_block_ops(step)
        if step.is_empty:
            return None
        if step.lora_slots is not None:
            self._load_adapters(step)
        prepared = self.prepare(step)
        self._step_processed = None  # this step's processed logits, if any (_sample_on_device)
        graphs = prepared.graph_set if prepared.graph is not None else self.cuda_graphs
        sampling_graph = graphs is not None and graphs.gathers_deferred_ids(prepared.graph, prepared.graph_tree)
        if step.deferred_input_ids and not sampling_graph:  # ids the host has not seen: the previous step's
            gather = dispatch("ch06.resolve_deferred_ids", resolve_deferred_ids)  # samples (a sampling graph
            gather(prepared.input_ids, self._last_sampled)  # gathers them inside its replay)
        if self.attention_layers[0].k_cache.data_ptr() != self.kv_cache.storage.data_ptr():
            self.bind_kv_cache()
        with self.prompt_embeds_of(step):
            hidden = self.forward(prepared)
        hidden_states = self.hidden_states(step, hidden)
        parts: list[torch.Tensor] = []  # everything the host needs back, downloaded together
        logits = tokens = None
        if prepared.sample_seqs:
            in_graph = self._graph_sampled if prepared.all_rows_sampled else None
            if in_graph is not None:  # the replay computed the logits and the greedy tokens already
                logits, tokens = in_graph
                if prepared.sampling is not None:  # some row samples with a temperature or processors
                    tokens = self._sample_on_device(logits, prepared.row_specs, prepared.sampling,
                                                    prepared.input_ids, step, prepared.sample_seqs)
            else:
                logits = self.model.compute_logits(hidden if prepared.all_rows_sampled
                                                   else hidden[prepared.sample_indices])
                tokens = self._sample_on_device(logits, prepared.row_specs, prepared.sampling,
                                                prepared.input_ids, step, prepared.sample_seqs)
            if graphs is not None and (in_graph is None or tokens is not in_graph[1]):
                graphs.keep_tokens(tokens)  # for a sampling graph's gather of the next step's deferred ids
            parts.append(tokens)
        self._last_sampled = tokens  # what the next step's deferred input ids refer to
        num_top = self._logprob_widths(step, prepared)
        if num_top is not None and prepared.logprob_row_list:  # scored at the sampled rows that asked
            rows = prepared.logprob_rows
            parts += score_tokens(logits if rows is None else logits[rows], tokens if rows is None else tokens[rows],
                                  max(num_top))
        if prepared.prompt_scoring is not None:  # a second, small vocabulary projection over those rows only
            parts += score_tokens(self.model.compute_logits(hidden[prepared.prompt_rows]), prepared.prompt_targets,
                                  max(prepared.prompt_scoring[2]))
        if step.return_logits and logits is not None:  # for the rejection rule: the distribution sampled from
            parts.append(self.target_logits(logits, prepared.sampling[0] if prepared.sampling else None))
            prepared.returns_raw_logits = num_top is not None and self._step_processed is not None
            if prepared.returns_raw_logits:  # processors changed them: log-probs read the raw ones
                parts.append(logits.float())
        return prepared, parts, num_top, hidden_states

    @contextlib.contextmanager
    def prompt_embeds_of(self, step: StepInput) -> Iterator[None]:
        """While a step with embeddings prompts runs: their vectors replace those rows' embedding lookups
        (minillm/engine/prompt_embeds.py; `forward` then runs eagerly)."""
        if not step.prompt_embeds:
            yield
            return
        if self._embedding_rows is None:
            self._embedding_rows = EmbeddingRows(self.model)
        self._embedding_rows.set(step.prompt_embeds, self.device, self.dtype)
        try:
            yield
        finally:
            self._embedding_rows.clear()

    def _load_adapters(self, step: StepInput) -> None:
        """Copy the step's new adapters into their slots (minillm.lora), and check every slot the step reads holds
        one (a slot left half-written by a failed copy never serves a step)."""
        lora = self.lora
        if lora is None:
            raise ValueError("the step uses LoRA adapters, but this runner has no adapter slots (enable_lora=False)")
        if not lora.is_bound:
            lora.bind()
        for slot, request in step.lora_loads:
            lora.load(slot, request)
        empty = sorted({s for s in step.lora_slots if s >= 0 and lora.resident[s] is None})
        if empty:
            raise RuntimeError(f"LoRA slots {empty} hold no adapter: the engine and the worker disagree")

    def _logprob_widths(self, step: StepInput, prepared: PreparedBatch) -> list[int] | None:
        """Per sampled row that returns log-probs, its number of top alternatives (None: no request asked)."""
        if prepared.logprob_row_list is None:
            return None
        asks, seqs = step.num_logprobs, prepared.sample_seqs
        return [asks[seqs[r]] for r in prepared.logprob_row_list]

    def _step_output(self, step: StepInput, prepared: PreparedBatch, host: list[torch.Tensor],
                     num_top: list[int] | None, hidden_states: list | None) -> StepOutput:
        """Cut the downloaded tensors back into per-sequence lists."""
        num_seqs, seqs = step.num_seqs, prepared.sample_seqs
        sampled: list[list[int]] = [[] for _ in range(num_seqs)]
        tokens: list[int] = []
        if seqs:
            tokens = host.pop(0).tolist()
            if prepared.all_rows_sampled and len(seqs) == num_seqs:  # one row per sequence (decode): no appends
                sampled = [[t] for t in tokens]
            else:
                for i, token in zip(seqs, tokens):
                    sampled[i].append(token)
        logprobs = None
        if num_top is not None:
            logprobs = [[] for _ in range(num_seqs)]
            rows = prepared.logprob_row_list
            if rows:
                scored = logprob_entries([tokens[r] for r in rows], num_top, host[:4])
                del host[:4]
                for r, entry in zip(rows, scored):
                    logprobs[seqs[r]].append(entry)
        prompt_logprobs = None
        if step.prompt_logprob_rows is not None:
            prompt_logprobs = [[] for _ in range(num_seqs)]
            if prepared.prompt_scoring is not None:
                owners, targets, widths = prepared.prompt_scoring
                for i, entry in zip(owners, logprob_entries(targets, widths, host[:4])):
                    prompt_logprobs[i].append(entry)
                del host[:4]
        per_seq_logits = raw_logits = None
        if step.return_logits:
            rows = [len(s) for s in sampled]
            per_seq_logits = list(host.pop(0).split(rows)) if seqs else []
            if prepared.returns_raw_logits:
                raw_logits = list(host.pop(0).split(rows))
        return StepOutput(sampled, per_seq_logits, logprobs, prompt_logprobs, hidden_states, raw_logits=raw_logits)

    def hidden_states(self, step: StepInput, hidden: torch.Tensor) -> list[torch.Tensor] | None:
        """Per sequence, its rows' hidden states [query_len, hidden] (views: no copy), when the step asks."""
        if not step.return_hidden_states:
            return None
        if self.hidden_state_kind == "pre_norm":  # (a draft head's; otherwise the forward's output, after the norm)
            hidden = self._pre_norm
            if hidden is None or hidden.shape[0] < sum(step.query_lens):
                raise RuntimeError("the final norm's hook did not see this forward: no pre-norm hidden states")
        return list(hidden[:sum(step.query_lens)].split(step.query_lens))

    def forward(self, prepared: PreparedBatch) -> torch.Tensor:
        """Hidden states [T, hidden]: a CUDA graph replay for a decode-like batch when graphs are captured (the
        step was laid out in the graph's static inputs by prepare, or is copied there), else the (possibly
        compiled) eager forward."""
        self._pre_norm = self._graph_sampled = None
        if self._embedding_rows is not None and self._embedding_rows.rows is not None:
            self.forward_counts["eager"] += 1  # a recorded graph would replay the lookup it recorded
            with forward_context(prepared.metadata):
                return self.model(prepared.input_ids, prepared.positions)
        graphs = prepared.graph_set if prepared.graph is not None else self.cuda_graphs
        hidden = None
        adapters = prepared.metadata.lora is not None  # a LoRA step replays the LoRA sets (or runs eagerly)
        if graphs is not None and prepared.graph is not None:
            rows = prepared.input_ids.shape[0]
            hidden = graphs.replay(*prepared.graph, rows, tree=prepared.graph_tree)
            if graphs.samples(prepared.graph, prepared.graph_tree):
                logits, tokens = graphs.sampled[(*prepared.graph, prepared.graph_tree)]
                self._graph_sampled = (logits[:rows], tokens[:rows])
        elif graphs is not None and not adapters and graphs.can_run(prepared.metadata):
            hidden = graphs.run(prepared.input_ids, prepared.positions, prepared.metadata)
        if hidden is not None:
            self.forward_counts["graph"] += 1
            if self._graph_pre_norm is not None:  # what the replay's recorded copy wrote
                self._pre_norm = self._graph_pre_norm[:hidden.shape[0]]
            return hidden
        prompts, tokens = self.prompt_graphs, prepared.input_ids.shape[0]
        if prompts is not None and not adapters and prompts.can_run(prepared.metadata, tokens):
            self.forward_counts["prompt_graph"] += 1
            hidden = prompts.run(prepared.input_ids, prepared.positions, prepared.metadata)
            if self._graph_pre_norm is not None:  # the recorded copy of the final norm's input
                self._pre_norm = self._graph_pre_norm[:tokens]
            return hidden
        pieces = self.lora_piecewise_graphs if adapters else self.piecewise_graphs
        with forward_context(prepared.metadata):
            if pieces is not None and pieces.can_run(prepared.metadata, prepared.input_ids.shape[0]):
                self.forward_counts["piecewise"] += 1
                hidden = pieces.run(prepared.input_ids, prepared.positions, prepared.metadata.lora.token_slots) \
                    if adapters else pieces.run(prepared.input_ids, prepared.positions)
                if self._graph_pre_norm is not None:  # the last piece's recorded copy of the residual stream
                    self._pre_norm = self._graph_pre_norm[:hidden.shape[0]]
                return hidden
            self.forward_counts["eager"] += 1
            return self.forward_fn(prepared.input_ids, prepared.positions)

    def sample(self, logits: torch.Tensor, specs: list, input_ids: torch.Tensor | None = None,
               step: StepInput | None = None) -> list[int]:
        """One token per row; rows of a request with a seed draw from that request's own generator. (The runner's
        own steps upload the sampling parameters with the step's metadata; this entry point builds them.) Rows
        with logits processors need the step and its input ids on the device (their tokens count as history)."""
        params = None
        if not all(s.greedy for s in specs):
            device = logits.device
            params = (torch.tensor([s.temperature for s in specs], dtype=torch.float32, device=device),
                      torch.tensor([s.top_k for s in specs], dtype=torch.int64, device=device),
                      torch.tensor([s.top_p for s in specs], dtype=torch.float32, device=device))
        return self._sample_on_device(logits, specs, params, input_ids, step).tolist()

    def _sample_on_device(self, logits: torch.Tensor, specs: list, params: tuple | None,
                          input_ids: torch.Tensor | None = None, step: StepInput | None = None,
                          sample_seqs: list[int] | None = None) -> torch.Tensor:
        """int64 [rows] on the device, no sync: params (temperatures, top_ks, top_ps) is None when every row is
        greedy, and the sampler's branches are decided here from the host's copy of the parameters. Rows with
        logits processors read this step's input ids (`input_ids`, `step`; `sample_seqs`: each row's sequence,
        by default one row per sequence that samples)."""
        self._step_processed = None
        if params is None:
            return greedy_tokens(logits)
        generators = None
        if any(s.seed is not None for s in specs):
            generators = [self._generator_of(s) for s in specs]
        min_p = None
        if any(s.processing is not None for s in specs):  # penalties, bias, min_tokens: before the sampler
            if step is None or input_ids is None:
                raise ValueError("rows with logits processors need the step and its input ids")
            if sample_seqs is None:
                sample_seqs = [i for i, k in enumerate(step.num_sampled) for _ in range(k)]
            processing = processing_tensors(specs, sample_seqs, input_ids, [0, *accumulate(step.query_lens)],
                                            step.query_lens, logits.shape[-1], step.tree_masks)
            logits = processing.apply(logits)
            self._step_processed, min_p = (processing, logits), processing.min_p
        return self.sampler(logits, *params, generators=generators, default_generator=self.generator,
                            all_greedy=False, use_top_k=any(s.top_k > 0 for s in specs),
                            use_top_p=any(s.top_p < 1 for s in specs), min_p=min_p)

    def target_logits(self, logits: torch.Tensor, temperatures: torch.Tensor | None) -> torch.Tensor:
        """float32 logits of the distribution the step's rows were sampled from: `logits` as they are, or, where
        logits processors ran (_sample_on_device), their result with min_p's removals (the rejection rule of
        speculative decoding reads its target probabilities from these)."""
        if self._step_processed is None:
            return logits.float()
        processing, processed = self._step_processed
        return processing.target_logits(processed, temperatures)

    def _generator_of(self, spec) -> torch.Generator | None:
        if spec.seed is None:
            return None
        generator = self._generators.get(spec.request_id)
        if generator is None:
            generator = self._generators[spec.request_id] = torch.Generator(device=self.device)
            generator.manual_seed(spec.seed)
        return generator
