"""Prompts given as embeddings (vLLM's `enable_prompt_embeds`): rows that replace the token embedding's output.
An engine feature beside chapter 6's scheduling (no chapter builds it; README, "prompt_embeds").

A prompt is usually token ids, which the model's first layer turns into vectors (embed_tokens). Some callers have
the vectors already: a soft prompt tuned by gradient descent, an image or audio encoder's projected features, the
output of another model. `LLM(enable_prompt_embeds=True).generate({"prompt_embeds": tensor})` takes a float
tensor [n, hidden_size] for an n-position prompt; generated tokens are ordinary tokens again.

How it runs without a second model path:
* The sequence holds n *placeholder* token ids (0, a valid id) so that everything counting positions (lengths,
  blocks, chunked prefill, preemption) works unchanged, and the tensor beside them (Sequence.prompt_embeds).
* build_step_input notes, for each prompt chunk, which rows of the step's packed batch are embedding rows and
  their vectors (StepInput.prompt_embeds: (first row, rows) pairs, on the host; a recomputed or chunked prompt
  slices the same tensor again).
* The runner runs such a step eagerly (a CUDA graph would replay the lookup it recorded) with a forward hook on
  the embedding module that overwrites those rows of its output (`EmbeddingRows`). What follows the lookup, a
  Gemma-style scale included, sees the caller's vectors as it would see looked-up ones (vLLM's inputs_embeds).

What the placeholders must not reach: the prefix cache, which keys such a prompt's blocks by a digest of each
position's vector instead (`embedding_keys`, Sequence.cache_keys: the same soft prompt twice shares its blocks, as
in vLLM, and no placeholder block is ever shared with a prompt of token 0s), repetition_penalty (it penalises
prompt tokens), prompt_logprobs (there are no prompt tokens to score), the detokenizer's context window and
speculative decoding's drafts (they read prompt tokens). Those are refused or skipped by name
(LLMEngine.add_request).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn


def check_prompt_embeds(embeds: object, hidden_size: int, enabled: bool) -> torch.Tensor:
    """The caller's tensor as a CPU float tensor [n, hidden_size] (copied: later changes to theirs do not reach the
    request), or ValueError / TypeError naming what is wrong."""
    if not enabled:
        raise ValueError("prompt_embeds needs an engine built with enable_prompt_embeds=True (minillm serve: "
                         "--enable-prompt-embeds)")
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"prompt_embeds must be a torch.Tensor [num_positions, hidden_size], got "
                        f"{type(embeds).__name__}")
    if embeds.dim() != 2 or embeds.shape[0] < 1 or embeds.shape[1] != hidden_size:
        raise ValueError(f"prompt_embeds must have shape [num_positions >= 1, hidden_size={hidden_size}], got "
                         f"{list(embeds.shape)}")
    if not embeds.is_floating_point():
        raise TypeError(f"prompt_embeds must be a floating-point tensor, got {embeds.dtype}")
    embeds = embeds.detach().to("cpu", copy=True)
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError("prompt_embeds holds NaN or infinite values")
    return embeds


def embedding_keys(embeds: torch.Tensor) -> list[int]:
    """A prefix-cache key per position of an embeddings prompt: -1 - (a 63-bit digest of the vector's bytes).
    Negative, so never a token id; the same vectors (same dtype) give the same keys, so two requests with one
    soft prompt share its blocks, and any other vector another key."""
    rows = embeds.contiguous().view(torch.uint8).reshape(embeds.shape[0], -1).numpy()
    return [-1 - (int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") >> 1)
            for row in rows]


def embeds_problem(seq: Any, engine: Any) -> str | None:
    """Why an embeddings prompt cannot run with this request's options on this engine (None: it can)."""
    params = seq.sampling_params
    if getattr(engine, "speculative", None) is not None:
        return "prompt_embeds with speculative decoding: the drafts read the prompt's tokens"
    if params.prompt_logprobs is not None:
        return f"prompt_logprobs={params.prompt_logprobs} with prompt_embeds: the prompt has no tokens to score"
    if params.repetition_penalty != 1.0:
        return (f"repetition_penalty={params.repetition_penalty} with prompt_embeds: it penalises the prompt's "
                f"tokens, which an embeddings prompt does not have (presence and frequency penalties work)")
    if seq.pooling is not None:
        return "an embedding (pooling) request with prompt_embeds"
    return None


def embedding_rows(seq: Any, start: int, end: int, first_row: int) -> tuple[int, torch.Tensor]:
    """(first step row, vectors) for a sequence whose positions start..end-1 (start inside its embeddings prompt)
    are packed into the step from row `first_row` on: the prompt's vectors start..min(end, n)-1."""
    return first_row, seq.prompt_embeds[start:min(end, seq.prompt_embeds.shape[0])]


def embedding_module(model: nn.Module) -> nn.Module | None:
    """The token embedding of a minillm model (model.model.embed_tokens; None on a pipeline stage without it)."""
    inner = getattr(model, "model", None)
    module = getattr(inner, "embed_tokens", None)
    return module if isinstance(module, nn.Module) and not isinstance(module, nn.Identity) else None


class EmbeddingRows:
    """While active, the embedding module's output has `rows` replaced by `values` (a forward hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.module = embedding_module(model)
        self.rows: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self._handle = None if self.module is None else self.module.register_forward_hook(self._replace)

    def set(self, chunks: list[tuple[int, torch.Tensor]], device: torch.device, dtype: torch.dtype) -> None:
        """The step's (first row, vectors) pairs, uploaded; `clear` after the forward. (A pipeline stage without
        the embedding has nothing to replace.)"""
        if self.module is None:
            return
        rows = torch.cat([torch.arange(first, first + len(values)) for first, values in chunks])
        values = torch.cat([values for _, values in chunks])
        if torch.device(device).type == "cuda":  # from pinned memory: the host does not wait for the stream
            rows, values = rows.pin_memory(), values.pin_memory()
        self.rows = rows.to(device, non_blocking=True)
        self.values = values.to(device, dtype, non_blocking=True)

    def clear(self) -> None:
        self.rows = self.values = None

    def _replace(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.rows is None:
            return None
        output[self.rows] = self.values.to(output.dtype)  # the lookup's result: a fresh tensor, ours to write
        return output

