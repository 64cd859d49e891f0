"""The prompt forms LLM.generate accepts, as vLLM's (vllm/inputs): a str, a list of token ids, or the typed dicts
TextPrompt {"prompt": str} and TokensPrompt {"prompt_token_ids": [int, ...]}, and for LLM.generate EmbedsPrompt
{"prompt_embeds": tensor [n, hidden_size]} (minillm/engine/prompt_embeds.py); one of them or a list of them.
Chapter 1 meets LLM.generate with plain strings; a vLLM user's code passes the dicts, and runs unchanged.

Every form becomes the engine's own: a str, a list[int] or an embeddings tensor (LLMEngine.validate_prompt checks
the text, the ids' range, the tensor's shape and the length). A dict may add "cache_salt" (vLLM's: the prompt
shares prefix-cache blocks only with prompts of the same salt) where the caller passes it on (LLM.generate,
LLM.embed: `options`, `cache_salts`). The dicts' other keys (multi_modal_data, ...) are refused by name: an engine
that dropped them silently would answer another question than the one asked.
"""
from __future__ import annotations

from typing import Any

import torch

Prompt = str | list[int] | torch.Tensor  # a torch.Tensor: an EmbedsPrompt's vectors
PROMPT_KEYS = ("prompt", "prompt_token_ids", "prompt_embeds")  # TextPrompt's, TokensPrompt's, EmbedsPrompt's key


def from_prompt_dict(prompt: dict, where: str = "", options: tuple[str, ...] = ()) -> Prompt:
    """A TextPrompt's text, a TokensPrompt's ids or an EmbedsPrompt's tensor. TypeError for a dict with none of
    those keys (not a prompt), ValueError for one with two or with keys this caller cannot honour (naming them).
    `options`: what the caller reads besides text and ids: "prompt_embeds" (an EmbedsPrompt is allowed) and keys
    allowed beside the prompt's ("cache_salt")."""
    kinds = [key for key in PROMPT_KEYS if key in prompt]
    extra = sorted(set(prompt) - set(PROMPT_KEYS) - set(options))
    if not kinds:  # not a prompt at all: the wrong type, as a number would be
        raise TypeError(f"{where}a prompt dict needs the key 'prompt' (a TextPrompt), 'prompt_token_ids' (a "
                        f"TokensPrompt) or 'prompt_embeds' (an EmbedsPrompt), got keys {sorted(prompt)}")
    if len(kinds) > 1 or extra:
        raise ValueError(f"{where}a prompt dict must have exactly one of the keys {', '.join(map(repr, PROMPT_KEYS))} "
                         f"(vLLM's TextPrompt, TokensPrompt or EmbedsPrompt; no multimodal input), got keys "
                         f"{sorted(prompt)}")
    kind = kinds[0]
    value = prompt[kind]
    if kind == "prompt_embeds":  # the engine checks the tensor (enable_prompt_embeds, its shape)
        if kind not in options:
            raise ValueError(f"{where}an EmbedsPrompt ('prompt_embeds') is not taken here: LLM.generate takes it")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}an EmbedsPrompt's 'prompt_embeds' must be a torch.Tensor [num_positions, "
                            f"hidden_size], got {type(value).__name__}")
        return value
    if kind == "prompt" and not isinstance(value, str):
        raise TypeError(f"{where}a TextPrompt's 'prompt' must be a str, got {type(value).__name__}: {value!r}")
    if kind == "prompt_token_ids" and not isinstance(value, (list, tuple)):
        raise TypeError(f"{where}a TokensPrompt's 'prompt_token_ids' must be a list of token ids, got "
                        f"{type(value).__name__}: {value!r}")
    return value if isinstance(value, str) else list(value)


def normalize_prompts(prompts: Any, options: tuple[str, ...] = ()) -> list[Prompt]:
    """str -> [str]; list[int] -> [list[int]]; a prompt dict -> [its str or ids]; a list of str / list[int] / dicts
    -> the list of them. Anything else: TypeError. A list that holds no str, list or dict is one token-id prompt,
    whatever else it holds: [1, 2.0] is then refused for its 2.0 (validate_prompt), not as a "list of prompts"
    whose first prompt is the int 1. `options`: keys a prompt dict may add (from_prompt_dict)."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, dict):
        return [from_prompt_dict(prompts, options=options)]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts is empty: an empty list is neither a prompt nor a list of prompts")
        if not any(isinstance(p, (str, list, tuple, dict)) for p in prompts):
            return [list(prompts)]
        normalized: list[Prompt] = []
        for i, p in enumerate(prompts):
            if isinstance(p, dict):
                p = from_prompt_dict(p, where=f"prompt {i}: ", options=options)
            elif not isinstance(p, (str, list, tuple)):
                raise TypeError(f"prompt {i}: expected a str, a list of token ids or a prompt dict, got "
                                f"{type(p).__name__}: {p!r}")
            normalized.append(p if isinstance(p, str) or not isinstance(p, (list, tuple)) else list(p))
        return normalized
    raise TypeError(f"prompts must be a str, a list of token ids, a prompt dict ({{'prompt': str}} or "
                    f"{{'prompt_token_ids': [...]}}), or a list of those; got {type(prompts).__name__}")


def cache_salts(prompts: Any, num_prompts: int) -> list[str | None]:
    """Each prompt's "cache_salt" (None where its dict has none, or it is no dict), in normalize_prompts' order
    (called after it, with its `options` holding "cache_salt"; the engine checks the values)."""
    if isinstance(prompts, dict):
        return [prompts.get("cache_salt")]
    if isinstance(prompts, (list, tuple)) and any(isinstance(p, dict) for p in prompts):
        return [p.get("cache_salt") if isinstance(p, dict) else None for p in prompts]
    return [None] * num_prompts
