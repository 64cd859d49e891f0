"""A distilled draft model stored as what it does not share with its target (chapter 9).

`minillm train-heads --kind draft` distils the target's first L layers into a draft (draft_loss: the target's
next-token law where a draft proposes, in the target's own answers), keeping its embedding and LM head frozen.
Those two matrices are most of a small model (SmolLM2-135M: 28.3M of the 134.5M parameters, 57 MB in bf16, more
than a whole layer's 3.5M eight times over), and they are the target's own, so a draft directory holds only the
rest: its L decoder layers and its final norm (`draft.safetensors`, bf16), and a `config.json` with the layer
count, the target's fingerprint (heads.target_fingerprint: a draft trained on one target is refused on another)
and how it was trained. Loading builds an unquantized model of the target's architecture with L layers and hands it
the target's embedding and LM head modules: no copy, no extra memory, and a quantized target lends its quantized
LM head as it is.

    save_draft(directory, draft, target_config, training)   what train_heads writes
    is_draft_dir(path)                                      a directory of this format (not an HF or GGUF model)
    load_draft(directory, target, target_config, device, dtype) -> (draft model, its ModelConfig)

speculative_config {"method": "draft_model", "model": DIR} loads one; without "model" and without
"draft_num_layers", the shipped draft (minillm/speculative/weights/draft, found by heads.shipped_weights_dir)
where it was trained on this target.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.speculative.heads import target_fingerprint

CONFIG_FILE, WEIGHTS_FILE = "config.json", "draft.safetensors"
_OWN = ("model.layers.", "model.norm.")  # the draft's own tensors; embedding and LM head are the target's


def save_draft(directory: str | os.PathLike, draft: nn.Module, target_config: ModelConfig,
               training: dict[str, Any] | None = None) -> Path:
    """Write a distilled draft (a model whose embedding and LM head are the target's) in this format."""
    from minillm.loader.model_files import save_safetensors
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to("cpu", torch.bfloat16).contiguous() for name, t in draft.state_dict().items()
             if name.startswith(_OWN)}
    save_safetensors(state, out / WEIGHTS_FILE)
    config = {"kind": "draft", "num_layers": draft.config.num_hidden_layers,
              "target": target_fingerprint(target_config), "training": training or {}}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


def is_draft_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file()


def _read_config(directory: Path, target_config: ModelConfig) -> dict[str, Any]:
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("kind") != "draft":
        raise ValueError(f"{directory}: config.json is for {config.get('kind')!r}, not a draft model")
    if config.get("target") != target_fingerprint(target_config):
        raise ValueError(f"{directory}: a draft distilled from a target {config.get('target')}, this target is "
                         f"{target_fingerprint(target_config)}: train one for it (`minillm train-heads --kind draft`)")
    layers = config.get("num_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= target_config.num_hidden_layers:
        raise ValueError(f"{directory}: num_layers must be in [1, {target_config.num_hidden_layers}], got {layers!r}")
    return config


def load_draft(directory: str | os.PathLike, target: nn.Module, target_config: ModelConfig,
               device: torch.device | str, dtype: torch.dtype) -> tuple[nn.Module, ModelConfig]:
    """(draft, its ModelConfig): a model of the target's architecture (unquantized) with the saved layer count, the
    saved layers and final norm, and the target's embedding and LM head modules (shared, not copied)."""
    from safetensors.torch import load_file
    from minillm.models import new_model
    directory = Path(directory)
    config = _read_config(directory, target_config)
    draft_config = target_config.layers(0, config["num_layers"], quantization=None, quantization_config=None)
    draft = new_model(draft_config, device, dtype, getattr(target, "attention_backend", "auto"))
    draft.model.embed_tokens, draft.lm_head = target.model.embed_tokens, target.lm_head
    state = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = draft.load_state_dict(state, strict=False)
    missing = [name for name in missing if name.startswith(_OWN)]
    if missing or unexpected:
        raise ValueError(f"{directory}: a draft with missing tensors {missing[:4]} / unexpected tensors "
                         f"{unexpected[:4]}")
    return draft.to(device=device).eval(), draft_config
