"""LLMEngine: the loop that turns requests into tokens (chapter 2; chapter 6 swaps in a better scheduler).

    add_request(...)   validate, tokenize, create a Sequence, hand it to the scheduler
    step()             batch = scheduler.schedule(); tokens = executor.execute_model(step_input); update:
                       num_computed_tokens, the new token, incremental text, stop conditions; finished
                       sequences go back to the scheduler, which frees their KV blocks at once
    abort(request_id)  drop a request wherever it is and free its blocks

With EngineConfig.async_scheduling the step is split (minillm/engine/async_step.py): each call schedules and
launches step N+1 before it reads step N's tokens, so the host's work overlaps the device's, and returns step N's
outputs (one call later than a synchronous step would). Steps run in sync where the host needs every token first:
a speculative verify step, and every step while a request with a constraint lives (structured outputs,
allowed_token_ids, bad_words: its next mask follows from its last token; minillm/engine/constraints.py).

The names are vLLM's (`add_request`, `step`, `has_unfinished_requests`), so a server can drive the engine one
step at a time and stream what each step produced. The engine is parametric in its scheduler (static batching of
chapter 2 or continuous batching of chapter 6) and KV layout (contiguous or paged): both meet in
scheduler_interface.py and forward_context.py.

Log-probabilities (SamplingParams.logprobs / prompt_logprobs): the runner scores the rows that asked; the engine
keeps the results on the sequence (`seq.logprobs`, `seq.cumulative_logprob`, `seq.prompt_logprobs`), one entry per
token in the order tokens are accepted (after a speculative verify step: one per accepted token, from its verify
row). A request with prompt_logprobs never reads the prefix cache (a cached prefix has no logits to score), which
BlockManager._match_prefix honours.

Robustness: a bad request is rejected by add_request (ValueError for that request only, nothing else changes); an
exception inside a step reruns the step one request at a time where that is safe (minillm/engine/step_isolation.py)
and finishes with finish_reason "error" and the message only the requests that fail alone (all of the step's where
a rerun is not safe), frees their KV, and the engine carries on with whatever arrives next.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence as SequenceT

import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.detokenizer import DetokenizerState
from minillm.engine.cache_config import (CacheConfig, kv_block_size, make_cache_config, needs_sized_pool,
                                         resolve_engine_config)
from minillm.engine.executor import UniProcExecutor
from minillm.engine.kv_cache import kv_bytes_per_block
from minillm.engine.prefix_cache import check_cache_salt, sequence_salt
from minillm.engine.prompt_embeds import check_prompt_embeds, embedding_keys, embeds_problem
from minillm.layers.kv_quant import kv_cache_torch_dtype
from minillm.engine.constraints import ConstraintCompiler, constrain_step
from minillm.engine.step_input import StepOutput, build_step_input
from minillm.engine.step_isolation import can_isolate, forget_unfilled_blocks, rerun_one_by_one
from minillm.engine.engine_tools import EngineTools
from minillm.engine.request_checks import RequestChecks
from minillm.engine.step_outputs import StepOutputs
from minillm.engine.worker import PrebuiltModel, Worker
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence, SequenceStatus
from minillm.engine.static_scheduler import StaticScheduler
from minillm.hooks import overriding
from minillm.outputs import RequestOutput
from minillm.pooling import pool_embeddings
from minillm.sampling_params import ParamError, SamplingParams, check_seed

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    seq: Sequence
    detok: DetokenizerState


def make_scheduler(engine_config: EngineConfig, cache_config: CacheConfig) -> Any:
    """The one place that maps `scheduling=` onto a Scheduler implementation."""
    if engine_config.scheduling == "static":
        return StaticScheduler(engine_config.max_num_seqs, cache_config.max_model_len, cache_config.block_size,
                               engine_config.max_num_batched_tokens)
    # chapter 6: continuous batching over paged blocks
    from minillm.engine.block_manager import BlockManager
    from minillm.engine.scheduler import Scheduler
    block_manager = BlockManager(cache_config.num_gpu_blocks, cache_config.block_size, cache_config.num_cpu_blocks,
                                 enable_prefix_caching=engine_config.enable_prefix_caching,
                                 num_offload_blocks=cache_config.num_offload_blocks,
                                 sliding_window=cache_config.sliding_window)
    return Scheduler(engine_config, block_manager)


class LLMEngine(StepOutputs, RequestChecks, EngineTools):
    """The engine loop around one executor. Give it either a built `model` (it is wrapped in an in-process
    worker) or an `executor` whose workers build their own (model=None): e.g. a MultiProcExecutor."""

    # The verify step of speculative decoding (chapter 9) is `self.speculative` (minillm.speculative.engine_hooks),
    # built from EngineConfig.speculative_config. Tests that set drafts by hand may instead set this hook:
    # (batch, sampled tokens per sequence) -> the accepted tokens per sequence (drafts[:a] + [one token]).
    verify_drafts: Callable[[ScheduledBatch, list[list[int]]], list[list[int]]] | None = None
    # SamplingParams fields a request gets where it sets none (the model's generation_config.json; LLM sets them:
    # minillm/loader/generation_config.py); the server's requests read them too
    generation_defaults: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, model: torch.nn.Module | None, tokenizer: Any, model_config: ModelConfig,
                 engine_config: EngineConfig, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0,
                 overrides: Mapping[str, Any] | None = None, executor: Any | None = None) -> None:
        check_seed(seed)
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        # already validated callables (LLM resolves them once through minillm.course.overrides)
        self.overrides = dict(overrides or {})
        for name, fn in self.overrides.items():
            if not callable(fn):
                raise TypeError(f"override {name!r} must be a callable here, got {type(fn).__name__}; "
                                f"resolve names and paths with minillm.course.overrides.resolve_overrides")
        # configuration resolved once, here, then passed down (worker, runner, scheduler)
        if engine_config.disable_sliding_window and model_config.sliding_window is not None:
            raise ValueError(f"disable_sliding_window=True, but model_config has sliding_window="
                             f"{model_config.sliding_window}: build the model from model_config."
                             f"without_sliding_window() (LLM(..., disable_sliding_window=True) does)")
        self.engine_config = config = resolve_engine_config(engine_config, model_config, self.device)
        self.max_model_len = config.max_model_len
        if (model is None) == (executor is None):
            raise ValueError("give LLMEngine either a built model or an executor (model=None), not both or neither")
        if executor is None:
            executor = UniProcExecutor(Worker(model_config, config, self.device, dtype, PrebuiltModel(model), seed))
        self.executor = executor
        num_gpu_blocks = executor.determine_num_gpu_blocks() if needs_sized_pool(config) else None
        kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, dtype)  # fp8 blocks: 1 byte per element
        self.cache_config = make_cache_config(config, num_gpu_blocks,
                                              kv_bytes_per_block(model_config, kv_block_size(config), kv_dtype),
                                              model_config.uniform_sliding_window)
        executor.initialize_cache(self.cache_config)
        self.scheduler = make_scheduler(config, self.cache_config)
        from minillm.speculative.engine_hooks import build_speculative_decoder  # chapter 9; None: no speculation
        self.speculative = build_speculative_decoder(self, seed)
        eos = set(model_config.eos_token_ids)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        eos.update(tok_eos if isinstance(tok_eos, (list, tuple, set)) else [tok_eos] if tok_eos is not None else [])
        self.eos_token_ids = eos
        # structured outputs, allowed_token_ids, bad_words (constraints.py): compiled per request, masks per step;
        # while a constrained or an embedding request is alive (its id in _sync_only) every step runs in sync
        self.constraints = ConstraintCompiler(tokenizer, model_config.vocab_size, eos)
        # multi-LoRA (minillm.lora): which adapter sits in which device slot; None when LoRA is off
        self.lora_slots = None
        if config.enable_lora:
            from minillm.lora.adapter import process_adapter_cache
            from minillm.lora.slots import LoRASlots
            self.lora_slots = LoRASlots(config.max_loras, config.max_lora_rank, model_config,
                                        process_adapter_cache(config.max_cpu_loras or config.max_loras))
        self._sync_only: set[str] = set()  # requests whose steps need the last step's results on the host
        self._requests: dict[str, _RequestState] = {}
        self._finished_since_last_step: list[str] = []  # told to the workers with the next step
        self._counter = itertools.count()
        self.num_steps = 0
        # async scheduling (engine/async_step.py); None: every step waits for its own tokens (an executor that
        # cannot split a step, workers in other processes, steps in sync). A speculative engine steps async only
        # where a step verifies nothing (SpeculativeDecoder.steps_async): verify steps run in sync.
        self.async_steps = None
        if config.async_scheduling and getattr(executor, "can_launch", False):
            from minillm.engine.async_step import AsyncSteps
            self.async_steps = AsyncSteps(self)

    @property
    def runner(self):
        """The in-process worker's ModelRunner (KV cache, model): for tests, notebooks and benchmarks."""
        worker = getattr(self.executor, "driver_worker", None)
        if worker is None:
            raise AttributeError("the workers of this engine live in other processes: no runner here")
        return worker.runner

    def shutdown(self) -> None:
        """Stop the executor's workers (a no-op for the in-process one)."""
        self.executor.shutdown()

    # -- requests -----------------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | SequenceT[int],
                    sampling_params: SamplingParams | None = None, arrival_time: float | None = None,
                    prompt_token_ids: list[int] | None = None, lora_request: Any = None,
                    pooling_params: Any = None, cache_salt: str | None = None) -> str:
        """Validate and queue one request; returns its id. Raises ValueError/TypeError for this request only.
        `prompt_token_ids`, when given, are the tokens of a text `prompt` (not encoded again, but range-checked).
        The request keeps a checked copy of `sampling_params`: a value assigned to the caller's object after
        construction (p.seed = 2**70) raises ParamError here instead of failing the step for the whole batch,
        and one assigned after this call does not reach the queued request. `lora_request` (a LoRARequest; needs
        enable_lora=True) runs the request with that adapter, which is read and checked here. `pooling_params` (a
        minillm.pooling.PoolingParams, without sampling_params) makes it an embedding request: its prefill only,
        its RequestOutput.embedding the pooled vector (LLM.embed; minillm/pooling.py). `cache_salt` (vLLM's, a
        non-empty string): the request shares prefix-cache blocks only with requests of the same salt. A `prompt`
        that is a float tensor [n, hidden_size] is given as embeddings (an engine with enable_prompt_embeds=True;
        minillm/engine/prompt_embeds.py). A sleeping engine (sleep mode) raises EngineSleepingError."""
        self.check_awake()
        if pooling_params is not None:
            sampling_params = self.embedding_sampling_params(pooling_params, sampling_params)
        if sampling_params is None:
            sampling_params = SamplingParams()
        elif not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        else:
            sampling_params = sampling_params.checked_copy()
        request_id = str(next(self._counter)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        embeds, truncate = None, sampling_params.truncate_prompt_tokens
        if isinstance(prompt, torch.Tensor):  # an embeddings prompt: placeholder ids for its positions
            embeds = check_prompt_embeds(prompt, self.model_config.hidden_size,
                                         self.engine_config.enable_prompt_embeds)
            keep = self.kept_prompt_length(truncate)
            embeds = embeds if keep is None else embeds[-keep:]
            prompt, prompt_token_ids = [0] * embeds.shape[0], None
        if prompt_token_ids is not None and isinstance(prompt, str):
            # checked again (a range check, no re-encoding): ids out of the vocabulary would fail the whole step,
            # and with it every other request in the batch
            token_ids = self.validate_prompt(prompt_token_ids, truncate)[1]
            text = prompt if len(token_ids) == len(prompt_token_ids) else None
        else:
            text, token_ids = self.validate_prompt(prompt, truncate)
        constraint = self.check_sampling_params(sampling_params, pooling=pooling_params is not None)
        self.check_lora_request(lora_request)
        cache_salt = check_cache_salt(cache_salt)
        if sampling_params.max_tokens is None:  # until the context ends (vLLM's None); our copy, resolved once
            room = self.max_model_len - len(token_ids)
            if room < 1 or sampling_params.min_tokens > room:
                raise ParamError("max_tokens", f"max_tokens=None generates until max_model_len={self.max_model_len}"
                                               f", but the {len(token_ids)}-token prompt leaves room for {room} "
                                               f"(min_tokens={sampling_params.min_tokens})")
            sampling_params.max_tokens = room
        for name in ("logprobs", "prompt_logprobs"):  # -1: every token of the vocabulary (our copy, resolved once)
            if getattr(sampling_params, name) == -1:
                setattr(sampling_params, name, self.model_config.vocab_size)
        seq = Sequence(request_id, token_ids, sampling_params, prompt=text, arrival_time=arrival_time)
        if embeds is not None:
            seq.prompt_embeds, seq.embed_keys, seq.pooling = embeds, embedding_keys(embeds), pooling_params
            problem = embeds_problem(seq, self)
            if problem:
                raise ValueError(problem)
        seq.lora_request = lora_request
        seq.cache_salt = sequence_salt(None if lora_request is None else lora_request.cache_salt, cache_salt)
        if constraint is not None:
            seq.constraint = constraint
            self._sync_only.add(request_id)
        if pooling_params is not None:
            seq.pooling = pooling_params
            self._sync_only.add(request_id)  # its hidden states are read after its step
        if sampling_params.min_tokens > 0:
            eos = () if sampling_params.ignore_eos else tuple(self.eos_token_ids)
            seq.min_tokens_stop_ids = tuple(dict.fromkeys(eos + tuple(sampling_params.stop_token_ids)))
        if sampling_params.logprobs is not None:
            seq.logprobs = []
        if sampling_params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # position 0 has no prediction; build_step_input scores from len() on
        self.scheduler.add(seq)
        detokenizer = DetokenizerState.for_prompt(len(token_ids), sampling_params.skip_special_tokens)
        if embeds is not None:  # no prompt text to continue: the placeholders are no context
            detokenizer.prefix_offset = len(token_ids)
        self._requests[request_id] = _RequestState(seq, detokenizer)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is (waiting, running, swapped) and free its KV blocks."""
        state = self._requests.pop(str(request_id), None)
        if state is None:
            return None
        seq = self.scheduler.abort(state.seq.request_id) or state.seq
        if seq.num_output_tokens and seq.token_ids[-1] < 0:  # async scheduling: a token not read yet is dropped
            seq.truncate_output(seq.num_tokens - 1)
        seq.status = SequenceStatus.FINISHED
        if seq.finish_reason is None:
            seq.finish_reason = "abort"
        seq.finish_time = time.perf_counter()
        self._finished_since_last_step.append(seq.request_id)
        return RequestOutput.from_sequence(seq)

    def has_unfinished_requests(self) -> bool:
        """True while a request waits, runs or is swapped, or a launched step's tokens are still to be read."""
        return self.scheduler.has_unfinished() or (self.async_steps is not None and self.async_steps.in_flight)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # -- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler decision and one forward. Returns a (cumulative) RequestOutput for every request that
        took part in this step, finished ones included; a request whose SamplingParams.output_kind is
        "final_only" appears only in the step it finishes.

        The whole step runs under the learner's overrides (if any), so an overridden scheduler or block-table
        function (chapters 5-6) is exercised as well as an overridden layer (chapter 1)."""
        with overriding(self.overrides):
            return self._step()

    def _step(self) -> list[RequestOutput]:
        if self._sync_only:  # a constrained request's masks need every token on the host, an embedding request
            # its step's hidden states: steps run in sync while one is alive
            self._sync_only.intersection_update(self._requests)
        if self.async_steps is not None:  # schedule N+1 while the device runs N, unless this step speculates
            outputs = None
            if self._sync_only:  # or such a request is alive: read the step in flight, then run in sync
                if self.async_steps.in_flight:
                    outputs = self.async_steps.drain()
            elif self.speculative is None:
                return self.async_steps.step()
            elif self.speculative.steps_async(self.scheduler):
                outputs = self.async_steps.step()
            elif self.async_steps.in_flight:  # first read the step in flight (its tokens are what a proposer
                outputs = self.async_steps.drain()  # drafts from); the next call decides again, every token known
            if outputs is not None:
                if self.speculative is not None:
                    self.speculative.release(self.scheduler)  # proposer state of requests that finished meanwhile
                return outputs
        if self.speculative is not None:  # drafts for the running decodes, before the scheduler grants them
            self.speculative.propose(self.scheduler)
        batch, outputs = self._schedule()
        if batch.is_empty:
            return outputs + self._apply_block_ops(batch)
        try:
            step_input = build_step_input(batch, self.cache_config.block_size, self._finished_since_last_step,
                                          self.lora_slots)
            if self.speculative is not None:  # token trees: node positions, ancestor masks, last step's KV moves
                self.speculative.prepare_step(batch, step_input)
            if self._sync_only:  # each constrained row's mask and bans, along its path (after the tree's layout)
                constrain_step(step_input, batch.seqs)
            self._finished_since_last_step = []
            step_input.return_logits = self.speculative is not None and self.speculative.needs_logits(batch)
            step_input.return_hidden_states = (  # a draft head's features, or an embedding request's vector
                (self.speculative is not None and self.speculative.keeps_features(batch))
                or (bool(self._sync_only) and any(seq.pooling is not None for seq in batch.seqs)))
            step_output = self.executor.execute_model(step_input)
            tokens = step_output.sampled_token_ids
        except Exception as err:  # isolate: these requests fail, the engine and every other request go on
            forget_unfilled_blocks(self.scheduler, batch)
            if self.lora_slots is not None:  # a slot's copy may have failed halfway: copy every adapter again
                self.lora_slots.forget()
            if can_isolate(batch, self.executor, self.speculative, err):  # unless they pass one at a time
                logger.exception("engine step failed; rerunning its %d requests one by one", len(batch.seqs))
                return outputs + self._rerun_one_by_one(batch)
            logger.exception("engine step failed; finishing %d request(s) with 'error'", len(batch.seqs))
            message = f"{type(err).__name__}: {err}"
            return outputs + [self._finish(seq, "error", error=message) for seq in batch.seqs]
        return self._postprocess_step(batch, step_output, tokens, outputs)

    def _apply_block_ops(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """Carry out the block operations of a batch that schedules no sequence; the outputs of requests it fails.

        Such a batch can still hold a swap-out: under async scheduling a request whose last token is in flight
        and ends it by length is not scheduled but keeps its blocks, so the one other running request may find no
        free block and swap itself out. Its CPU blocks get its K/V only from this step's copy: skipping the empty
        step would bring it back later with whatever those CPU blocks held before. The runner applies the
        operations of an empty step and computes nothing (ModelRunner._run)."""
        if not batch.moves_blocks:
            return []
        try:
            self.executor.execute_model(build_step_input(batch, self.cache_config.block_size,
                                                         self._finished_since_last_step))
            self._finished_since_last_step = []
        except Exception as err:  # the requests whose blocks were moving fail, the engine goes on
            logger.exception("block operations of an empty step failed")
            message = f"{type(err).__name__}: {err}"
            return [self._finish(seq, "error", error=message) for seq in batch.preempted
                    if seq.status is SequenceStatus.SWAPPED]
        return []

    def _rerun_one_by_one(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """A failed step's work again, one sequence per forward (minillm/engine/step_isolation.py): the outputs of
        the sequences that fail alone (finished with "error") and of the step the others make together."""
        batch, step_output, failed = rerun_one_by_one(batch, self.cache_config.block_size, self.executor.execute_model,
                                                      self.lora_slots)
        outputs = [self._finish(seq, "error", error=message) for seq, message in failed]
        if batch.is_empty:
            return outputs
        return self._postprocess_step(batch, step_output, step_output.sampled_token_ids, outputs)

    def _postprocess_step(self, batch: ScheduledBatch, step_output: StepOutput, tokens: list[list[int]],
                          outputs: list[RequestOutput]) -> list[RequestOutput]:
        """A synchronous step's results into its sequences: drafts verified, log-probs scored, the scheduler's
        bookkeeping, then the output loop; `outputs` (extended and returned) gets every request to report."""
        try:
            if any(seq.spec_token_ids for seq in batch.seqs):
                tokens = self._verify_drafts(batch, step_output)
            scored = self._scored_tokens(batch, step_output, tokens)
            if self._sync_only:  # an embedding request may be in the batch: keep its vector
                pool_embeddings(batch.seqs, step_output, tokens)
            if self.speculative is not None:  # head proposers keep the target's features of the accepted rows
                self.speculative.record_step(batch, step_output, tokens)
            self.scheduler.postprocess(batch, tokens)  # computed counts, new tokens, rollback of rejected drafts
        except Exception as err:  # a bad verification result fails these requests, not the engine
            logger.exception("step postprocessing failed; finishing %d request(s) with 'error'", len(batch.seqs))
            message = f"{type(err).__name__}: {err}"
            return outputs + [self._finish(seq, "error", error=message) for seq in batch.seqs]
        self._emit_outputs(batch.seqs, tokens, scored, outputs)
        if self.speculative is not None:  # proposer state of finished / preempted requests
            self.speculative.release(self.scheduler)
        return outputs

    def _schedule(self) -> tuple[ScheduledBatch, list[RequestOutput]]:
        """The scheduler's batch for the next step (counted, its sequences' first schedule time stamped), and the
        outputs of the requests the scheduler finished itself ("error": they can never fit; blocks already free)."""
        batch = self.scheduler.schedule()
        outputs = [self._drop_rejected(seq) for seq in self._drain_rejected()]
        if not batch.is_empty:
            self.num_steps += 1
            now = time.perf_counter()
            for seq in batch.seqs:
                if seq.first_scheduled_time is None:
                    seq.first_scheduled_time = now
        return batch, outputs

    def _verify_drafts(self, batch: ScheduledBatch, step_output: Any) -> list[list[int]]:
        """Turn the runner's samples (and logits) at every draft row into the accepted tokens L per sequence (the
        verify step of speculative decoding): the `verify_drafts` hook when set, else the speculative decoder."""
        if self.verify_drafts is not None:
            return self.verify_drafts(batch, step_output.sampled_token_ids)
        if self.speculative is None:
            raise ValueError("sequences carry draft tokens (spec_token_ids) but the engine has no speculative_config "
                             "and LLMEngine.verify_drafts is None: set one or do not propose drafts")
        return self.speculative.verify(batch, step_output)

    def _drain_rejected(self) -> list[Sequence]:
        rejected = getattr(self.scheduler, "rejected", None)
        if not rejected:
            return []
        drained = list(rejected)
        rejected.clear()
        return drained

    def _drop_rejected(self, seq: Sequence) -> RequestOutput:
        self._requests.pop(seq.request_id, None)
        if seq.finish_time is None:
            seq.finish_time = time.perf_counter()
        return RequestOutput.from_sequence(seq)
