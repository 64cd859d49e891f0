"""A model's own sampling defaults: its generation_config.json (vLLM's `generation_config="auto"`; read by LLM and
by chapter 10's server).

A chat model ships the sampling its authors tuned it for (Qwen2.5-Instruct: temperature 0.7, top_p 0.8, top_k 20,
repetition_penalty 1.05) in generation_config.json beside its weights. vLLM serves with those defaults: a request,
or `LLM.generate` without sampling_params, gets them wherever it does not set a value itself. The same here:

    generation_config="auto"    the model directory's file (a GGUF file has none: minillm's defaults)
    generation_config="vllm"    no file: SamplingParams' own defaults (vLLM's spelling; "minillm" says the same)
    generation_config=DIR       that directory's generation_config.json
    override_generation_config  {"temperature": 0.5, ...}: merged over the file's (over nothing with "vllm")

Only the fields that are sampling parameters are read, under their SamplingParams names (max_new_tokens becomes
max_tokens, a server-wide default for the completion's length); the rest (do_sample, eos_token_id, ...) is the
model's business, not a request's.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from minillm.sampling_params import SamplingParams

# generation_config.json's name -> SamplingParams' name
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# the knobs among them a server request may leave out (max_tokens has its own rule: a cap on every completion)
SAMPLING_KNOBS = tuple(name for name in GENERATION_FIELDS.values() if name != "max_tokens")
NO_FILE = ("vllm", "minillm")  # generation_config values that read no file


def _read(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return {name: config[name] for name in GENERATION_FIELDS if config.get(name) is not None}


def default_sampling_fields(model_path: str, generation_config: str = "auto",
                            override: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The SamplingParams fields (by their SamplingParams names) a request gets where it sets none itself.
    Raises ValueError naming the value for an unknown source, a directory without the file, an unknown override
    field, or values SamplingParams refuses."""
    if not isinstance(generation_config, str):
        raise TypeError(f"generation_config must be 'auto', 'vllm' or a directory, got {generation_config!r}")
    if override is not None and not isinstance(override, Mapping):
        raise TypeError(f"override_generation_config must be a dict, got {type(override).__name__}")
    unknown = sorted(set(override or {}) - set(GENERATION_FIELDS))
    if unknown:
        raise ValueError(f"override_generation_config: unknown field {unknown[0]!r}; allowed: "
                         f"{', '.join(GENERATION_FIELDS)}")
    if generation_config == "auto":
        fields = _read(model_path) if os.path.isfile(os.path.join(model_path, "generation_config.json")) else {}
    elif generation_config in NO_FILE:
        fields = {}
    elif os.path.isfile(os.path.join(generation_config, "generation_config.json")):
        fields = _read(generation_config)
    else:
        raise ValueError(f"generation_config={generation_config!r}: no generation_config.json there; give 'auto' "
                         f"(the model's own), 'vllm' (none) or a directory holding one")
    fields.update({k: v for k, v in (override or {}).items() if v is not None})
    params = {GENERATION_FIELDS[name]: value for name, value in fields.items()}
    try:
        SamplingParams(**params)
    except (TypeError, ValueError) as err:
        raise ValueError(f"the generation config's defaults {params} are not valid sampling parameters: {err}") \
            from None
    return params
