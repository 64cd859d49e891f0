"""Sequence: one request's tokens and its bookkeeping as it moves through the engine.

A request enters WAITING, is admitted to RUNNING by the scheduler, may be preempted (back to WAITING for
recompute, or to SWAPPED when its KV blocks went to CPU memory) and ends FINISHED. `num_computed_tokens`
counts the tokens whose keys and values are already in the KV cache; the next step computes tokens
`num_computed_tokens .. num_tokens-1` (one for a decode, a chunk for chunked prefill, all for a prefill).

Speculative decoding (chapter 9) adds `spec_token_ids`: draft tokens a proposer guessed for the positions after
the last token. They are *not* part of `token_ids`: the next step computes them together with the last token
(a verify step), and `Scheduler.postprocess` appends only the drafts the model accepted, plus one sampled token.
Chapters 2, 5 and 6 build on this.
"""
from __future__ import annotations

import enum
import itertools
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minillm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"


_seq_counter = itertools.count()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: "SamplingParams",
                 prompt: str | None = None, arrival_time: float | None = None) -> None:
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.prompt = prompt
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # of those, how many came from the prefix cache
        self.block_table: list[int] = []  # physical KV blocks, in logical order
        self.arrival_time = time.perf_counter() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.token_times: list[float] = []  # when each output token was produced
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.error: str | None = None
        # what ended a "stop" finish (vLLM's stop_reason): the stop string or stop_token_ids entry; None for EOS
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.output_text = ""  # detokenized output, kept by the engine for stop strings and streaming
        # what min_tokens bans until that many tokens are out: EOS (unless ignore_eos) and stop_token_ids; the
        # engine fills it in (it knows the EOS ids) when the request asks for min_tokens
        self.min_tokens_stop_ids: tuple[int, ...] = ()
        # the LoRA adapter its tokens run with (minillm.lora), None: the base model; a prefix-cache key of a
        # request with an adapter starts from `cache_salt`, so no block is shared across adapters
        self.lora_request = None
        self.cache_salt: int | None = None
        # a prompt given as embeddings: [num_prompt_tokens, hidden] on the host; token_ids holds placeholders for
        # those positions, and embed_keys a prefix-cache key for each (minillm/engine/prompt_embeds.py)
        self.prompt_embeds = None
        self.embed_keys: list[int] | None = None
        self.spec_token_ids: list[int] = []  # draft tokens to verify next step (not in token_ids)
        self.constraint = None  # structured outputs / allowed_token_ids / bad_words (engine/constraints.py)
        self.pooling = None  # an embedding request's PoolingParams (minillm/pooling.py)
        self.embedding: list[float] | None = None  # its vector, once its prefill has run
        self.pooled = None  # MEAN / CLS pooling's running state over its prefill chunks (pooling.PooledRows)
        self.spec_metrics = None  # SpecDecodeMetrics once speculative decoding verified drafts for it
        # log-probabilities, kept only when sampling_params asks (None otherwise): one dict per generated token,
        # and [None] + one per prompt position scored so far
        self.logprobs: list | None = None
        self.cumulative_logprob = 0.0
        self.prompt_logprobs: list | None = None

    # -- tokens -------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def cache_keys(self) -> list[int]:
        """What the prefix cache keys this sequence's blocks by: its token ids, but for an embeddings prompt a key
        per position derived from that position's vector (placeholders would make every such prompt alike)."""
        if self.embed_keys is None:
            return self.token_ids
        return self.embed_keys + self.token_ids[self.num_prompt_tokens:]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True until every prompt token has its K/V in the cache."""
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def reads_every_prompt_row(self) -> bool:
        """True when this request needs an output row at every prompt position, which a prefix-cache hit never
        computes: prompt_logprobs (each position's log-probabilities) and MEAN / CLS pooling (minillm/pooling.py).
        Such a request computes its whole prompt (BlockManager skips the cache lookup for it)."""
        return (getattr(self.sampling_params, "prompt_logprobs", None) is not None
                or (self.pooling is not None and self.pooling.reads_every_row))

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_times.append(now)
        self.token_ids.append(token_id)

    def truncate_output(self, num_tokens: int) -> None:
        """Keep only the first num_tokens tokens (at least the prompt): the engine cuts a multi-token step's
        tokens after a stop. num_computed_tokens is clamped so that it never counts a dropped token's K/V
        (the prefix cache hashes token_ids up to num_computed_tokens)."""
        if not self.num_prompt_tokens <= num_tokens <= self.num_tokens:
            raise ValueError(f"sequence {self.seq_id}: can truncate to {self.num_prompt_tokens}..{self.num_tokens} "
                             f"tokens, got {num_tokens}")
        dropped = self.num_tokens - num_tokens
        if dropped:
            del self.token_ids[num_tokens:]
            del self.token_times[len(self.token_times) - dropped:]
            self.num_computed_tokens = min(self.num_computed_tokens, num_tokens - 1)

    # -- blocks -------------------------------------------------------------------------------------------
    def num_blocks_needed(self, block_size: int, num_tokens: int | None = None) -> int:
        """Blocks needed to hold `num_tokens` (default: all) tokens: ceil(n / block_size)."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return (n + block_size - 1) // block_size

    def block_token_ids(self, index: int, block_size: int) -> list[int]:
        """Token ids that logical block `index` holds (full or partial)."""
        return self.token_ids[index * block_size: (index + 1) * block_size]

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, status={self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})")
