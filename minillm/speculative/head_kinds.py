"""The three head methods by name: build new heads, load trained ones, make the engine's proposer (chapter 9).

    new_heads(config)                          fresh MedusaHeads / EagleHead / MTPModules for a HeadConfig
    load_heads(kind, directory, target_config) (heads, config) from `minillm train-heads` output
    build_head_proposer(spec, engine)          what engine_hooks.build_proposer returns for medusa/eagle/mtp
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.speculative.config import SpeculativeConfig
from minillm.speculative.draft_vocab import draft_vocab_ids
from minillm.speculative.eagle import EagleHead, EagleProposer
from minillm.speculative.head_proposer import HeadProposer
from minillm.speculative.heads import HeadConfig, TargetParts, load_head_files, resolve_heads_dir
from minillm.speculative.medusa import MedusaHeads, MedusaProposer
from minillm.speculative.mtp import MTPModules, MTPProposer

KINDS: dict[str, tuple[type[nn.Module], type[HeadProposer]]] = {
    "medusa": (MedusaHeads, MedusaProposer),
    "eagle": (EagleHead, EagleProposer),
    "mtp": (MTPModules, MTPProposer),
}


def new_heads(config: HeadConfig) -> nn.Module:
    return KINDS[config.kind][0](config)


def load_heads(kind: str, directory: str | os.PathLike, target: ModelConfig, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, HeadConfig]:
    """Heads saved by train_heads, checked against the target's fingerprint, on `device` in `dtype`."""
    config, state = load_head_files(directory, kind, target)
    heads = new_heads(config)
    missing, unexpected = heads.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: {kind} heads with missing tensors {missing[:4]} / unexpected tensors "
                         f"{unexpected[:4]}")
    return heads.to(device=device, dtype=dtype).eval(), config


def build_head_proposer(spec: SpeculativeConfig, engine: Any, seed: int = 0) -> HeadProposer:
    """The proposer of a head method for this engine: heads from spec.model or the shipped weights, and the
    target's embedding, final norm and LM head (so the target must live in this process). Its greedy proposals
    replay CUDA graphs where the engine's steps do (CUDA, enforce_eager=False)."""
    try:
        target = engine.runner.model
    except AttributeError:
        raise ValueError(f"speculative method {spec.method!r} reuses the target's embedding and LM head, which live "
                         f"in another process here; use the in-process executor") from None
    directory = resolve_heads_dir(spec.method, spec.model, engine.model_config)
    heads, config = load_heads(spec.method, directory, engine.model_config, engine.device, engine.dtype)
    cuda_graphs = torch.device(engine.device).type == "cuda" and not engine.engine_config.enforce_eager
    parts = TargetParts(target)
    if spec.draft_vocab_size is not None:  # FR-Spec: draft over the target's most frequent answer tokens only
        parts.vocab.restrict(draft_vocab_ids(spec.draft_vocab_size, directory, engine.model_config))
    return KINDS[spec.method][1](heads, config, parts, seed=seed, cuda_graphs=cuda_graphs)
