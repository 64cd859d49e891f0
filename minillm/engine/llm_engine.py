"""LLMEngine: the loop that turns requests into tokens (chapter 2; chapter 6 swaps in a better scheduler).

    add_request(...)   validate, tokenize, create a Sequence, hand it to the scheduler
    step()             batch = scheduler.schedule(); tokens = runner.execute(batch); update every sequence:
                       num_computed_tokens, the new token, incremental text, stop conditions; finished
                       sequences go back to the scheduler, which frees their KV blocks at once
    abort(request_id)  drop a request wherever it is and free its blocks

The names are vLLM's (`add_request`, `step`, `has_unfinished_requests`), so a server can drive the engine one
step at a time and stream what each step produced. The engine is parametric in its scheduler (static batching of
chapter 2 or continuous batching of chapter 6) and KV layout (contiguous or paged): both meet in
scheduler_interface.py and forward_context.py.

Robustness: a bad request is rejected by add_request (ValueError for that request only, nothing else changes); an
exception inside a step finishes that step's requests with finish_reason "error" and the message, frees their
KV, and the engine carries on with whatever arrives next.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence as SequenceT

import torch

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.detokenizer import (DetokenizerState, detokenize_incrementally, find_stop_string,
                                        stream_safe_length)
from minillm.engine.kv_cache import cache_geometry, kv_bytes_per_block
from minillm.engine.model_runner import ModelRunner
from minillm.engine.sequence import Sequence, SequenceStatus
from minillm.engine.static_scheduler import StaticScheduler
from minillm.hooks import overriding
from minillm.outputs import RequestOutput
from minillm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _RequestState:
    seq: Sequence
    detok: DetokenizerState


def make_scheduler(engine_config: EngineConfig, num_blocks: int, block_size: int, max_model_len: int,
                   num_cpu_blocks: int) -> Any:
    """The one place that maps `scheduling=` onto a Scheduler implementation."""
    if engine_config.scheduling == "static":
        return StaticScheduler(engine_config.max_num_seqs, max_model_len, block_size,
                               engine_config.max_num_batched_tokens)
    # chapter 6: continuous batching over paged blocks
    from minillm.engine.block_manager import BlockManager
    from minillm.engine.scheduler import Scheduler
    block_manager = BlockManager(num_blocks, block_size, num_cpu_blocks,
                                 enable_prefix_caching=engine_config.enable_prefix_caching)
    return Scheduler(dataclasses.replace(engine_config, max_model_len=max_model_len), block_manager)


class LLMEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: Any, model_config: ModelConfig,
                 engine_config: EngineConfig, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, seed: int = 0,
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.model_config = model_config
        self.engine_config = engine_config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        # already validated callables (LLM resolves them once through minillm.course.overrides)
        self.overrides = dict(overrides or {})
        for name, fn in self.overrides.items():
            if not callable(fn):
                raise TypeError(f"override {name!r} must be a callable here, got {type(fn).__name__}; "
                                f"resolve names and paths with minillm.course.overrides.resolve_overrides")
        self.max_model_len = engine_config.max_model_len or model_config.max_position_embeddings
        if engine_config.scheduling == "static":
            # static batching reserves max_model_len tokens per batch slot: the pool is exactly that big
            block_size = self.max_model_len if engine_config.kv_layout == "contiguous" else engine_config.block_size
            num_blocks = engine_config.max_num_seqs * -(-self.max_model_len // block_size)
        else:
            # the paged pool: explicit, from a byte budget, or (CUDA) from what a profiled forward leaves free
            num_blocks, block_size = cache_geometry(engine_config, model_config, self.max_model_len, dtype,
                                                    self.device, model=model)
        num_cpu_blocks = 0
        if engine_config.preemption_mode == "swap" and engine_config.kv_layout == "paged":
            num_cpu_blocks = engine_config.swap_space // kv_bytes_per_block(model_config, block_size, dtype)
        self.runner = ModelRunner(model, model_config, num_blocks, block_size, self.device, dtype, seed,
                                  num_cpu_blocks, engine_config=engine_config)
        self.scheduler = make_scheduler(engine_config, num_blocks, block_size, self.max_model_len, num_cpu_blocks)
        eos = set(model_config.eos_token_ids)
        tok_eos = getattr(tokenizer, "eos_token_id", None)
        eos.update(tok_eos if isinstance(tok_eos, (list, tuple, set)) else [tok_eos] if tok_eos is not None else [])
        self.eos_token_ids = eos
        self._requests: dict[str, _RequestState] = {}
        self._counter = itertools.count()
        self.num_steps = 0

    # -- requests -----------------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | SequenceT[int],
                    sampling_params: SamplingParams | None = None, arrival_time: float | None = None,
                    prompt_token_ids: list[int] | None = None) -> str:
        """Validate and queue one request; returns its id. Raises ValueError/TypeError for this request only.
        `prompt_token_ids`, when given, are the already validated tokens of a text `prompt` (no re-encoding)."""
        sampling_params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        request_id = str(next(self._counter)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
        if prompt_token_ids is not None and isinstance(prompt, str):
            text, token_ids = prompt, list(prompt_token_ids)
        else:
            text, token_ids = self.validate_prompt(prompt)
        seq = Sequence(request_id, token_ids, sampling_params, prompt=text, arrival_time=arrival_time)
        if sampling_params.seed is not None:
            seq.generator = torch.Generator(device=self.device)
            seq.generator.manual_seed(sampling_params.seed)
        self.scheduler.add(seq)
        self._requests[request_id] = _RequestState(seq, DetokenizerState.for_prompt(len(token_ids)))
        return request_id

    def validate_prompt(self, prompt: str | SequenceT[int]) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt, or ValueError/TypeError saying what is wrong with it."""
        if isinstance(prompt, str):
            if prompt == "":
                raise ValueError("prompt is empty: give at least one character or one token id")
            text, token_ids = prompt, list(self.tokenizer.encode(prompt))
            if not token_ids:
                raise ValueError(f"prompt {prompt!r} encodes to zero tokens")
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or one token id")
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)]
            if bad:
                raise TypeError(f"a token-id prompt must hold Python ints, got {bad[0]!r} "
                                f"({type(bad[0]).__name__})")
            text, token_ids = None, list(prompt)
        else:
            raise TypeError(f"prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        vocab = self.model_config.vocab_size
        out_of_range = [t for t in token_ids if not 0 <= t < vocab]
        if out_of_range:
            raise ValueError(f"token id {out_of_range[0]} is outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}")
        return text, token_ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is (waiting, running, swapped) and free its KV blocks."""
        state = self._requests.pop(str(request_id), None)
        if state is None:
            return None
        seq = self.scheduler.abort(state.seq.request_id) or state.seq
        seq.status = SequenceStatus.FINISHED
        if seq.finish_reason is None:
            seq.finish_reason = "abort"
        seq.finish_time = time.perf_counter()
        return RequestOutput.from_sequence(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # -- the step -----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler decision and one forward. Returns a (cumulative) RequestOutput for every request that
        took part in this step, finished ones included.

        The whole step runs under the learner's overrides (if any), so an overridden scheduler or block-table
        function (chapters 5-6) is exercised as well as an overridden layer (chapter 1)."""
        with overriding(self.overrides):
            return self._step()

    def _step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        # requests the scheduler finished itself ("error": they can never fit); their blocks are already free
        outputs = [self._drop_rejected(seq) for seq in self._drain_rejected()]
        if batch.is_empty:
            return outputs
        self.num_steps += 1
        now = time.perf_counter()
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        try:
            tokens = self.runner.execute(batch)
        except Exception as err:  # isolate: these requests fail, the engine and every other request go on
            logger.exception("engine step failed; finishing %d request(s) with 'error'", len(batch.seqs))
            message = f"{type(err).__name__}: {err}"
            return outputs + [self._finish(seq, "error", error=message) for seq in batch.seqs]
        now = time.perf_counter()
        for seq, n, token in zip(batch.seqs, batch.num_new_tokens, tokens):
            seq.num_computed_tokens += n
            if token is not None:
                seq.append_token(token, now)
                reason = self._check_stop(seq, token)
                if reason is not None:
                    outputs.append(self._finish(seq, reason))
                    continue
            outputs.append(self._output(seq))
        return outputs

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        """Update the sequence's text for its new token; return a finish reason or None."""
        params = seq.sampling_params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return "stop"  # the stop token's text is not added to the output
        state = self._requests[seq.request_id]
        new_text = detokenize_incrementally(self.tokenizer, seq.token_ids, state.detok)
        if new_text:
            seq.output_text += new_text
            cut = find_stop_string(seq.output_text, params.stop_list, len(new_text))
            if cut >= 0:
                seq.output_text = seq.output_text[:cut]
                return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        seq.finish_reason = reason
        seq.error = error
        seq.finish_time = time.perf_counter()
        if reason == "length":  # flush a multi-byte character still pending at the end
            state = self._requests.get(seq.request_id)
            if state is not None and state.detok.read_offset < seq.num_tokens:
                tail = self.tokenizer.decode(seq.token_ids[state.detok.prefix_offset:])
                head = self.tokenizer.decode(seq.token_ids[state.detok.prefix_offset:state.detok.read_offset])
                seq.output_text += tail[len(head):]
                cut = find_stop_string(seq.output_text, seq.sampling_params.stop_list, len(tail) - len(head))
                if cut >= 0:
                    seq.output_text, seq.finish_reason = seq.output_text[:cut], "stop"
        self.scheduler.finish(seq)
        self._requests.pop(seq.request_id, None)
        return RequestOutput.from_sequence(seq)

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

    def _output(self, seq: Sequence) -> RequestOutput:
        """A running request's output: text that might still become a stop string is held back."""
        safe = stream_safe_length(seq.output_text, seq.sampling_params.stop_list)
        return RequestOutput.from_sequence(seq, text=seq.output_text[:safe])
